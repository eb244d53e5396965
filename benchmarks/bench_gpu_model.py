"""A 1.1 B-parameter Llama on one GPU: bf16 inductor against int8lt threshold 6, with and without CUDA graphs.

Nothing is downloaded. The model is transformers' ``LlamaForCausalLM`` built from a config with
random weights: 4 decoder layers at Llama-3-8B's widths (hidden 4096, MLP 14336, 32 query and 8
KV heads, so every linear has a shape of ``bench_linear.py``'s table) and a 32k vocabulary,
1.13 B parameters. Few, wide layers keep inductor's compile time, which grows with depth, inside
the GPU check's budget. Planted outlier features: the RMSNorm weights of ``outlier_dims`` are
set to ``OUTLIER_SCALE``, so the inputs of q/k/v and gate/up carry those columns at |x| of tens
(threshold 6 catches them), the emergent features LLM.int8() was built for; the weights' scale
(``weight_std``) keeps every other activation below the threshold.

Per provider, on the same prompt of random tokens:

* ``compile s``: wall time of the first prefill and the first decode step (dynamo, inductor,
  int8lt's rewrite and the Triton kernels' autotuning);
* ``prefill ms``: ``prompt_tokens`` (2048) into a static KV cache, logits of every position (the
  ``lm_head``, kept in bf16 by int8lt, costs every provider the same), median of 3;
* ``decode tokens/s``: ``new_tokens`` (128) greedy tokens, one forward per token, median of 3 runs;
* ``SQNR vs fp32 dB``: the prefill logits against fp32 eager; ``SQNR vs reference dB`` (int8lt
  rows): against the pure-torch LLM.int8() (``int8fx.reference`` on the same device, its int8
  products exact in fp64; a CPU int64 reference would take minutes at this size);
* ``tokens as fp32``: greedy tokens equal to fp32 eager's before the first difference (random
  weights give flat logits, so small differences flip early: a diagnostic, not a quality score).

``int8lt`` with ``mode="reduce-overhead"`` is tried as a user writes it; if torch.compile rejects
it (it passes ``mode`` to a custom backend), CUDA graphs come from inductor's config instead
(``triton.cudagraphs``) and the row says so.

    python benchmarks/bench_gpu_model.py [--out DIR]      # on a GPU
    python benchmarks/bench_gpu_model.py --dry-run        # CPU, a 2-layer toy: checks the plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from report_table import format_cell, print_markdown_table, write_csv
from torch import nn

import int8fx
from int8fx import reference

THRESHOLD = 6.0
OUTLIER_SCALE = 30.0
CSV_COLUMNS = [
    "provider",
    "cuda_graphs",
    "note",
    "int8_linears",
    "compile_s",
    "prefill_ms",
    "decode_tokens_per_s",
    "prefill_x_vs_bf16",
    "decode_x_vs_bf16",
    "sqnr_vs_fp32_db",
    "sqnr_vs_reference_db",
    "tokens_as_fp32",
]


@dataclass(frozen=True)
class Setup:
    device: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prompt_tokens: int
    new_tokens: int
    outlier_dims: tuple[int, ...]
    compiler: str  # inductor, or aot_eager for the dry run (inductor's CPU compiles take minutes on 2 cores)
    warmups: int  # untimed prefill + decode runs after the compiling one (CUDA graphs: warm-up, recording)
    repeats: int  # timed runs, median


GPU_SETUP = Setup("cuda", 4096, 14336, 4, 32, 8, 32000, 2048, 128, (17, 1234, 2890), "inductor", warmups=2, repeats=3)
# The dry run: a prompt of 17 tokens takes the large-M path (quantize + GEMM), decode the small-M kernel.
DRY_SETUP = Setup("cpu", 64, 128, 2, 4, 2, 256, 17, 2, (3, 40), "aot_eager", warmups=1, repeats=1)

# (name, int8lt?, CUDA graphs?): the CUDA-graph rows first, they carry the targets (decode is
# launch-bound without them); a stage that runs out of time still has them.
PROVIDERS = [
    ("bf16 inductor, CUDA graphs", False, True),
    ("int8lt t=6, CUDA graphs", True, True),
    ("bf16 inductor", False, False),
    ("int8lt t=6", True, False),
]


_CPU_SHIM: Optional[torch.library.Library] = None


def route_int8_linear_to_triton_on_cpu() -> None:
    """Dry runs: CPU calls of ``int8fx::int8_linear`` (and ``int8_linear_siblings``) run the CUDA path's Triton kernels (interpreted
    under ``TRITON_INTERPRET=1``), so a dry run exercises the code the GPU runs, not the CPU library."""
    global _CPU_SHIM
    from int8fx import ops
    from int8fx.kernels import cuda

    if _CPU_SHIM is None:
        _CPU_SHIM = torch.library.Library("int8fx", "IMPL")
        cuda.register(_CPU_SHIM, ops.check_int8_linear_call, ops.check_int8_linear_siblings_call, dispatch_key="CPU")


# ---------------------------------------------------------------- the model


def build_model(setup: Setup) -> nn.Module:
    """fp32 ``LlamaForCausalLM`` with random weights and planted outlier features, on ``setup.device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        vocab_size=setup.vocab,
        max_position_embeddings=2 * (setup.prompt_tokens + setup.new_tokens),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    config.initializer_range = weight_std(setup)
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(setup.outlier_dims)] = OUTLIER_SCALE
    return model.eval().requires_grad_(False)


