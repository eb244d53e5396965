"""The evaluations behind ``python -m int8fx demo`` and ``eval``: one flat dict of results per model.

Causal LMs: perplexity on BBC News in floating point (eager, the reference), under int8lt
at the chosen threshold and at threshold 0 (naive int8, the contrast); linear-weight
memory; which layers were replaced; the outlier columns the layers saw; prefill time and
decode speed with a greedy sample, fp under inductor versus int8lt.

Sentence encoders: cosine similarity of int8lt versus fp mean-pooled embeddings of BBC
sentences.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

import torch

import int8fx
from int8fx import report as int8_report
from int8fx.cli.demo import measure, models
from int8fx.cli.demo.data import bbc_sentences, bbc_token_chunks
from int8fx.config import DEFAULT_SKIP, DEFAULT_THRESHOLD


@dataclass(frozen=True)
class EvalSettings:
    threshold: float = DEFAULT_THRESHOLD
    skip: tuple[str, ...] = DEFAULT_SKIP  # module paths int8lt keeps in fp (Int8LtConfig.skip)
    chunks: int = 4  # perplexity: chunks of running BBC text ...
    chunk_tokens: int = 512  # ... of this many tokens, BOS included
    timing: bool = True
    prefill_tokens: int = 128
    prefill_repeats: int = 3  # timed prefills per round
    timing_rounds: int = 2  # fp and int8lt timed in turns, this many times each; medians
    new_tokens: int = 32  # greedy decode; the first steps compile, see measure.DECODE_WARMUP_STEPS
    sentences: int = 64  # encoders: BBC sentences embedded
    inner: str = "inductor"  # int8lt's inner compiler (and whether the fp speed baseline is compiled)
    decoder_layers: Optional[int] = None  # causal LMs: keep only the first N blocks (smoke tests)
    dump_dir: Optional[str] = None


# Small enough for the test suite: one short chunk, a few decode steps, no inductor compile,
# two decoder blocks (tracing the whole of SmolLM2 takes most of a minute on 2 CPU cores).
QUICK = EvalSettings(
    chunks=1, chunk_tokens=32, prefill_tokens=16, prefill_repeats=1, new_tokens=5, sentences=8, inner="eager", decoder_layers=2
)


def _compile(model: torch.nn.Module, backend: Any) -> torch.nn.Module:
    # Every phase compiles the same model with another backend; a fresh dynamo cache per
    # phase keeps them from piling guards on one code object (and its recompile limit).
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def _backend_summary(backend: int8fx.Int8LtBackend, outliers: int8_report.OutlierStats) -> dict[str, Any]:
    replaced = measure.replaced_module_paths(backend.reports)
    skipped = {f"{layer.module_path}: {layer.reason}" for r in backend.reports for layer in r.skipped}
    hit = [stat for stat in outliers.values() if stat.columns]
    return {
        "graphs": len(backend.reports),
        "graphs_failed": sum(bool(r.error) for r in backend.reports),
        "layers_int8": len(replaced),
        "layers_fp": len(skipped),
        "layers_fp_reasons": sorted(skipped),
        "linear_layers": len(outliers),
        "outlier_layers": len(hit),
        "outlier_columns": sum(stat.columns for stat in hit),
        "outlier_summary": int8_report.outlier_summary(outliers),
        "max_abs_linear_input": max((stat.max_abs for stat in outliers.values()), default=0.0),
    }


def _memory(model: torch.nn.Module, backend: int8fx.Int8LtBackend) -> dict[str, float]:
    memory = measure.linear_memory(model, measure.replaced_module_paths(backend.reports))
    return {
        "linear_weights_fp32_mib": memory.fp32 / measure.MIB,
        "linear_weights_fp16_mib": memory.fp16 / measure.MIB,
        "linear_weights_int8lt_mib": memory.int8lt / measure.MIB,
    }


def _dump(settings: EvalSettings, backend: int8fx.Int8LtBackend, outliers: int8_report.OutlierStats) -> None:
    if settings.dump_dir:
        for graph_report in backend.reports:
            int8_report.write_graph_dump(settings.dump_dir, graph_report, outliers)


def _perplexity_keys(key: str, nlls: list[float], reference_nlls: list[float], chunks: list[torch.Tensor]) -> dict[str, Any]:
    """``key``: the perplexity; ``key_delta_pct`` and ``key_delta_se_pct``: its change over the
    reference and that change's standard error over the chunks (None for one chunk)."""
    change = measure.perplexity_change(nlls, reference_nlls)
    return {
        key: measure.perplexity_from_nlls(nlls, chunks),
        f"{key}_delta_pct": change.pct,
        f"{key}_delta_se_pct": change.standard_error_pct,
    }


