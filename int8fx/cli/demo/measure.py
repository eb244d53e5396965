"""Measurements of a model in floating point and under ``int8lt``: quality, memory, speed.

Every function takes the callable to measure (an eager or compiled model) so the same
code measures the fp reference, the fp model under inductor and the int8lt model.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from int8fx.cli.demo.progress import track
from int8fx.report import GraphReport

Model = Callable[..., Any]
MIB = 2**20


# ---------------------------------------------------------------- quality


def chunk_nlls(model: Model, chunks: Sequence[torch.Tensor], description: str) -> list[float]:
    """Mean next-token NLL of each chunk ``[1, T]`` (nats per predicted token)."""
    nlls = []
    with torch.no_grad():
        for ids in track(chunks, description, len(chunks)):
            logits = model(input_ids=ids, use_cache=False).logits
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="mean")
            nlls.append(float(nll))
    return nlls


def perplexity_from_nlls(nlls: Sequence[float], chunks: Sequence[torch.Tensor]) -> float:
    """``exp(mean next-token NLL)`` over every predicted token, from :func:`chunk_nlls`."""
    tokens = [ids[:, 1:].numel() for ids in chunks]
    return math.exp(sum(n * t for n, t in zip(nlls, tokens)) / sum(tokens))


def perplexity(model: Model, chunks: Sequence[torch.Tensor], description: str) -> float:
    """``exp(mean next-token NLL)`` over every predicted token of every chunk."""
    return perplexity_from_nlls(chunk_nlls(model, chunks, description), chunks)


@dataclass(frozen=True)
class PerplexityChange:
    """How much a model's perplexity rose over a reference's, on the same chunks."""

    pct: float  # (ppl / ppl_reference - 1) * 100
    # Standard error of ``pct`` from the chunk-to-chunk spread of the paired NLL
    # differences (None below 2 chunks): a change under about twice this is noise.
    standard_error_pct: Optional[float]


def perplexity_change(nlls: Sequence[float], reference_nlls: Sequence[float]) -> PerplexityChange:
    """Relative perplexity change of ``nlls`` over ``reference_nlls``: per-chunk mean NLLs
    (:func:`chunk_nlls`) of the same chunks, all of one length (as ``bbc_token_chunks`` cuts them)."""
    if len(nlls) != len(reference_nlls) or not nlls:
        raise ValueError(f"need the same non-zero number of chunks, got {len(nlls)} and {len(reference_nlls)}")
    differences = [a - b for a, b in zip(nlls, reference_nlls)]
    ratio = math.exp(statistics.fmean(differences))
    error = None
    if len(differences) > 1:
        # d(ratio) = ratio * d(mean difference): the delta method on exp.
        error = 100 * ratio * statistics.stdev(differences) / math.sqrt(len(differences))
    return PerplexityChange((ratio - 1) * 100, error)


def sentence_embeddings(model: Model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled ``last_hidden_state`` over the real (non-padding) tokens, as sentence-transformers does."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def cosine_similarities(reference: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two ``[rows, features]`` embedding matrices."""
    return F.cosine_similarity(reference.double(), approximation.double(), dim=-1)


# ---------------------------------------------------------------- memory


@dataclass
class LinearMemory:
    """Bytes of the ``nn.Linear`` weights, each shared weight counted once."""

    fp32: int
    fp16: int
    int8lt: int  # replaced weights as int8 + one fp32 scale per output row; the others as stored


def replaced_module_paths(reports: Iterable[GraphReport]) -> set[str]:
    return {layer.module_path for report in reports for layer in report.replaced}


def linear_memory(model: torch.nn.Module, replaced: set[str]) -> LinearMemory:
    """What the linear weights take in fp32, in fp16, and with int8lt's replaced layers in int8.

    A tied weight (SmolLM2's ``lm_head`` is the embedding matrix) is counted once, as
    int8 only if every linear using it was replaced.
    """
    weights: dict[int, tuple[torch.Tensor, bool]] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            _, all_replaced = weights.get(id(weight), (weight, True))
            weights[id(weight)] = (weight, all_replaced and path in replaced)
    fp32 = fp16 = int8lt = 0
    for weight, is_int8 in weights.values():
        fp32 += weight.numel() * 4
        fp16 += weight.numel() * 2
        int8lt += (weight.numel() + weight.shape[0] * 4) if is_int8 else weight.numel() * weight.element_size()
    return LinearMemory(fp32, fp16, int8lt)


