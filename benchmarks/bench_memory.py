"""Process memory of a stack of linears: fp32 eager vs int8lt with ``release_weights=True``.

Prints a markdown table (MiB of RSS above a baseline taken after the compiler warmed up)
and writes ``bench_memory.csv``. ``--smoke`` runs a tiny model for the test suite.

    python benchmarks/bench_memory.py [--layers 8 --dim 4096] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from torch import nn

import int8fx
from int8fx import reference


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(layers: int, dim: int, inner: str) -> dict:
    torch.manual_seed(0)
    # Warm the compiler up on the same architecture at a tiny width, so that the baseline
    # already holds what compiling costs and the difference is the weights.
    warmup = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)]).requires_grad_(False)
    warm = torch.compile(warmup, backend=int8fx.int8lt(inner=inner, release_weights=True))
    warm(torch.randn(4, 64))
    warm(torch.randn(7, 64))
    torch.nn.functional.linear(torch.randn(4, dim), torch.randn(dim, dim))  # BLAS's own buffers for this width
    baseline = rss_mib()
    model = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).requires_grad_(False)
    fp32 = rss_mib() - baseline
    x = torch.randn(4, dim)
    expected = model(x)
    run = torch.compile(model, backend=int8fx.int8lt(inner=inner, release_weights=True))
    out = run(x)
    run(torch.randn(7, dim))  # a recompile after the release still works
    released = rss_mib() - baseline
    return {
        "layers": layers,
        "dim": dim,
        "fp32_weights_MiB": round(fp32, 1),
        "int8lt_released_MiB": round(released, 1),
        "ratio_vs_fp32": round(released / fp32, 3),
        "ratio_vs_fp16": round(released / (fp32 / 2), 3),
        "sqnr_dB": round(reference.sqnr_db(expected, out), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="tiny model, for the test suite")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.dim, args.inner = 2, 512, "eager"
    row = measure(args.layers, args.dim, args.inner)
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_memory.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
