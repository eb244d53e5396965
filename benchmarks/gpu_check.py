"""The GPU check: every GPU measurement int8fx needs, in one prepared command (issue 14).

A session lent a GPU runs it first, through the device tool's ``run``, as ``RUN_COMMAND`` below
(``bash scripts/gpu_check.sh``) with ``timeout_s=RUN_TIMEOUT_S`` and nothing to carry (the GPU
machine's own python3 holds torch 2.11, triton 3.6 and transformers; int8fx is read from the
working tree). The test suite runs its dry run, ``bash scripts/gpu_check.sh --dry-run``: every
stage on CPU with tiny shapes and Triton interpreted, so the first real run cannot die on a typo.

Each stage runs in its own process under its own time limit; a stage that fails, crashes or hangs
is reported and the next one runs. The budgets add up to ``TOTAL_BUDGET_S`` (8 minutes), which
leaves a 15-minute device lease room for the machine's start and one partial rerun
(``bash scripts/gpu_check.sh --stages pytest``). Budgets, on paper (seconds on an H200 with 16
CPU cores; Triton compiles about 1-3 s per kernel specialization there):

| stage | budget s | what | the plan |
|---|---|---|---|
| env | 10 | GPU, SMs, clocks, versions | imports and CUDA init 5, nvidia-smi 1 |
| ceilings | 25 | device copy GB/s, bf16 TFLOP/s, int8 TOPS | init 7; 1 GiB copy, 8192^3 bf16 and int8 products, 0.15 s each |
| pytest | 100 | ``pytest -m gpu``, 8 xdist workers | ~65 tests, ~60 Triton compiles (pinned configs) / 8 workers: 30-50 |
| bench | 140 | ``bench_linear``, Llama-3-8B shapes | 28 compiles 60; autotune 5; 18 (shape, M) x 5 providers 14; graphs 8; inputs 20 |
| model | 150 | 1.1 B Llama, bf16 vs int8lt | build 10, references 5, 4 providers x 2 graphs of 15-20 s compile 125, timing 10 |
| loading | 45 | ``from_pretrained`` into int8 (issue 16) | save 1.1 B bf16 shards 10, loads 15, forward + autotuning 15 (30 s ran out) |

(pytest: alongside, on 4 threads, the host CPU's int8 kernel tests, library build 30 + tests 20;
then 10 of its budget's last 15 s time one 4096x4096 linear on that CPU.
bench: 12 GEMM and 6 GEMV configs at t=0 and t=6; autotune timing is 24 keys x 12 configs x 25 ms;
each of the 18 (shape, M) points times 5 providers at about 0.15 s, with CUDA-graph replays.)

Everything goes under ``--out`` ($OUT on the GPU machine; at most 8 files come back from there):

    gpu_check.log    everything printed, each line prefixed by its stage
    results.json     per stage: status, seconds, budget, summary and data
    summary.md       the tables printed at the end
    gpu_linear.csv   the layer benchmark with CUDA-graph times, predictions, rooflines, % of ceilings
    gpu_linear.png   speed-up over bf16 against M (where matplotlib is installed)
    gpu_model.csv    the model benchmark

The short summary table is printed last, so the device tool's reply (the last 12,000 characters)
always carries it.

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--stages NAME ...]
    python benchmarks/gpu_check.py --print-run-command | --print-predictions
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # report_table, bench_linear, bench_gpu_model

RUN_COMMAND = "bash scripts/gpu_check.sh"
RUN_TIMEOUT_S = 540  # the 8-minute plan, plus a minute for imports and the summary
RUN_CARRY: list[str] = []


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    what: str


STAGES = (
    Stage("env", 10, "GPU, SMs, clocks, versions"),
    Stage("ceilings", 25, "device copy GB/s, bf16 TFLOP/s, int8 TOPS"),
    Stage("pytest", 100, "pytest -m gpu; the host CPU's int8 kernels alongside"),
    Stage("bench", 140, "bench_linear, Llama-3-8B shapes"),
    Stage("model", 150, "1.1 B Llama: bf16 vs int8lt, CUDA graphs"),
    Stage("loading", 45, "from_pretrained straight into int8 (issue 16)"),
)
TOTAL_BUDGET_S = 480
MIN_STAGE_S = 5  # a stage is not started with less time than this left

# Datasheet H200 SXM rates (dense); the measured ceilings replace them where the ceilings stage ran.
H200 = {"copy_GBps": 4800.0, "bf16_TFLOPs": 989.0, "int8_TOPS": 1979.0, "fp32_TFLOPs": 67.0}

GPU_SHAPES = ["4096x4096", "4096x14336", "14336x4096"]
GPU_M = [1, 16, 64, 256, 1024, 4096]
DRY_SHAPES = ["64x96", "96x64"]
DRY_M = [1, 17]
GRAPH_PROVIDERS = ("torch bf16", "int8fx t=0", "int8fx t=6", "int8fx fused gemv t=6")


# ---------------------------------------------------------------- predictions (written before any GPU run)
#
# Time of one linear on an H200, from the bytes and operations each provider must move and do,
# at the fraction of the datasheet rates we expect it to reach. GPU time only (what a CUDA-graph
# replay measures): eagerly launched, int8fx's Python op and Triton launches cost about
# HOST_US per call, which hides the kernels at small M.

EXPECTED_EFFICIENCY = {  # (of HBM bandwidth, of the tensor-core rate)
    "cublas bf16": (0.85, 0.75),  # 788 TFLOP/s was measured on 8192^3; smaller layers do a bit worse
    "cublas int8": (0.80, 0.60),
    "int8fx gemm": (0.70, 0.50),  # Triton int8 wgmma, never tuned on a GPU
    "int8fx gemv": (0.65, 1.00),  # vLLM's CUTLASS int8 GEMM streams at 65% of HBM at M = 1
    "elementwise": (0.60, 1.00),  # activation quantization, dequantization: small, launch-heavy
}
FMA_EFFICIENCY = 0.5  # fp32 FMA dots of the outlier columns (no tensor cores: input_precision="ieee")
OUTLIER_FRACTION = 0.001  # bench_linear's inputs
GEMV_BLOCK_K = 256  # the small-M kernel's K step (autotuned: 256 or 512); each step with an outlier column
MAX_SMALL_M = 16  # does a dense fp32 [16, BLOCK_K] x [BLOCK_K, N] dot
OUTLIER_BLOCK = 16  # the GEMM's outlier columns per fp32 dot step
HOST_US = {"torch bf16": 6, "_int_mm+dequant": 15, "int8fx small M": 20, "int8fx large M": 35}


def _seconds(nbytes: float, ops: float, kind: str, ops_per_s: float) -> float:
    memory, compute = EXPECTED_EFFICIENCY[kind]
    return max(nbytes / (memory * H200["copy_GBps"] * 1e9), ops / (compute * ops_per_s))


def roofline_us(M: int, K: int, N: int, int8: bool) -> float:
    """The floor: the least bytes at 4.8 TB/s or the operations at the dense tensor-core peak, whichever is longer."""
    ops = 2 * M * N * K
    if int8:
        return max((N * K + 4 * N + 2 * M * K + 2 * M * N) / (H200["copy_GBps"] * 1e9), ops / (H200["int8_TOPS"] * 1e12)) * 1e6
    return max((2 * N * K + 2 * M * K + 2 * M * N) / (H200["copy_GBps"] * 1e9), ops / (H200["bf16_TFLOPs"] * 1e12)) * 1e6


def outlier_columns(K: int) -> int:
    return max(1, round(K * OUTLIER_FRACTION))


def predicted_us(provider: str, M: int, K: int, N: int) -> Optional[float]:
    """Expected GPU time of ``provider`` (a bench_linear name) in microseconds; None where not modelled."""
    ops = 2 * M * N * K
    fma_per_s = FMA_EFFICIENCY * H200["fp32_TFLOPs"] * 1e12
    if provider in ("torch bf16", "torch fp16"):
        return _seconds(2 * N * K + 2 * M * K + 2 * M * N, ops, "cublas bf16", H200["bf16_TFLOPs"] * 1e12) * 1e6
    if provider == "_int_mm+dequant":
        if M <= 16:
            return None  # cuBLAS int8 needs M > 16
        gemm = _seconds(N * K + M * K + 4 * M * N, ops, "cublas int8", H200["int8_TOPS"] * 1e12)
        dequant = _seconds(18 * M * N, 0, "elementwise", 1)  # int32 * fp32 scale -> fp32 -> bf16
        return (gemm + dequant) * 1e6
    if provider == "int8fx fused gemv t=6":  # the small-M kernel the t=0 / t=6 rows took before 2026-11-30
        provider = "int8fx t=6"
    if provider not in ("int8fx t=0", "int8fx t=6"):
        return None
    outliers = provider == "int8fx t=6"
    if M <= MAX_SMALL_M:  # the model of the first run's dispatch, kept as it was predicted
        seconds = _seconds(N * K + 4 * N + 2 * M * N, 0, "int8fx gemv", 1)
        if outliers:  # K steps holding an outlier column each do a dense fp32 dot of 16 rows
            steps = min(outlier_columns(K), math.ceil(K / GEMV_BLOCK_K))
            seconds += 2 * MAX_SMALL_M * GEMV_BLOCK_K * N * steps / fma_per_s
        return seconds * 1e6
    quantize = _seconds(5 * M * K, 0, "elementwise", 1)  # reads X twice (bf16), writes CA
    gemm = _seconds(N * K + M * K + 2 * M * N, ops, "int8fx gemm", H200["int8_TOPS"] * 1e12)
    seconds = quantize + gemm
    if outliers:
        seconds += 2 * M * N * OUTLIER_BLOCK * math.ceil(outlier_columns(K) / OUTLIER_BLOCK) / fma_per_s
    return seconds * 1e6


def predictions_markdown() -> str:
    """The ahead-of-time table of benchmarks/README.md (a test keeps the two equal)."""
    header = [
        "shape (KxN)",
        "M",
        "roofline bf16 µs",
        "roofline int8 µs",
        "predicted bf16 µs",
        "predicted _int_mm+dequant µs",
        "predicted int8fx t=0 µs",
        "predicted int8fx t=6 µs",
        "predicted t=6 x vs bf16",
        "predicted t=6 / t=0",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in GPU_SHAPES:
        K, N = (int(v) for v in shape.split("x"))
        for M in GPU_M:
            bf16, t0, t6 = (predicted_us(p, M, K, N) for p in ("torch bf16", "int8fx t=0", "int8fx t=6"))
            int_mm = predicted_us("_int_mm+dequant", M, K, N)
            cells = [
                shape,
                str(M),
                f"{roofline_us(M, K, N, False):.1f}",
                f"{roofline_us(M, K, N, True):.1f}",
                f"{bf16:.1f}",
                "—" if int_mm is None else f"{int_mm:.1f}",
                f"{t0:.1f}",
                f"{t6:.1f}",
                f"{bf16 / t6:.2f}",
                f"{t6 / t0:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- results.json


class Results:
    """``results.json`` under the output folder: one entry per stage (a stage's process writes its
    own ``summary`` and ``data``; the orchestrator adds status, seconds and budget)."""

    def __init__(self, out: Path):
        self.path = out / "results.json"

    def load(self) -> dict:
        if not self.path.exists():
            return {"stages": {}}
        with open(self.path) as handle:
            return json.load(handle)

    def stage(self, name: str) -> dict:
        return self.load()["stages"].get(name, {})

    def reset(self, name: str) -> None:
        results = self.load()
        results["stages"].pop(name, None)
        self.write(results)

    def update(self, name: str, **fields) -> None:
        results = self.load()
        results["stages"].setdefault(name, {}).update(fields)
        self.write(results)

    def write(self, results: dict) -> None:
        partial = self.path.with_suffix(".json.partial")
        with open(partial, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        os.replace(partial, self.path)


@dataclass
class Context:
    out: Path
    dry_run: bool
    results: Results

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def record(self, name: str, summary: str, data: Optional[dict] = None, status: Optional[str] = None) -> None:
        fields = {"summary": summary, "data": data or {}}
        if status:
            fields["status"] = status
        self.results.update(name, **fields)


def median_s(fn: Callable, device: str, reps: int = 5) -> float:
    """Median seconds of ``fn``: CUDA events through ``triton.testing.do_bench`` on a GPU, else a wall clock."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- stage: env