# ---------------------------------------------------------------- speed


@dataclass
class GenerationResult:
    prefill_ms: float  # median over the timed prefills (after one warm-up call that compiles)
    decode_tokens_per_s: float  # over the decode steps after the warm-up steps
    new_token_ids: list[int]
    seconds: float = 0.0  # wall time of the whole call, warm-ups and compiles included


# Decode steps run before timing: the first compiles the one-token graph, the second
# recompiles it with a dynamic cache length (dynamo's automatic dynamic shapes).
DECODE_WARMUP_STEPS = 2


def accepts_logits_to_keep(model: Model) -> bool:
    forward = getattr(model, "_orig_mod", model).forward  # through torch.compile's wrapper
    return "logits_to_keep" in inspect.signature(forward).parameters


def greedy_generate(model: Model, prompt: torch.Tensor, new_tokens: int, prefill_repeats: int, description: str) -> GenerationResult:
    """Times prefill of ``prompt [1, T]`` and greedy decoding of ``new_tokens`` tokens with a KV cache."""
    from transformers import DynamicCache

    if new_tokens <= DECODE_WARMUP_STEPS + 1:
        raise ValueError(f"new_tokens must be > {DECODE_WARMUP_STEPS + 1} to time any decode step, got {new_tokens}")

    # Only the last position's logits are needed to pick the next token: ask for just those,
    # as transformers' generate() does (logits_to_keep=1), where the model supports it.
    last_logits_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def prefill():
        cache = DynamicCache()
        return model(input_ids=prompt, past_key_values=cache, use_cache=True, **last_logits_only).logits, cache

    call_start = time.perf_counter()
    prefill_times = []
    with torch.no_grad():
        for i in track(
            range(prefill_repeats + 1), f"{description}: prefill (a warm-up call, then {prefill_repeats} timed)", prefill_repeats + 1
        ):
            start = time.perf_counter()
            logits, cache = prefill()
            if i:
                prefill_times.append(time.perf_counter() - start)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated = [int(token)]
        decode_start = None
        for step in track(range(new_tokens - 1), f"{description}: decode", new_tokens - 1):
            if step == DECODE_WARMUP_STEPS:
                decode_start = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            generated.append(int(token))
        timed_steps = new_tokens - 1 - DECODE_WARMUP_STEPS
        decode_tokens_per_s = timed_steps / (time.perf_counter() - decode_start)
    return GenerationResult(statistics.median(prefill_times) * 1e3, decode_tokens_per_s, generated, time.perf_counter() - call_start)


# Models timed in turns stay compiled together, and each compiles the same forward code
# (prefill, decode, decode with a dynamic cache length): room for all their dynamo cache entries.
_RECOMPILE_LIMIT_IN_TURNS = 64


def generate_in_turns(
    models: dict[str, Model],
    prompt: torch.Tensor,
    new_tokens: int,
    prefill_repeats: int,
    rounds: int,
    on_error: Optional[Callable[[str, Exception], None]] = None,
) -> dict[str, list[GenerationResult]]:
    """``greedy_generate`` for every model, ``rounds`` times, the models taking turns in an order
    rotated from round to round: a shared machine's speed drifts over minutes, and timing one model
    after the other would put that drift into their ratios. Each round's untimed warm-up calls
    compile (first round) or re-warm the caches the other models evicted. A model that raises is
    dropped and reported to ``on_error`` when given; without it the error propagates."""
    results: dict[str, list[GenerationResult]] = {name: [] for name in models}
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT_IN_TURNS):
        for round_index in range(rounds):
            names = list(results)
            if not names:
                break
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                description = f"{name}, round {round_index + 1}/{rounds}"
                try:
                    results[name].append(greedy_generate(models[name], prompt, new_tokens, prefill_repeats, description))
                except Exception as error:
                    if on_error is None:
                        raise
                    on_error(name, error)
                    del results[name]
    return results
