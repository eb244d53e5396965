"""One decode step's linears on CPU: int8fx against its peers, every weight read from memory.

A model larger than the last-level cache reads each of its weights from memory once per
generated token, one row of activations at a time. ``bench_linear.py --cold`` times one linear
after evicting the caches; this times what a decoder's step actually runs: the linears of
``--layers`` decoder layers with distinct random weights, one after the other, each layer as
the compiled model calls them (q/k/v and gate/up grouped into one ``int8_linear_siblings``
call, o and down alone), M = 1. The default shapes are SmolLM2-135M's (hidden 576, q/o
576x576, k/v 576x192, gate/up 576x1536, down 1536x576; 30 layers: 106 MB of int8 weights).

Providers, each a whole step, interleaved over ``--rounds`` rounds (medians):
  * ``int8fx t=6`` / ``t=0``: the ops, without the fp weight (``Linear8bitLt``'s call);
  * ``_int_mm``: oneDNN's int8 GEMM per linear on a pre-quantized input (no quantization, no
    outliers, no dequantization: less work than LLM.int8());
  * ``fp32`` / ``bf16``: ``F.linear`` per linear with fp weights (4x and 2x the bytes).
The ``GB/s`` column is the weight bytes read per step over its time. Inputs have 0.1% outlier
columns, as ``bench_linear.py``'s. Prints a markdown table and writes ``bench_decode.csv``.

    python benchmarks/bench_decode.py [--layers 30] [--rounds 15] [--threads N] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from bench_linear import describe, make_activation
from report_table import format_cell, print_markdown_table, write_csv

import int8fx  # noqa: F401  (registers torch.ops.int8fx)

CSV_COLUMNS = ["provider", "layers", "weight_MB", "ms_per_step", "GB/s", "x_vs_fp32", "x_vs_int_mm"]
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "kv": 192}
SMOKE = {"hidden": 64, "intermediate": 96, "kv": 32}

Step = Callable[[], None]


def layer_groups(dims: dict[str, int]) -> list[list[tuple[int, int]]]:
    """One decoder layer's linears as (K, N), grouped as the compiled model calls them."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    return [[(h, h), (h, kv), (h, kv)], [(h, h)], [(h, i), (h, i)], [(i, h)]]


def make_weights(groups: list[list[tuple[int, int]]], layers: int) -> list[list[list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    return [[[torch.randn(N, K, generator=generator) * K**-0.5 for K, N in group] for group in groups] for _ in range(layers)]


def int8fx_step(weights, inputs, threshold: float) -> Step:
    quantized = [[[torch.ops.int8fx.quantize_weight(w) for w in group] for group in layer] for layer in weights]
    calls = []
    for layer in quantized:
        for group in layer:
            x = inputs[group[0][0].shape[1]]
            calls.append((x, [CB for CB, _ in group], [SCB for _, SCB in group], [None] * len(group)))

    def step() -> None:
        for x, CB, SCB, none in calls:
            torch.ops.int8fx.int8_linear_siblings(x, CB, SCB, none, threshold, none)

    return step


def int_mm_step(weights, inputs) -> Step:
    calls = []
    for layer in weights:
        for group in layer:
            for w in group:
                CB, _ = torch.ops.int8fx.quantize_weight(w)
                x = inputs[w.shape[1]]
                CA = (x / x.abs().amax() * 127).round().to(torch.int8)
                calls.append((CA, CB.t()))

    def step() -> None:
        for CA, CBt in calls:
            torch._int_mm(CA, CBt)

    return step


def fp_step(weights, inputs, dtype: torch.dtype) -> Step:
    calls = [(inputs[w.shape[1]].to(dtype), w.to(dtype)) for layer in weights for group in layer for w in group]

    def step() -> None:
        for x, w in calls:
            F.linear(x, w)

    return step


def interleaved_medians_ms(steps: dict[str, Step], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up: first-call costs (kernel selection, the outlier columns kept)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def run(dims: dict[str, int], layers: int, rounds: int) -> list[dict]:
    groups = layer_groups(dims)
    weights = make_weights(groups, layers)
    inputs = {K: make_activation(1, K, torch.float32, "cpu") for K in {K for group in groups for K, _ in group}}
    int8_bytes = sum(w.numel() for layer in weights for group in layer for w in group)
    steps = {
        "int8fx t=6": (int8fx_step(weights, inputs, 6.0), int8_bytes),
        "int8fx t=0": (int8fx_step(weights, inputs, 0.0), int8_bytes),
        "_int_mm": (int_mm_step(weights, inputs), int8_bytes),
        "fp32": (fp_step(weights, inputs, torch.float32), 4 * int8_bytes),
        "bf16": (fp_step(weights, inputs, torch.bfloat16), 2 * int8_bytes),
    }
    medians = interleaved_medians_ms({name: step for name, (step, _) in steps.items()}, rounds)
    return [
        {
            "provider": name,
            "layers": layers,
            "weight_MB": round(nbytes / 1e6, 1),
            "ms_per_step": medians[name],
            "GB/s": nbytes / medians[name] / 1e6,
            "x_vs_fp32": medians["fp32"] / medians[name],
            "x_vs_int_mm": medians["_int_mm"] / medians[name],
        }
        for name, (_, nbytes) in steps.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers, each with its own weights (default: SmolLM2-135M's 30)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="2 tiny layers, 2 rounds: checks that the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims, layers, rounds = (SMOKE, 2, 2) if args.smoke else (SMOLLM2, args.layers, args.rounds)
    print(describe("cpu"))
    print(f"{layers} layers of {dims}, M = 1, medians of {rounds} interleaved rounds (x: speed-up, higher is faster)")
    rows = run(dims, layers, rounds)
    header = ["provider", "weight MB", "ms per step", "GB/s", "x vs fp32", "x vs _int_mm"]
    cells = [
        [r["provider"], format_cell(r["weight_MB"]), format_cell(r["ms_per_step"], ".3f"), format_cell(r["GB/s"], ".1f")]
        + [format_cell(r[key], ".2f") for key in ("x_vs_fp32", "x_vs_int_mm")]
        for r in rows
    ]
    print_markdown_table(header, cells)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_decode.csv")
    write_csv(rows, path, CSV_COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