NVIDIA_SMI_FIELDS = [
    "name",
    "driver_version",
    "clocks.sm",
    "clocks.max.sm",
    "clocks.mem",
    "clocks.max.mem",
    "power.draw",
    "power.limit",
    "temperature.gpu",
    "pstate",
    "memory.used",
    "memory.total",
]


def nvidia_smi() -> Optional[dict]:
    """A read-only query of the card's state (clocks, power); None where nvidia-smi is absent."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip()[:300]}
    values = [v.strip() for v in result.stdout.splitlines()[0].split(",")]
    return dict(zip(NVIDIA_SMI_FIELDS, values))


def package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_cpu() -> dict:
    """The GPU machine's own CPU: its int8 kernels are tested and timed in the pytest stage (a GPU
    host may be the first AMX machine any session gets)."""
    from int8fx.kernels import cpu

    return {"model": cpu.cpu_model(), "isa": cpu.isa_flags(), "cores": os.cpu_count()}


def stage_env(ctx: Context) -> int:
    import torch
    import triton

    data = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": package_version("transformers"),
        "numpy": package_version("numpy"),
        "cpu_count": os.cpu_count(),
        "host_cpu": host_cpu(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "dry_run": ctx.dry_run,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        data.update(gpu=f"none (CPU: {platform.processor() or platform.machine()})", sm_count=0)
    data["nvidia_smi"] = nvidia_smi()
    for key, value in data.items():
        print(f"{key}: {value}")
    ctx.record(
        "env",
        f"{data['gpu']}, {data['sm_count']} SMs, torch {data['torch']}, triton {data['triton']}, transformers {data['transformers']}",
        data,
    )
    return 0


# ---------------------------------------------------------------- stage: ceilings


def stage_ceilings(ctx: Context) -> int:
    """The rates every benchmark is judged against, measured on this card as it is found."""
    import torch

    device = ctx.device
    elements, n = (2**28, 8192) if device == "cuda" else (2**20, 256)  # 1 GiB of fp32 per copy buffer on a GPU
    torch.manual_seed(0)
    source = torch.randn(elements, device=device)  # random data: zeros run faster than real data
    target = torch.empty_like(source)
    copy_s = median_s(lambda: target.copy_(source), device)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    bf16_s = median_s(lambda: a @ b, device)
    a8, b8 = (torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8) for _ in range(2))
    int8_s = median_s(lambda: torch._int_mm(a8, b8.t()), device)  # B column-major: cuBLAS's fast int8 layout
    data = {
        "copy_GBps": 2 * source.nbytes / copy_s / 1e9,
        "bf16_TFLOPs": 2 * n**3 / bf16_s / 1e12,
        "int8_TOPS": 2 * n**3 / int8_s / 1e12,
        "copy_bytes": source.nbytes,
        "matmul_n": n,
        "nvidia_smi_after": nvidia_smi(),
    }
    for key in ("copy_GBps", "bf16_TFLOPs", "int8_TOPS"):
        data[f"{key}_pct_of_datasheet"] = 100 * data[key] / H200[key]
    summary = (
        f"copy {data['copy_GBps']:.0f} GB/s ({data['copy_GBps_pct_of_datasheet']:.0f}% of 4.8 TB/s), "
        f"bf16 {data['bf16_TFLOPs']:.0f} TFLOP/s ({data['bf16_TFLOPs_pct_of_datasheet']:.0f}%), "
        f"int8 _int_mm {data['int8_TOPS']:.0f} TOPS ({data['int8_TOPS_pct_of_datasheet']:.0f}%)"
    )
    print(summary)
    ctx.record("ceilings", summary, data)
    return 0


def ceilings(ctx: Context) -> tuple[dict, str]:
    """The measured ceilings, or the datasheet's where the ceilings stage did not run."""
    measured = ctx.results.stage("ceilings").get("data", {})
    if all(key in measured for key in ("copy_GBps", "bf16_TFLOPs", "int8_TOPS")):
        return measured, "measured"
    return dict(H200), "datasheet (the ceilings stage did not finish)"


