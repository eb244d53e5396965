"""Latency of one linear layer: int8fx against fp and int8 peers, side by side.

On a GPU: torch ``F.linear`` bf16 / fp16 (cuBLAS), ``torch._int_mm`` + dequant,
bitsandbytes ``Linear8bitLt`` threshold 0 / 6, torchao int8 dynamic (when installed) and
int8fx threshold 0 / 6 (``torch.ops.int8fx.int8_linear``: the Triton kernels), on the
Llama-3-8B linear shapes; medians from ``triton.testing.do_bench``.

On a CPU: fp32 and bf16 eager, bf16 inductor (on CPUs with AMX-BF16 or AVX-512 BF16 the fp
baseline a user would pick), bare ``torch._int_mm``, int8fx's bare int8 GEMM kernels (each
one this CPU runs), int8fx threshold 0 / 6 without the fp weight (``Linear8bitLt``) and
threshold 6 with it (what the compiled backend passes), and bitsandbytes / torchao where
importable; medians of ``time.perf_counter``, the calls of every provider of one (shape, M)
interleaved over ``--rounds`` rounds, so the ratios within a row group compare like with like.
Weights stay in cache from call to call where they fit; ``--cold`` evicts the caches before
every timed call, as decode of a model larger than the cache reads every weight from memory.

Inputs have 0.1% outlier columns (|x| in [8, 20]; the rest is clipped normal, |x| <= 4).
Shapes are written ``KxN`` (in_features x out_features). Prints a markdown table and
writes ``bench_linear_<device>.csv`` (``bench_linear_cpu_cold.csv`` with ``--cold``) to
``--out``, with a PNG of the speed-up over bf16 when matplotlib is installed.

    python benchmarks/bench_linear.py [--device cuda|cpu] [--shapes 4096x4096 ...] [--m 1 16 ...]
                                      [--reps N] [--rounds N] [--budget-s S] [--cold] [--threads N]
                                      [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from report_table import format_cell, print_markdown_table, pyplot_or_none, write_csv

import int8fx  # noqa: F401  (registers torch.ops.int8fx)
from int8fx import reference

GPU_SHAPES = ["4096x4096", "4096x14336", "14336x4096"]  # Llama-3-8B: q/o, gate/up, down
GPU_M = [1, 16, 64, 256, 1024, 4096]
CPU_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "576x1536", "1536x576"]  # Llama-2-7B, SmolLM2-135M
CPU_M = [1, 16, 128, 512]
SMOKE_SHAPES = ["64x96", "96x64"]
SMOKE_M = [1, 16]
OUTLIER_FRACTION = 0.001

CSV_COLUMNS = ["device", "shape", "M", "K", "N", "provider", "ms", "TOPS", "GB/s", "x_vs_bf16", "x_vs_bnb_t6", "x_vs_int_mm"]

Provider = Callable[[], torch.Tensor]


# ---------------------------------------------------------------- inputs


def make_activation(M: int, K: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
    columns = torch.randperm(K, generator=generator)[: max(1, round(K * OUTLIER_FRACTION))]
    signs = torch.randint(0, 2, (M, columns.numel()), generator=generator) * 2 - 1
    x[:, columns] = signs * (8 + 12 * torch.rand(M, columns.numel(), generator=generator))
    return x.to(device=device, dtype=dtype)


def make_weight(K: int, N: int) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * K**-0.5


# ---------------------------------------------------------------- providers

# Each builder returns the callable (None when the provider cannot run the shape) and the
# bytes it must read at least: its weight and its activations.


def fp_linear(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> tuple[Provider, int]:
    x, weight = x.to(dtype), weight.to(device=x.device, dtype=dtype)
    return (lambda: F.linear(x, weight)), weight.nbytes + x.nbytes


def int_mm(x: torch.Tensor, weight: torch.Tensor, dequant: bool) -> tuple[Optional[Provider], int]:
    """int8 GEMM on pre-quantized activations (no activation quantization, no outliers)."""
    if x.is_cuda and x.shape[0] <= 16:
        return None, 0  # cuBLAS int8 needs M > 16
    (CA, SCA), _ = reference.quantize_activation(x.cpu(), 0.0)
    CB, SCB = reference.quantize_weight(weight)
    CA, SCA, CB, SCB = (t.to(x.device) for t in (CA, SCA, CB, SCB))
    CBt = CB.t()
    if not dequant:
        return (lambda: torch._int_mm(CA, CBt)), CB.nbytes + CA.nbytes
    scale = SCA[:, None] * SCB[None, :] / 127**2
    return (lambda: (torch._int_mm(CA, CBt) * scale).to(x.dtype)), CB.nbytes + CA.nbytes + scale.nbytes


def int8fx_gemm(x: torch.Tensor, weight: torch.Tensor, kernel: str) -> tuple[Optional[Provider], int]:
    """One of int8fx's CPU int8 GEMM kernels, bare, on pre-quantized activations (like ``_int_mm``)."""
    from int8fx.kernels import cpu

    if kernel not in cpu.kernels():
        return None, 0  # not on this CPU (describe() lists the kernels that are)
    (CA, _), _ = reference.quantize_activation(x, 0.0)
    CB, _ = reference.quantize_weight(weight)
    return (lambda: cpu.int8_gemm(CA, CB, kernel)), CB.nbytes + CA.nbytes