def weight_std(setup: Setup) -> float:
    """Initial weight std giving the gate/up outputs a std of 0.5 (RMSNorm's outputs have unit
    scale, ``OUTLIER_SCALE`` in the planted dimensions). Then ``silu(gate) * up``, the input of
    ``down_proj``, stays far below threshold 6, and the planted dimensions are the only outlier
    columns, as in real models; transformers' default 0.02 would give gate/up a std of 1.6 and
    make a few percent of ``down_proj``'s inputs outliers, hence nearly every column at prefill."""
    return 0.5 / math.sqrt(setup.hidden + len(setup.outlier_dims) * OUTLIER_SCALE**2)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exact_int8_matmul(CA: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """``CA @ CB.T`` exactly on any device: in fp64 every product (<= 127**2) and partial sum
    (<= 127**2 * K) is an integer below 2**53. CUDA has no int64 matmul for ``reference.int8_matmul``."""
    return (CA.double() @ CB.double().t()).to(torch.int32)


class ReferenceInt8Linear(nn.Module):
    """``nn.Linear`` through ``int8fx.reference.int8_linear`` (fp outlier weights, as int8lt's default)."""

    def __init__(self, linear: nn.Linear, threshold: float):
        super().__init__()
        self.weight, self.bias, self.threshold = linear.weight, linear.bias, threshold
        self.CB, self.SCB = reference.quantize_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.int8_linear(x, self.CB, self.SCB, self.bias, self.threshold, self.weight)


def reference_int8_model(model: nn.Module, threshold: float) -> nn.Module:
    """A copy of ``model`` whose linears but ``lm_head`` (int8lt's default skip) run the reference."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not model.lm_head:
                setattr(module, name, ReferenceInt8Linear(child, threshold))
    return model


@contextlib.contextmanager
def exact_reference_products():
    saved = reference.int8_matmul
    reference.int8_matmul = exact_int8_matmul
    try:
        yield
    finally:
        reference.int8_matmul = saved


# ---------------------------------------------------------------- prefill and greedy decode


class Runner:
    """One model (eager or compiled) with its own static KV cache, for prefill and greedy decode."""

    def __init__(self, model: nn.Module, step_model: Callable, setup: Setup, prompt: torch.Tensor):
        from transformers import StaticCache

        self.setup, self.prompt, self.step_model = setup, prompt, step_model
        self.cache = StaticCache(config=model.config, max_cache_len=setup.prompt_tokens + setup.new_tokens)
        device = prompt.device
        self.prompt_positions = torch.arange(setup.prompt_tokens, device=device)
        # One tensor per step, made ahead: nothing but the forward runs inside the timed loop.
        self.decode_positions = [torch.tensor([setup.prompt_tokens + i], device=device) for i in range(setup.new_tokens)]
        with torch.no_grad():  # the cache allocates (and marks static) its tensors eagerly, outside any graph
            model(input_ids=prompt, past_key_values=self.cache, cache_position=self.prompt_positions, use_cache=True)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay are no longer read
        with torch.no_grad():
            return self.step_model(input_ids=tokens, past_key_values=self.cache, cache_position=positions, use_cache=True).logits

    def prefill(self) -> torch.Tensor:
        # transformers' static cache writes at its own running length, not at cache_position:
        # a new prompt starts from an empty cache.
        self.cache.reset()
        return self.forward(self.prompt, self.prompt_positions)

    def decode(self, first: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy tokens ``[1, steps]`` after ``first`` (``[1, 1]``); no host sync inside."""
        token, tokens = first, []
        for position in self.decode_positions[:steps]:
            token = self.forward(token, position)[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def first_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


def matching_prefix(tokens: torch.Tensor, expected: torch.Tensor) -> int:
    differ = (tokens != expected).flatten().nonzero()
    return int(differ[0]) if differ.numel() else tokens.numel()


# ---------------------------------------------------------------- providers


@dataclass
class Compiled:
    model: Callable
    patch: contextlib.AbstractContextManager  # active while the first calls compile
    note: str = ""
    backend: Optional[int8fx.Int8LtBackend] = None  # int8lt's, with its reports


def int8lt_backend(setup: Setup) -> int8fx.Int8LtBackend:
    return int8fx.int8lt(threshold=THRESHOLD, inner="inductor" if setup.compiler == "inductor" else "eager")


def compile_model(model: nn.Module, int8lt: bool, cuda_graphs: bool, setup: Setup) -> Compiled:
    """``torch.compile`` as a user writes it."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if cuda_graphs else None
    backend = int8lt_backend(setup) if int8lt else None
    compiled = torch.compile(model, backend=backend or setup.compiler, mode=mode, dynamic=False)
    return Compiled(compiled, contextlib.nullcontext(), backend=backend)


def int8lt_with_inductor_cudagraphs(model: nn.Module, setup: Setup) -> Compiled:
    """int8lt with CUDA graphs where torch.compile refuses ``mode`` for a custom backend:
    inductor's ``triton.cudagraphs``, set while the graphs compile, is what the mode sets."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    backend = int8lt_backend(setup)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    note = "mode='reduce-overhead' refused; CUDA graphs via inductor config triton.cudagraphs"
    return Compiled(compiled, inductor_config.patch({"triton.cudagraphs": True}), note, backend)


def int8_linear_count(compiled: Compiled) -> str:
    """Linears int8lt replaced, over its graphs ("" for other compilers); 0 would mean an int8lt
    row measured bf16 (a graph int8lt could not rewrite is compiled unchanged)."""
    if compiled.backend is None:
        return ""
    failed = [report.error for report in compiled.backend.reports if report.error]
    for error in failed:
        print(f"int8lt left a graph in floating point: {error}")
    return str(sum(len(report.replaced) for report in compiled.backend.reports))


def measure_provider(
    name: str, model: nn.Module, int8lt: bool, cuda_graphs: bool, setup: Setup, prompt: torch.Tensor, references: dict
) -> dict:
    device = setup.device
    compiled = compile_model(model, int8lt, cuda_graphs, setup)
    runner = Runner(model, compiled.model, setup, prompt)

    def prefill_and_decode(steps: int) -> torch.Tensor:
        # Every decode starts from the latest prefill's logits: a CUDA-graph output is
        # overwritten by the next replay, so none is read after another call.
        return runner.decode(first_token(runner.prefill()), steps)

    start = time.perf_counter()
    try:
        with compiled.patch:
            timed(lambda: prefill_and_decode(1), device)
    except Exception as error:
        if not (int8lt and cuda_graphs and "mode" in str(error)):
            raise
        lines = str(error).splitlines()
        reason = next((line for line in lines if "mode" in line and "raised" not in line), lines[0] if lines else "")
        print(f"{name}: torch.compile(backend=int8lt, mode='reduce-overhead') failed: {type(error).__name__}: {reason[:300]}")
        compiled = int8lt_with_inductor_cudagraphs(model, setup)
        runner = Runner(model, compiled.model, setup, prompt)
        start = time.perf_counter()
        with compiled.patch:
            timed(lambda: prefill_and_decode(1), device)
    compile_s = time.perf_counter() - start
    with compiled.patch:
        for _ in range(setup.warmups):  # CUDA graphs: a warm-up run, then the recording
            timed(lambda: prefill_and_decode(2), device)
    prefill_times = []
    for _ in range(setup.repeats):
        logits, seconds = timed(runner.prefill, device)
        prefill_times.append(seconds)
    logits = logits.float()  # a copy, taken before the next call can overwrite a CUDA-graph output
    decode_times = []
    for _ in range(setup.repeats):
        first = first_token(runner.prefill())
        tokens, seconds = timed(lambda first=first: runner.decode(first, setup.new_tokens), device)
        decode_times.append(seconds)
    row = {
        "provider": name,
        "cuda_graphs": cuda_graphs,
        "note": compiled.note,
        "int8_linears": int8_linear_count(compiled),
        "compile_s": compile_s,
        "prefill_ms": statistics.median(prefill_times) * 1e3,
        "decode_tokens_per_s": setup.new_tokens / statistics.median(decode_times),
        "sqnr_vs_fp32_db": reference.sqnr_db(references["fp32 logits"], logits),
        "sqnr_vs_reference_db": reference.sqnr_db(references["int8 logits"], logits) if int8lt else "",
        "tokens_as_fp32": matching_prefix(tokens, references["fp32 tokens"]),
    }
    return row


def add_ratios(rows: list[dict]) -> None:
    """``x vs bf16``: the bf16 inductor row with the same CUDA-graph setting; above 1 is faster."""
    for row in rows:
        base = next((r for r in rows if r["provider"].startswith("bf16 inductor") and r["cuda_graphs"] == row["cuda_graphs"]), None)
        row["prefill_x_vs_bf16"] = base["prefill_ms"] / row["prefill_ms"] if base else ""
        row["decode_x_vs_bf16"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else ""


# ---------------------------------------------------------------- issue 16: loading straight into int8


def loading_peak_memory(setup: Setup, on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """The same model saved as sharded bf16 safetensors, then loaded in bf16 and straight into int8
    (``int8fx.Int8fxConfig``, issue 16) on the device: each load's peak and resident device memory,
    whether the int8 model's first forward is finite, and the seconds of each step. ``on_step(data)``
    after each step, so a time limit keeps what was measured."""
    import tempfile

    from transformers import AutoModelForCausalLM

    data = {}

    def step(name: str, fn: Callable):
        start = time.perf_counter()
        result = fn()
        if setup.device == "cuda":
            torch.cuda.synchronize()
        data[f"{name} s"] = time.perf_counter() - start
        if on_step is not None:
            on_step(data)
        return result

    model = build_model(setup).to(torch.bfloat16)
    prompt = torch.randint(0, setup.vocab, (1, 16), generator=torch.Generator().manual_seed(2)).to(setup.device)
    with tempfile.TemporaryDirectory() as folder:
        step("save", functools.partial(model.save_pretrained, folder, max_shard_size="500MB"))
        del model
        for name, options in (("bf16", {}), ("int8fx", {"quantization_config": int8fx.Int8fxConfig()})):
            if setup.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            load = functools.partial(AutoModelForCausalLM.from_pretrained, folder, dtype=torch.bfloat16, device_map=setup.device, **options)
            loaded = step(f"{name} load", load)
            if setup.device == "cuda":
                data[f"{name} load peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
                data[f"{name} resident GiB"] = torch.cuda.memory_allocated() / 2**30
            with torch.no_grad():
                logits = step(f"{name} first forward", functools.partial(loaded, input_ids=prompt)).logits
            data[f"{name} forward finite"] = bool(torch.isfinite(logits).all())
            del loaded, logits
            if on_step is not None:
                on_step(data)
    return data


# ---------------------------------------------------------------- main


def references(model32: nn.Module, model16: nn.Module, setup: Setup, prompt: torch.Tensor) -> dict:
    """fp32 eager logits and greedy tokens, and the pure-torch LLM.int8() model's logits."""
    runner = Runner(model32, model32, setup, prompt)
    fp32_logits = runner.prefill().float()
    fp32_tokens = runner.decode(first_token(fp32_logits), setup.new_tokens)
    del runner
    int8_model = reference_int8_model(model16, THRESHOLD)
    with torch.no_grad(), exact_reference_products():
        int8_logits = int8_model(input_ids=prompt).logits.float()
    bf16_logits = model16(input_ids=prompt).logits.float()
    del int8_model
    return {
        "fp32 logits": fp32_logits,
        "fp32 tokens": fp32_tokens,
        "int8 logits": int8_logits,
        "sqnr": {
            "bf16 eager vs fp32 dB": reference.sqnr_db(fp32_logits, bf16_logits),
            "int8 reference vs fp32 dB": reference.sqnr_db(fp32_logits, int8_logits),
        },
    }


def run(setup: Setup, out: Optional[str] = None, on_row: Optional[Callable[[list[dict], dict], None]] = None) -> tuple[list[dict], dict]:
    """Measures every provider; ``on_row(rows, info)`` after each (partial results survive a time limit)."""
    model32 = build_model(setup)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    prompt = torch.randint(0, setup.vocab, (1, setup.prompt_tokens), generator=torch.Generator().manual_seed(1)).to(setup.device)
    info = {"setup": asdict(setup), "parameters": parameter_count(model16), "threshold": THRESHOLD, "torch": torch.__version__}
    refs, seconds = timed(functools.partial(references, model32, model16, setup, prompt), setup.device)
    info["reference_sqnr"] = refs["sqnr"]
    info["reference_s"] = seconds
    print(
        f"model: {info['parameters'] / 1e9:.3f} B parameters; references in {seconds:.1f} s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in refs["sqnr"].items())
    )
    del model32
    rows: list[dict] = []
    for name, int8lt, cuda_graphs in PROVIDERS:
        try:
            rows.append(measure_provider(name, model16, int8lt, cuda_graphs, setup, prompt, refs))
        except Exception as error:  # one provider's failure must not cost the others
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            print(f"{name}: FAILED: {message}")
            info.setdefault("failed", {})[name] = message
        add_ratios(rows)
        print(f"{name}: done")
        if on_row:
            on_row(rows, info)
        if out:
            write_csv(rows, os.path.join(out, "gpu_model.csv"), CSV_COLUMNS)
    return rows, info


# (column header, row key, format) of the model table, here and in gpu_check's summary.
TABLE_COLUMNS = [
    ("provider", "provider", ""),
    ("int8 linears", "int8_linears", ""),
    ("compile s", "compile_s", ".1f"),
    ("prefill ms", "prefill_ms", ".2f"),
    ("decode tokens/s", "decode_tokens_per_s", ".1f"),
    ("prefill x vs bf16", "prefill_x_vs_bf16", ".2f"),
    ("decode x vs bf16", "decode_x_vs_bf16", ".2f"),
    ("SQNR vs fp32 dB", "sqnr_vs_fp32_db", ".1f"),
    ("SQNR vs reference dB", "sqnr_vs_reference_db", ".1f"),
    ("tokens as fp32", "tokens_as_fp32", ""),
]


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The model table's header and cells."""
    header = [name for name, _, _ in TABLE_COLUMNS]
    return header, [[format_cell(r[key], spec) for _, key, spec in TABLE_COLUMNS] for r in rows]


def print_table(rows: list[dict]) -> None:
    print_markdown_table(*table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a 2-layer toy model: checks that the script runs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, info = run(DRY_SETUP if args.dry_run else GPU_SETUP, args.out)
    print_table(rows)
    print(json.dumps(info, default=str))


if __name__ == "__main__":
    main()