# ---------------------------------------------------------------- stage: pytest


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (``pytest.mark.gpu``): collecting only those keeps the
    whole suite's imports (the CPU library's build among them) off the GPU machine's clock."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in path.read_text())


CPU_TEST_FILE = "tests/test_cpu_kernels.py"
CPU_TEST_THREADS = 4  # beside 8 xdist workers compiling Triton kernels on 16 cores
HOST_BENCH_S = 15  # what the host CPU's timings need, kept free at the end of the stage


def junit_counts(path: str) -> tuple[dict, list[str]]:
    """(tests, failures, errors, skipped) and the failed test ids of a pytest junit file."""
    import xml.etree.ElementTree as ElementTree

    if not os.path.exists(path):
        return {}, []
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts, failed


def counts_summary(counts: dict, returncode: Optional[int]) -> str:
    passed = counts.get("tests", 0) - counts.get("failures", 0) - counts.get("errors", 0) - counts.get("skipped", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0)
    return f"{passed} passed, {failed} failed, {counts.get('skipped', 0)} skipped (exit {returncode})"


def start_cpu_kernel_tests(dry_run: bool, junit: str, log_path: str) -> subprocess.Popen:
    """The CPU library's tests on the GPU machine's own CPU, in the background: each kernel its
    ISA allows (AMX on an Intel host) against the reference, and the dispatch for that CPU. The
    dry run keeps to the dispatch tests: the suite runs the whole file anyway."""
    command = [sys.executable, "-m", "pytest", CPU_TEST_FILE, "-q", "-p", "no:cacheprovider", "--timeout=90", f"--junitxml={junit}"]
    if dry_run:
        command += ["-k", "dispatch_choice or cpuid"]
    env = dict(os.environ, OMP_NUM_THREADS=str(CPU_TEST_THREADS))
    print("$ " + " ".join(command[1:]) + "   (in the background, output after pytest -m gpu's)")
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stage_pytest(ctx: Context) -> int:
    """``pytest -m gpu``; alongside, the host CPU's kernel tests, then its int8 kernels timed."""
    start = time.monotonic()
    deadline = start + next(stage.budget_s for stage in STAGES if stage.name == "pytest") - HOST_BENCH_S
    with tempfile.TemporaryDirectory() as tmp:
        junit, cpu_junit, cpu_log = (os.path.join(tmp, name) for name in ("pytest.xml", "cpu.xml", "cpu.log"))
        cpu_tests = start_cpu_kernel_tests(ctx.dry_run, cpu_junit, cpu_log)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            *gpu_test_files(),
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=8",
            "--timeout=120",
            f"--junitxml={junit}",
        ]
        workers = min(8, os.cpu_count() or 1)
        if not ctx.dry_run and importlib.util.find_spec("xdist") is not None and workers > 1:
            command += ["-n", str(workers)]  # Triton compiles are most of the time: spread them
        env = dict(os.environ)
        if ctx.dry_run:
            env.update(TRITON_INTERPRET="1", INT8FX_GPU_TESTS_ON_CPU="1")
        print("$ " + " ".join(command[1:]))
        returncode = subprocess.run(command, cwd=ROOT, env=env).returncode
        counts, failed = junit_counts(junit)
        try:
            cpu_returncode = cpu_tests.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            cpu_tests.kill()
            cpu_returncode = None
        with open(cpu_log) as log:
            print("---- host CPU kernel tests\n" + "".join(log.readlines()[-15:]))
        cpu_counts, cpu_failed = junit_counts(cpu_junit)
    host = {"cpu": host_cpu(), "counts": cpu_counts, "failed": cpu_failed[:40], "returncode": cpu_returncode}
    host["summary"] = counts_summary(cpu_counts, cpu_returncode) if cpu_returncode is not None else "killed: out of time"
    summary = counts_summary(counts, returncode) + f"; host CPU kernels: {host['summary']}"
    data = {"counts": counts, "failed": failed[:40], "returncode": returncode, "host": host}
    ctx.record("pytest", summary, data)  # before the timings: a stage killed during them keeps the tests' results
    host.update(host_cpu_bench(ctx.dry_run))
    ctx.record("pytest", summary, data)
    ok = returncode == 0 and cpu_returncode in (0, 5)  # 5: nothing collected (no C++ compiler there)
    return 0 if ok else 1