def int8fx_linear(x: torch.Tensor, weight: torch.Tensor, threshold: float, fp_weight: bool = False) -> tuple[Provider, int]:
    """``int8fx::int8_linear``; with ``fp_weight`` the outlier columns come from the fp weight, as
    the compiled backend passes it, else from CB (``Linear8bitLt``, ``release_weights=True``)."""
    CB, SCB = torch.ops.int8fx.quantize_weight(weight.to(x.device))
    W = weight.to(device=x.device, dtype=x.dtype) if fp_weight else None
    return (lambda: torch.ops.int8fx.int8_linear(x, CB, SCB, None, threshold, W)), CB.nbytes + SCB.nbytes + x.nbytes


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, threshold: float) -> tuple[Optional[Provider], int]:
    """The CUDA path's fused small-M kernel (``int8_gemv``), which ``int8_linear`` does not dispatch:
    measured so that it can replace quantize + GEMM at decode sizes the day it is faster."""
    from int8fx.kernels.cuda import int8_gemv

    if x.shape[0] > int8_gemv.MAX_M:
        return None, 0
    CB, SCB = torch.ops.int8fx.quantize_weight(weight.to(x.device))
    return (lambda: int8_gemv.int8_linear_small_m(x, CB, SCB, None, threshold, None)), CB.nbytes + SCB.nbytes + x.nbytes