def evaluate_causal_lm(name: str, model: torch.nn.Module, tokenizer: Any, settings: EvalSettings) -> dict[str, Any]:
    """Every causal-LM measurement of the module docstring, as one flat dict (units in the keys)."""
    if settings.decoder_layers is not None:
        total = models.keep_first_decoder_layers(model, settings.decoder_layers)
        name += f" (first {settings.decoder_layers} of {total} decoder layers)"
    chunks = bbc_token_chunks(tokenizer, settings.chunks, settings.chunk_tokens)
    result: dict[str, Any] = {
        "model": name,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "text": f"BBC News, {settings.chunks} x {settings.chunk_tokens} tokens with BOS",
        "threshold": settings.threshold,
        "inner": settings.inner,
    }
    nlls: dict[str, list[float]] = {}

    def reference_run() -> None:
        nlls["fp"] = measure.chunk_nlls(model, chunks, "perplexity fp (eager)")

    # The fp reference pass doubles as the outlier census: hooks see every linear's input.
    outliers = int8_report.count_outlier_columns(model, reference_run, settings.threshold)
    result["ppl_fp"] = measure.perplexity_from_nlls(nlls["fp"], chunks)
    backend = int8fx.int8lt(threshold=settings.threshold, skip=settings.skip, inner=settings.inner)
    nlls["int8lt"] = measure.chunk_nlls(_compile(model, backend), chunks, f"perplexity int8lt threshold {settings.threshold:g}")
    result.update(_perplexity_keys("ppl_int8lt", nlls["int8lt"], nlls["fp"], chunks))
    if settings.threshold > 0:
        naive = int8fx.int8lt(threshold=0.0, skip=settings.skip, inner=settings.inner)
        nlls["naive"] = measure.chunk_nlls(_compile(model, naive), chunks, "perplexity int8lt threshold 0")
        result.update(_perplexity_keys("ppl_int8lt_t0", nlls["naive"], nlls["fp"], chunks))
    result.update(_memory(model, backend))
    result.update(_backend_summary(backend, outliers))
    _dump(settings, backend, outliers)
    if settings.timing:
        result.update(_generation(model, tokenizer, chunks[0][:, : settings.prefill_tokens], settings))
    return result


def _generation(model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor, settings: EvalSettings) -> dict[str, Any]:
    torch._dynamo.reset()
    fp_label = "fp_inductor" if settings.inner == "inductor" else "fp_eager"
    backend = int8fx.int8lt(threshold=settings.threshold, skip=settings.skip, inner=settings.inner)
    # One module under two backends: dynamo guards every compiled graph on its backend.
    models = {
        fp_label: torch.compile(model) if settings.inner == "inductor" else model,
        "int8lt": torch.compile(model, backend=backend),
    }
    runs = measure.generate_in_turns(models, prompt, settings.new_tokens, settings.prefill_repeats, settings.timing_rounds)
    fp, q = runs[fp_label], runs["int8lt"]
    return {
        "prompt_tokens": prompt.shape[1],
        "prompt_tail": tokenizer.decode(prompt[0, 1:])[-80:],
        "fp_speed_baseline": fp_label,
        "timing_rounds": settings.timing_rounds,
        "prefill_ms_fp": statistics.median(r.prefill_ms for r in fp),
        "prefill_ms_int8lt": statistics.median(r.prefill_ms for r in q),
        "decode_tokens_per_s_fp": statistics.median(r.decode_tokens_per_s for r in fp),
        "decode_tokens_per_s_int8lt": statistics.median(r.decode_tokens_per_s for r in q),
        "sample_fp": tokenizer.decode(fp[0].new_token_ids),
        "sample_int8lt": tokenizer.decode(q[0].new_token_ids),
    }


def evaluate_encoder(name: str, model: torch.nn.Module, tokenizer: Any, settings: EvalSettings) -> dict[str, Any]:
    """Cosine similarity of int8lt versus fp sentence embeddings (mean over BBC sentences, and the worst)."""
    sentences = bbc_sentences(settings.sentences)
    # Truncation bound of all-MiniLM-L6-v2's sentence-transformers config; BBC sentences fit.
    batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt"))
    embeddings: dict[str, torch.Tensor] = {}

    def reference_run() -> None:
        embeddings["fp"] = measure.sentence_embeddings(model, batch)

    outliers = int8_report.count_outlier_columns(model, reference_run, settings.threshold)
    backend = int8fx.int8lt(threshold=settings.threshold, skip=settings.skip, inner=settings.inner)
    cosine = measure.cosine_similarities(embeddings["fp"], measure.sentence_embeddings(_compile(model, backend), batch))
    result: dict[str, Any] = {
        "model": name,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "text": f"BBC News, {len(sentences)} sentences",
        "threshold": settings.threshold,
        "inner": settings.inner,
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
    }
    if settings.threshold > 0:
        naive = int8fx.int8lt(threshold=0.0, skip=settings.skip, inner=settings.inner)
        cosine_t0 = measure.cosine_similarities(embeddings["fp"], measure.sentence_embeddings(_compile(model, naive), batch))
        result.update(cosine_mean_t0=float(cosine_t0.mean()), cosine_min_t0=float(cosine_t0.min()))
    result.update(_memory(model, backend))
    result.update(_backend_summary(backend, outliers))
    _dump(settings, backend, outliers)
    return result