def host_cpu_bench(dry_run: bool) -> dict:
    """One 4096x4096 linear on the host CPU, all its threads, ms medians: fp32 and bf16
    ``F.linear`` (oneDNN/MKL; AMX-BF16 where there is one), each int8 GEMM kernel bare, and the
    op at thresholds 0 and 6 with the kernel it picks. Nothing where the library does not load."""
    import torch
    import torch.nn.functional as F

    from int8fx import reference
    from int8fx.kernels import cpu

    if not cpu.load():
        print("host CPU: the int8fx CPU library did not load; no timings")
        return {"bench": [], "note": "library not loaded"}
    K = N = 128 if dry_run else 4096
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(N, K, generator=generator) * K**-0.5
    CB, SCB = reference.quantize_weight(weight)
    weight_bf16 = weight.bfloat16()

    def providers(M: int) -> dict[str, Callable]:
        x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
        x[:, : max(1, K // 1000)] = 10.0  # outlier columns at threshold 6
        x_bf16, A = x.bfloat16(), torch.randint(-127, 128, (M, K), generator=generator, dtype=torch.int8)
        found = {"fp32 F.linear": lambda: F.linear(x, weight), "bf16 F.linear": lambda: F.linear(x_bf16, weight_bf16)}
        for kernel in (*cpu.kernels(), "onednn"):
            found[f"gemm {kernel}"] = lambda kernel=kernel: cpu.int8_gemm(A, CB, kernel)
        for threshold in (0.0, 6.0):
            found[f"int8fx t={threshold:g}"] = lambda t=threshold: cpu.int8_linear_cpu(x, CB, SCB, None, t, None)
        return found

    rows = []
    for M in (1, 17) if dry_run else (1, 16, 128, 512):
        entry = {"M": M, "chosen": cpu.chosen_kernel(M, K)}
        for name, fn in providers(M).items():
            entry[name] = round(median_s(fn, "cpu", reps=3 if dry_run else 15) * 1e3, 4)
        rows.append(entry)
    header = list(rows[0])
    table = markdown(header, [[row[key] for key in header] for row in rows])
    info = (
        f"{K}x{N} linear, {host_cpu()['model']}, {torch.get_num_threads()} threads, "
        f"kernels {','.join(cpu.kernels())}, AMX self-check: {cpu.amx_self_check()}"
    )
    print(f"host CPU (ms): {info}\n{table}")
    return {"bench": rows, "bench_info": info, "bench_table": table}


# ---------------------------------------------------------------- stage: bench


def bound_autotuning(warmup_ms: int = 5, rep_ms: int = 20) -> None:
    """Times each autotuning candidate for about 25 ms instead of Triton's 125 (25 ms warm-up, 100 ms
    of repetitions). The configs are the kernels' own short lists (12 GEMM, 6 GEMV tiles); config
    differences of tens of percent show within that, and 24 tuning keys x 12 configs stay at seconds.
    What it picks is recorded (``autotune`` in results.json), so configs can be chosen ahead next time."""
    import triton.testing

    from int8fx.kernels.cuda import int8_gemm, int8_gemv

    def quick(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)

    for kernel in (int8_gemm._int8_gemm_kernel, int8_gemv._int8_gemv_kernel):
        kernel.do_bench = quick  # an instance attribute: shadows Triton's own benchmarker


def autotune_choices() -> dict:
    from int8fx.kernels.cuda import int8_gemm, int8_gemv

    return {
        name: {str(key): str(config) for key, config in kernel.cache.items()}
        for name, kernel in (("int8_gemm", int8_gemm._int8_gemm_kernel), ("int8_gemv", int8_gemv._int8_gemv_kernel))
    }


def shim_bench_linear_for_cpu(bench_linear) -> None:
    """Dry run: bench_linear's GPU providers run on CPU tensors, timed by its CPU clock, and the
    int8fx op runs the Triton kernels (interpreted) as it would on a GPU."""
    from bench_gpu_model import route_int8_linear_to_triton_on_cpu

    route_int8_linear_to_triton_on_cpu()
    make_activation, median_ms = bench_linear.make_activation, bench_linear.median_ms
    bench_linear.make_activation = lambda M, K, dtype, device: make_activation(M, K, dtype, "cpu")
    bench_linear.median_ms = lambda fn, device, reps, budget_s: median_ms(fn, "cpu", reps, budget_s)


def graph_ms(fn: Callable, device: str) -> float:
    """GPU time per call without launch overheads: replays of a CUDA graph of the call (a plain median in a dry run)."""
    if device != "cuda":
        return median_s(fn, device, reps=1) * 1e3
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def graph_times(bench_linear, shape: str, ms: list[int], device: str) -> dict:
    """``{(M, provider): ms}`` for GRAPH_PROVIDERS: the kernels' own time, the number the targets are about."""
    import torch

    K, N = (int(v) for v in shape.split("x"))
    weight = bench_linear.make_weight(K, N)
    builders = bench_linear.providers("cuda")
    times = {}
    for M in ms:
        x = bench_linear.make_activation(M, K, torch.float32, device)
        for name in GRAPH_PROVIDERS:
            try:
                fn, _ = builders[name](x, weight)
                if fn is None:  # not at this M (the fused GEMV takes M <= 16)
                    continue
                with torch.no_grad():
                    times[(M, name)] = graph_ms(fn, device)
            except Exception as error:  # reported; the eager timing of the same provider stands
                print(f"{name} {shape} M={M}: no CUDA-graph time ({type(error).__name__}: {str(error)[:200]})")
    return times


def annotate(row: dict, graphs: dict, limits: dict) -> None:
    """Adds the CUDA-graph time, the prediction, the roofline and the percentages of the measured ceilings."""
    M, K, N, provider = row["M"], row["K"], row["N"], row["provider"]
    int8 = not provider.startswith("torch")
    predicted = predicted_us(provider, M, K, N)
    row["graph_ms"] = graphs.get((M, provider), "")
    row["predicted_graph_ms"] = "" if predicted is None else predicted / 1e3
    row["roofline_ms"] = roofline_us(M, K, N, int8) / 1e3
    row["pct_copy_bw"] = 100 * row["GB/s"] / limits["copy_GBps"]
    row["pct_matmul_ceiling"] = 100 * row["TOPS"] / (limits["int8_TOPS"] if int8 else limits["bf16_TFLOPs"])


BREAKDOWN_CALLS = 10


def _profiled_events(fn: Callable, device: str) -> list:
    """``key_averages`` of ``BREAKDOWN_CALLS`` calls: the GPU kernels on a GPU, the int8fx ops on CPU (dry run)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiles and autotunes outside the profile
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with torch.no_grad(), profile(activities=[activity]) as prof:
        for _ in range(BREAKDOWN_CALLS):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    if device != "cuda":
        return [(event.key, event.cpu_time_total, event.count) for event in prof.key_averages() if event.key.startswith("int8fx::")]
    return [
        (event.key, getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0), event.count)
        for event in prof.key_averages()
        if str(getattr(event, "device_type", "")).endswith("CUDA")
    ]


def kernel_breakdown(bench_linear, shape: str, ms: list[int], device: str) -> list[dict]:
    """Where an int8fx linear's GPU time goes: µs per call of each kernel it launches, at t=0 and t=6."""
    import torch

    K, N = (int(v) for v in shape.split("x"))
    weight = bench_linear.make_weight(K, N)
    rows = []
    for M in ms:
        x = bench_linear.make_activation(M, K, torch.float32, device).to(torch.bfloat16)
        for threshold in (0.0, 6.0):
            try:
                fn, _ = bench_linear.int8fx_linear(x, weight, threshold)
                events = _profiled_events(fn, device)
            except Exception as error:  # reported; the timings stand without it
                print(f"breakdown {shape} M={M} t={threshold:g}: {type(error).__name__}: {str(error)[:200]}")
                continue
            for name, total_us, count in events:
                rows.append(
                    {
                        "shape": shape,
                        "M": M,
                        "threshold": threshold,
                        "kernel": name[:70],
                        "us_per_call": total_us / BREAKDOWN_CALLS,
                        "launches_per_call": count / BREAKDOWN_CALLS,
                    }
                )
    return rows


def breakdown_markdown(rows: list[dict]) -> str:
    header = ["shape", "M", "t", "kernel", "µs per call", "launches per call"]
    return markdown(
        header,
        [[r["shape"], r["M"], f"{r['threshold']:g}", r["kernel"], f"{r['us_per_call']:.1f}", f"{r['launches_per_call']:g}"] for r in rows],
    )


def stage_bench(ctx: Context) -> int:
    import bench_linear
    from report_table import write_csv

    limits, source = ceilings(ctx)
    print(
        f"ceilings ({source}): copy {limits['copy_GBps']:.0f} GB/s, bf16 {limits['bf16_TFLOPs']:.0f} TFLOP/s, "
        f"int8 {limits['int8_TOPS']:.0f} TOPS"
    )
    if ctx.dry_run:
        shim_bench_linear_for_cpu(bench_linear)
        shapes, ms, reps = DRY_SHAPES, DRY_M, 1
    else:
        bound_autotuning()
        shapes, ms, reps = GPU_SHAPES, GPU_M, 60  # do_bench: 15 ms warm-up, 60 ms of repetitions
    columns = bench_linear.CSV_COLUMNS + ["graph_ms", "predicted_graph_ms", "roofline_ms", "pct_copy_bw", "pct_matmul_ceiling"]
    rows, breakdown = [], []
    for shape in shapes:  # a shape at a time: rows measured before a time limit are kept
        shape_rows = bench_linear.run("cuda", [shape], ms, reps, budget_s=1.0)
        graphs = graph_times(bench_linear, shape, ms, ctx.device)
        for row in shape_rows:
            annotate(row, graphs, limits)
        rows += shape_rows
        if not breakdown:  # the first shape's kernels, once: enough to see where the time goes
            breakdown = kernel_breakdown(bench_linear, shape, ms, ctx.device)
            print(breakdown_markdown(breakdown))
        write_csv(rows, str(ctx.out / "gpu_linear.csv"), columns)
        pivot = pivot_rows(rows)
        data = {"ceilings": source, "pivot": pivot, "autotune": autotune_choices(), "breakdown": breakdown}
        ctx.record("bench", bench_summary(pivot), data)
    try:
        bench_linear.plot(rows, str(ctx.out / "gpu_linear.png"))
    except Exception as error:  # a plot is a convenience
        print(f"no plot: {type(error).__name__}: {error}")
    print_pivot(pivot_rows(rows))
    return 0


def pivot_rows(rows: list[dict]) -> list[dict]:
    """One row per (shape, M): each provider's µs side by side, and the ratios the targets are about."""
    table = {}
    for row in rows:
        entry = table.setdefault((row["shape"], row["M"]), {"shape": row["shape"], "M": row["M"]})
        entry[f"{row['provider']} us"] = row["ms"] * 1e3
        if row.get("graph_ms") != "":
            entry[f"{row['provider']} graph us"] = row["graph_ms"] * 1e3
        if row["provider"] == "int8fx t=6":
            entry["t=6 predicted graph us"] = row["predicted_graph_ms"] * 1e3
            entry["t=6 pct copy bw"] = row["pct_copy_bw"]
            entry["t=6 pct int8 ceiling"] = row["pct_matmul_ceiling"]
    for entry in table.values():
        entry["t=6 x vs bf16"] = _ratio(entry, "torch bf16 us", "int8fx t=6 us")
        entry["t=6 x vs bf16, graphs"] = _ratio(entry, "torch bf16 graph us", "int8fx t=6 graph us")
        entry["t=6 / t=0, graphs"] = _ratio(entry, "int8fx t=6 graph us", "int8fx t=0 graph us")
    return list(table.values())


def _ratio(entry: dict, numerator: str, denominator: str):
    if entry.get(numerator) in (None, "") or entry.get(denominator) in (None, ""):
        return ""
    return entry[numerator] / entry[denominator]


PIVOT_COLUMNS = [  # (header, key, format)
    ("shape (KxN)", "shape", "s"),
    ("M", "M", "d"),
    ("bf16 µs", "torch bf16 us", ".1f"),
    ("_int_mm+dequant µs", "_int_mm+dequant us", ".1f"),
    ("int8fx t=0 µs", "int8fx t=0 us", ".1f"),
    ("int8fx t=6 µs", "int8fx t=6 us", ".1f"),
    ("bf16 graph µs", "torch bf16 graph us", ".1f"),
    ("t=6 graph µs", "int8fx t=6 graph us", ".1f"),
    ("fused gemv t=6 graph µs", "int8fx fused gemv t=6 graph us", ".1f"),
    ("t=6 predicted µs", "t=6 predicted graph us", ".1f"),
    ("t=6 x vs bf16", "t=6 x vs bf16", ".2f"),
    ("t=6 x vs bf16, graphs", "t=6 x vs bf16, graphs", ".2f"),
    ("t=6 / t=0, graphs", "t=6 / t=0, graphs", ".2f"),
    ("t=6 % copy BW", "t=6 pct copy bw", ".0f"),
    ("t=6 % int8 ceiling", "t=6 pct int8 ceiling", ".0f"),
]


def pivot_markdown(pivot: list[dict]) -> str:
    from report_table import format_cell

    lines = ["| " + " | ".join(h for h, _, _ in PIVOT_COLUMNS) + " |", "|" + "---|" * len(PIVOT_COLUMNS)]
    for entry in pivot:
        cells = [str(entry.get(key, "")) if fmt in ("s", "d") else format_cell(entry.get(key, ""), fmt) for _, key, fmt in PIVOT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_pivot(pivot: list[dict]) -> None:
    print(pivot_markdown(pivot))


def bench_summary(pivot: list[dict]) -> str:
    def extreme(key, pick, rows):
        values = [e[key] for e in rows if e.get(key) not in (None, "")]
        return f"{pick(values):.2f}" if values else "n/a"

    first, last = min(e["M"] for e in pivot), max(e["M"] for e in pivot)
    at = lambda M: [e for e in pivot if e["M"] == M]
    return (
        f"{len(pivot)} (shape, M); t=6 x vs bf16 (graphs) at M={first}: min {extreme('t=6 x vs bf16, graphs', min, at(first))}, "
        f"at M={last}: min {extreme('t=6 x vs bf16', min, at(last))}; t=6/t=0 max {extreme('t=6 / t=0, graphs', max, pivot)}"
    )


# ---------------------------------------------------------------- stage: model


def stage_model(ctx: Context) -> int:
    import bench_gpu_model

    if ctx.dry_run:
        bench_gpu_model.route_int8_linear_to_triton_on_cpu()
    setup = bench_gpu_model.DRY_SETUP if ctx.dry_run else bench_gpu_model.GPU_SETUP

    def on_row(rows: list[dict], info: dict) -> None:
        table = markdown(*bench_gpu_model.table(rows))
        ctx.record("model", model_summary(rows, info), {"rows": rows, "info": info, "table": table})

    rows, info = bench_gpu_model.run(setup, str(ctx.out), on_row)
    bench_gpu_model.print_table(rows)
    return 1 if info.get("failed") else 0


def model_summary(rows: list[dict], info: dict) -> str:
    by_name = {row["provider"]: row for row in rows}
    graphs = by_name.get("int8lt t=6, CUDA graphs") or by_name.get("int8lt t=6")
    parts = [f"{info['parameters'] / 1e6:.4g} M params"]
    if graphs and graphs.get("decode_x_vs_bf16") != "":
        parts.append(
            f"{graphs['provider']}: decode {graphs['decode_x_vs_bf16']:.2f}x, prefill {graphs['prefill_x_vs_bf16']:.2f}x bf16, "
            f"SQNR {graphs['sqnr_vs_fp32_db']:.1f} dB vs fp32, {graphs['sqnr_vs_reference_db']:.1f} dB vs reference"
        )
    if info.get("failed"):
        parts.append("failed: " + ", ".join(info["failed"]))
    return "; ".join(parts)


# ---------------------------------------------------------------- stage: loading


def stage_loading(ctx: Context) -> int:
    import bench_gpu_model

    def summary(data: dict) -> str:
        return ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in data.items())

    setup = bench_gpu_model.DRY_SETUP if ctx.dry_run else bench_gpu_model.GPU_SETUP
    data = bench_gpu_model.loading_peak_memory(setup, on_step=lambda partial: ctx.record("loading", summary(partial), dict(partial)))
    ctx.record("loading", summary(data), data)
    return 0 if all(value for key, value in data.items() if key.endswith("finite")) else 1


STAGE_FUNCTIONS = {
    "env": stage_env,
    "ceilings": stage_ceilings,
    "pytest": stage_pytest,
    "bench": stage_bench,
    "model": stage_model,
    "loading": stage_loading,
}


# ---------------------------------------------------------------- orchestration


def stage_environment(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1" if dry_run else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_stage_process(stage: Stage, limit_s: float, out: Path, dry_run: bool, log) -> tuple[str, float]:
    """Runs one stage in its own process group, streaming its lines; kills the group at ``limit_s``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--out", str(out)]
    if dry_run:
        command.append("--dry-run")
    start = time.monotonic()
    # Its own process group (not session: the device machine ends a command's leftovers by session).
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=stage_environment(dry_run),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        **group,
    )
    RUNNING.append(process)

    def relay():
        for line in process.stdout:
            text = f"[{stage.name}] {line}"
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            log.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        status = "ok" if process.wait(timeout=limit_s) == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timeout ({limit_s:.0f} s)"
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the stage's whole group: pytest and compile workers
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    RUNNING.remove(process)
    return status, time.monotonic() - start


RUNNING: list[subprocess.Popen] = []  # the stage process now running, for the SIGTERM handler


def stop_on_sigterm(out: Path, names: list[str]) -> None:
    """On SIGTERM (the shell script's last-resort ``timeout``): end the running stage's group and
    still print the report of what finished."""

    def handler(signum, frame):
        for process in RUNNING:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sys.stdout.write(final_report(Results(out).load(), names))
        sys.stdout.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def orchestrate(out: Path, dry_run: bool, names: list[str]) -> int:
    results = Results(out)
    state = results.load()
    state["run"] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry_run,
        "command": RUN_COMMAND,
        "stages": names,
        "total_budget_s": TOTAL_BUDGET_S,
    }
    results.write(state)
    deadline = time.monotonic() + TOTAL_BUDGET_S
    stop_on_sigterm(out, names)
    with open(out / "gpu_check.log", "a") as log:
        for stage in (s for s in STAGES if s.name in names):
            limit = min(stage.budget_s, deadline - time.monotonic())
            if limit < MIN_STAGE_S:
                results.update(stage.name, status="not run (out of time)", seconds=0.0, budget_s=stage.budget_s)
                continue
            results.reset(stage.name)  # a rerun into the same folder starts the stage afresh
            banner = f"==== {stage.name}: {stage.what} (budget {stage.budget_s} s)\n"
            sys.stdout.write(banner)
            log.write(banner)
            status, seconds = run_stage_process(stage, limit, out, dry_run, log)
            recorded = results.stage(stage.name).get("status")
            if status == "ok" and recorded:
                status = recorded  # e.g. skipped
            results.update(stage.name, status=status, seconds=round(seconds, 1), budget_s=stage.budget_s)
        report = final_report(results.load(), names)
        log.write(report)
    (out / "summary.md").write_text(report)
    sys.stdout.write(report)
    return 0


# ---------------------------------------------------------------- the report printed last


def targets(state: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for issue 14's targets, from whatever stages finished."""
    pivot = state["stages"].get("bench", {}).get("data", {}).get("pivot", [])
    model_rows = state["stages"].get("model", {}).get("data", {}).get("rows", [])
    out = []

    def check(target, values, pick, ok, fmt=".2f", note=""):
        values = [v for v in values if v not in (None, "")]
        if not values:
            out.append((target, "not measured", "—"))
            return
        value = pick(values)
        out.append((target, f"{value:{fmt}}{note}", "yes" if ok(value) else "NO"))

    m_first = [e for e in pivot if e["M"] == 1]
    m_last = [e for e in pivot if e["M"] == 4096]
    check(
        "M = 1: int8fx t=6 >= 1.5x bf16 (GPU time, CUDA graphs)",
        [e.get("t=6 x vs bf16, graphs") for e in m_first],
        min,
        lambda v: v >= 1.5,
        note="x (worst shape)",
    )
    check("M = 4096: int8fx t=6 >= 1.4x bf16", [e.get("t=6 x vs bf16") for e in m_last], min, lambda v: v >= 1.4, note="x (worst shape)")
    check(
        "t=6 within 1.15x of t=0 at every M (GPU time)",
        [e.get("t=6 / t=0, graphs") for e in pivot],
        max,
        lambda v: v <= 1.15,
        note="x (worst)",
    )
    graph_row = next((r for r in model_rows if r["provider"].startswith("int8lt") and r["cuda_graphs"]), None)
    check(
        "model decode >= 1.4x bf16 tokens/s, CUDA graphs",
        [graph_row and graph_row.get("decode_x_vs_bf16")],
        min,
        lambda v: v >= 1.4,
        note="x",
    )
    check("model prefill >= 1.2x bf16", [graph_row and graph_row.get("prefill_x_vs_bf16")], min, lambda v: v >= 1.2, note="x")
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def final_report(state: dict, names: list[str]) -> str:
    """The tables printed at the end: the layer benchmark, the model, the targets, and the stages last."""
    stages = state["stages"]
    parts = [f"\n## GPU check ({'dry run, CPU' if state['run'].get('dry_run') else 'GPU'}), {state['run'].get('started')}\n"]
    pivot = stages.get("bench", {}).get("data", {}).get("pivot")
    if pivot:
        parts.append("\n### One linear (bench_linear, bf16 input; µs are medians)\n\n" + pivot_markdown(pivot) + "\n")
    model_table = stages.get("model", {}).get("data", {}).get("table")
    if model_table:
        parts.append("\n### Model (bench_gpu_model)\n\n" + model_table)
    host = stages.get("pytest", {}).get("data", {}).get("host", {})
    if host.get("bench_table"):
        parts.append(f"\n### Host CPU (ms): {host['bench_info']}\n\n" + host["bench_table"])
    parts.append("\n### Targets (issue 14)\n\n" + markdown(["target", "measured", "met"], [list(t) for t in targets(state)]))
    stage_rows = []
    for stage in STAGES:
        if stage.name not in names:
            continue
        entry = stages.get(stage.name, {})
        stage_rows.append(
            [stage.name, entry.get("status", "not run"), _format(entry.get("seconds")), str(stage.budget_s), entry.get("summary", "")[:160]]
        )
    parts.append("\n### Stages\n\n" + markdown(["stage", "status", "seconds", "budget s", "result"], stage_rows))
    return "".join(parts)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="every stage on CPU, tiny shapes, Triton interpreted")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=[s.name for s in STAGES])
    parser.add_argument("--stage", choices=[s.name for s in STAGES], help=argparse.SUPPRESS)  # one stage, in this process
    parser.add_argument("--print-run-command", action="store_true", help="the device tool call, as JSON")
    parser.add_argument("--print-predictions", action="store_true", help="the ahead-of-time table of benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.print_run_command:
        print(json.dumps({"command": RUN_COMMAND, "timeout_s": RUN_TIMEOUT_S, "carry": RUN_CARRY}))
        return 0
    if args.print_predictions:
        print(predictions_markdown())
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return STAGE_FUNCTIONS[args.stage](Context(out, args.dry_run, Results(out)))
    return orchestrate(out, args.dry_run, args.stages)


if __name__ == "__main__":
    sys.exit(main())