def fp_inductor(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> tuple[Provider, int]:
    """``torch.compile`` of an ``nn.Linear`` in ``dtype`` (inductor's CPU GEMM choice)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=x.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.requires_grad_(False)
    compiled, x = torch.compile(layer), x.to(dtype)
    return (lambda: compiled(x)), layer.weight.nbytes + x.nbytes


def bnb_linear(x: torch.Tensor, weight: torch.Tensor, threshold: float) -> tuple[Provider, int]:
    import bitsandbytes as bnb

    K, N = weight.shape[1], weight.shape[0]
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.to(x.dtype), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(x.device)  # quantizes the weight
    return (lambda: layer(x)), N * K + 4 * N + x.nbytes


def torchao_linear(x: torch.Tensor, weight: torch.Tensor) -> tuple[Provider, int]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=x.device, dtype=x.dtype)
    layer.weight.data.copy_(weight)
    quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    layer = torch.compile(layer)  # torchao's int8 paths are written for inductor (eager on CPU is 10-100x slower)
    return (lambda: layer(x)), weight.numel() + 4 * weight.shape[0] + x.nbytes


def providers(device: str) -> dict[str, Callable]:
    """Name -> ``build(x_fp32, weight_fp32)``. Activations go in the dtype each provider is
    used with: bf16 on GPU (fp16 for bitsandbytes, its native dtype), fp32 on CPU."""
    if device == "cuda":
        bf16 = lambda x: x.to(torch.bfloat16)
        found = {
            "torch bf16": lambda x, w: fp_linear(x, w, torch.bfloat16),
            "torch fp16": lambda x, w: fp_linear(x, w, torch.float16),
            "_int_mm+dequant": lambda x, w: int_mm(bf16(x), w, dequant=True),
            "bnb t=0": lambda x, w: bnb_linear(x.half(), w, 0.0),
            "bnb t=6": lambda x, w: bnb_linear(x.half(), w, 6.0),
            "torchao int8 dyn": lambda x, w: torchao_linear(bf16(x), w),
            "int8fx t=0": lambda x, w: int8fx_linear(bf16(x), w, 0.0),
            "int8fx t=6": lambda x, w: int8fx_linear(bf16(x), w, 6.0),
            "int8fx fused gemv t=6": lambda x, w: fused_gemv(bf16(x), w, 6.0),
        }
    else:
        found = {
            "fp32 eager": lambda x, w: fp_linear(x, w, torch.float32),
            "bf16 eager": lambda x, w: fp_linear(x, w, torch.bfloat16),
            "bf16 inductor": lambda x, w: fp_inductor(x, w, torch.bfloat16),
            "_int_mm": lambda x, w: int_mm(x, w, dequant=False),
            **{
                f"int8fx gemm {kernel}": functools.partial(int8fx_gemm, kernel=kernel)
                for kernel in ("avx2", "avx512_vnni", "avx512_vnni_panels", "amx")
            },
            "bnb t=0": lambda x, w: bnb_linear(x, w, 0.0),
            "bnb t=6": lambda x, w: bnb_linear(x, w, 6.0),
            "torchao int8 dyn": lambda x, w: torchao_linear(x, w),
            "int8fx t=0": lambda x, w: int8fx_linear(x, w, 0.0),
            "int8fx t=6": lambda x, w: int8fx_linear(x, w, 6.0),
            "int8fx t=6 +fp W": lambda x, w: int8fx_linear(x, w, 6.0, fp_weight=True),
        }
    for name, module in (("bnb", "bitsandbytes"), ("torchao", "torchao")):
        if not _importable(module):
            print(f"{module} is not installed: skipping its providers")
            found = {key: build for key, build in found.items() if not key.startswith(name)}
    return found


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # an installed but broken package counts as absent
        return False
    return True


# ---------------------------------------------------------------- timing


def median_ms(fn: Provider, device: str, reps: int, budget_s: float) -> float:
    """One provider on its own: ``triton.testing.do_bench`` on a GPU, ``reps`` calls (at most
    ``budget_s`` of them) on a CPU. (The CPU table uses ``interleaved_medians_ms``.)"""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(1, reps // 4), rep=max(1, reps), return_mode="median")
    return interleaved_medians_ms({"fn": fn}, reps, budget_s, rounds=1)["fn"]


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (Linux sysfs), else 64 MiB."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 * 2**20)


def cache_evictor() -> Callable[[], None]:
    """A call that reads twice the last-level cache's size: run before each timed call, it leaves
    the weights in memory, not in cache, as every layer of a model larger than the cache is
    at decode. (Untimed; the activations are evicted too, as a model's other layers would.)"""
    buffer = torch.ones(2 * last_level_cache_bytes() // 4)
    return lambda: buffer.sum()


def interleaved_medians_ms(
    fns: dict[str, Provider], reps: int, budget_s: float, rounds: int, before_each: Optional[Callable[[], None]] = None
) -> dict[str, float]:
    """CPU: the median of ``reps`` timed calls per provider, taken in ``rounds`` rounds that each
    give every provider its share of the calls, in an order rotated from round to round. A slow
    spell of a shared machine then lands on all the providers of the table alike, not on
    whichever one happened to be timed then. A provider stops being timed once its calls
    have taken ``budget_s`` in all (the slow peers), after at least one. ``before_each`` runs,
    untimed, before every timed call (``cache_evictor``)."""
    for fn in fns.values():
        fn()  # warm up (first-call allocation, lazy init, compilation)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    per_round = max(1, -(-reps // rounds))
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(per_round):
                if len(times[name]) >= reps or (times[name] and spent[name] >= budget_s):
                    break
                if before_each is not None:
                    before_each()
                begin = time.perf_counter()
                fns[name]()
                elapsed = time.perf_counter() - begin
                times[name].append(elapsed)
                spent[name] += elapsed
    return {name: statistics.median(samples) * 1e3 for name, samples in times.items()}


# ---------------------------------------------------------------- main


def build_group(builders: dict[str, Callable], x: torch.Tensor, weight: torch.Tensor, label: str) -> dict[str, tuple[Provider, int]]:
    """Every provider that can run this (shape, M): name -> (callable, bytes it must read)."""
    built = {}
    for name, build in builders.items():
        try:
            fn, bytes_in = build(x, weight)
        except Exception as error:  # a peer that cannot run this shape is reported, not fatal
            print(f"{name} {label}: skipped ({type(error).__name__}: {error})")
            continue
        if fn is not None:
            built[name] = (fn, bytes_in)
    return built


def run(device: str, shapes: list[str], ms: list[int], reps: int, budget_s: float, rounds: int = 5, cold: bool = False) -> list[dict]:
    builders = providers(device)
    before_each = cache_evictor() if cold else None
    rows = []
    for shape in shapes:
        K, N = (int(v) for v in shape.split("x"))
        weight = make_weight(K, N)
        for M in ms:
            x = make_activation(M, K, torch.float32, device)
            built = build_group(builders, x, weight, f"{shape} M={M}")
            with torch.no_grad():
                if device == "cuda":
                    elapsed = {name: median_ms(fn, device, reps, budget_s) for name, (fn, _) in built.items()}
                else:
                    elapsed = interleaved_medians_ms({name: fn for name, (fn, _) in built.items()}, reps, budget_s, rounds, before_each)
                group = []
                for name, (fn, bytes_in) in built.items():
                    moved = bytes_in + fn().nbytes  # the least a kernel must move
                    group.append(
                        {
                            "device": device,
                            "shape": shape,
                            "M": M,
                            "K": K,
                            "N": N,
                            "provider": name,
                            "ms": elapsed[name],
                            "TOPS": 2 * M * N * K / elapsed[name] / 1e9,
                            "GB/s": moved / elapsed[name] / 1e6,
                        }
                    )
            add_ratios(group)
            rows += group
    return rows


def add_ratios(group: list[dict]) -> None:
    """Speed-ups within one (shape, M): ``x_vs_P = ms(P) / ms(row)``, > 1 means faster than P."""
    by_name = {row["provider"]: row["ms"] for row in group}
    baselines = {
        "x_vs_bf16": ("torch bf16", "bf16 inductor", "bf16 eager"),
        "x_vs_bnb_t6": ("bnb t=6",),
        "x_vs_int_mm": ("_int_mm", "_int_mm+dequant"),
    }
    for row in group:
        for column, names in baselines.items():
            base = next((by_name[n] for n in names if n in by_name), None)
            row[column] = "" if base is None else base / row["ms"]


# Issue 13's targets for one linear on a CPU, at threshold 6, as ratios of medians from one
# interleaved run: (target, the int8fx providers judged, the baseline, the batch sizes, the
# bound on time / baseline's time). Each is judged at its worst over every shape measured (the
# issue names 4096x4096; SmolLM2's shapes are where misses showed).
INT8FX_T6 = ("int8fx t=6", "int8fx t=6 +fp W")
CPU_TARGETS = [
    ("M = 1: t=6 time / torchao's", INT8FX_T6, "torchao int8 dyn", lambda M: M == 1, 0.5),
    ("M = 1: t=6 time / fp32's", INT8FX_T6, "fp32 eager", lambda M: M == 1, 0.5),
    ("M >= 128: t=6 time / bare _int_mm's", INT8FX_T6, "_int_mm", lambda M: M >= 128, 1.15),
    ("M >= 128: t=6 time / torchao's", INT8FX_T6, "torchao int8 dyn", lambda M: M >= 128, 0.9),
    ("every M: t=6 time / t=0's", INT8FX_T6, "int8fx t=0", lambda M: True, 1.15),
]
TARGET_COLUMNS = ["target", "bound", "worst", "where", "met"]


def cpu_targets(rows: list[dict]) -> list[dict]:
    """One row per target of ``CPU_TARGETS``: its worst ratio over the measured rows, where it
    was, and whether it holds; "not measured" where no row has both the provider and the baseline."""
    ms = {(r["shape"], r["M"], r["provider"]): r["ms"] for r in rows}
    results = []
    for target, judged, baseline, batch_sizes, bound in CPU_TARGETS:
        ratios = [
            (ms[(shape, M, name)] / ms[(shape, M, baseline)], f"{shape}, M = {M}, {name}")
            for (shape, M, name) in ms
            if name in judged and batch_sizes(M) and (shape, M, baseline) in ms
        ]
        if not ratios:
            results.append({"target": target, "bound": bound, "worst": "", "where": "not measured", "met": ""})
            continue
        worst, where = max(ratios)
        results.append({"target": target, "bound": bound, "worst": worst, "where": where, "met": "yes" if worst <= bound else "NO"})
    return results


def print_targets(targets: list[dict]) -> None:
    print_markdown_table(
        ["target (threshold 6)", "bound", "worst measured", "where", "met"],
        [[t["target"], f"<= {t['bound']}", format_cell(t["worst"], ".2f"), t["where"], t["met"]] for t in targets],
    )


def print_table(rows: list[dict]) -> None:
    header = ["shape (KxN)", "M", "provider", "ms", "TOPS", "GB/s", "x vs bf16", "x vs bnb t=6", "x vs _int_mm"]
    print_markdown_table(
        header,
        [
            [
                r["shape"],
                str(r["M"]),
                r["provider"],
                format_cell(r["ms"], ".3f"),
                format_cell(r["TOPS"], ".3f"),
                format_cell(r["GB/s"], ".1f"),
                format_cell(r["x_vs_bf16"], ".2f"),
                format_cell(r["x_vs_bnb_t6"], ".2f"),
                format_cell(r["x_vs_int_mm"], ".2f"),
            ]
            for r in rows
        ],
    )


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for name in dict.fromkeys(r["provider"] for r in rows):
            points = [(r["M"], r["x_vs_bf16"]) for r in rows if r["shape"] == shape and r["provider"] == name and r["x_vs_bf16"] != ""]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", xlabel="M (tokens)", ylabel="speed-up over bf16", title=f"{shape} (KxN)")
        ax.axhline(1.0, color="grey", linewidth=0.5)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    print(f"wrote {path}")


def describe(device: str) -> str:
    """The device, its model, what matters of its instruction set, threads and torch version."""
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}"
    from int8fx.kernels import cpu

    isa = " ".join(cpu.isa_flags()) or "unknown ISA"
    kernels = ", ".join(cpu.kernels()) or "none (torch._int_mm)"
    return f"cpu: {cpu.cpu_model()} [{isa}], {torch.get_num_threads()} threads, torch {torch.__version__}, int8fx CPU kernels: {kernels}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", help="KxN shapes (default: per device)")
    parser.add_argument("--m", nargs="+", type=int, help="batch sizes (default: per device)")
    parser.add_argument("--reps", type=int, default=None, help="CPU: timed calls per median; GPU: do_bench rep in ms")
    parser.add_argument("--budget-s", type=float, default=2.0, help="CPU: stop timing a provider once its calls took this long")
    parser.add_argument(
        "--rounds", type=int, default=None, help="CPU: the timed calls are spread over this many rounds across the providers (default 5)"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU: torch.set_num_threads (on a shared machine, 1 avoids waiting on descheduled threads)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="CPU: evict the caches before every timed call (weights from memory, as in a model larger than the cache)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep: checks that the script runs")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every compiled provider is a new nn.Linear sharing one forward: past dynamo's default
    # of 8 recompiles (3 shapes x 6 batch sizes is 18), the later ones silently ran eager.
    torch._dynamo.config.recompile_limit = 1024
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else GPU_SHAPES if gpu else CPU_SHAPES)
    ms = args.m or (SMOKE_M if args.smoke else GPU_M if gpu else CPU_M)
    reps = args.reps or (1 if args.smoke else 100 if gpu else 10)
    rounds = args.rounds or (1 if args.smoke else 5)
    print(describe(args.device))
    if not gpu:
        caches = f", caches evicted before each call (reads {2 * last_level_cache_bytes() >> 20} MiB)" if args.cold else ", caches warm"
        print(f"medians of {reps} calls per provider, in {rounds} interleaved rounds{caches}")
    rows = run(args.device, shapes, ms, reps, args.budget_s, rounds, cold=args.cold)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_linear_{args.device}" + ("_cold" if args.cold else ""))
    write_csv(rows, stem + ".csv", CSV_COLUMNS)
    print(f"wrote {stem}.csv")
    if not gpu:
        targets = cpu_targets(rows)
        print_targets(targets)
        write_csv(targets, stem + "_targets.csv", TARGET_COLUMNS)
        print(f"wrote {stem}_targets.csv")
    plot(rows, stem + ".png")


if __name__ == "__main__":
    main()
