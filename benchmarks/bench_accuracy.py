"""SmolLM2-135M perplexity on BBC News: int8lt against bitsandbytes, side by side in one run.

Every provider reads the same token chunks (BOS + 511 tokens each, consecutive text), so
the differences are the methods', not the text's. Perplexity differences between int8
methods at a few thousand tokens are small; use ``--chunks 16`` or more to see them above
the noise. The table's s.e. column is the standard error of each change, from how much
the per-chunk differences to fp32 vary: changes within about two of it are noise. Prints
a markdown table and writes ``bench_accuracy.csv``.

    python benchmarks/bench_accuracy.py [--chunks 16] [--providers TEXT ...] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Callable, Optional

import torch
from report_table import format_cell, print_markdown_table, write_csv
from torch import nn

import int8fx
from int8fx.cli.demo.data import bbc_token_chunks
from int8fx.cli.demo.measure import chunk_nlls, perplexity_change, perplexity_from_nlls
from int8fx.cli.demo.models import keep_first_decoder_layers, load_smollm2
from int8fx.paths import matches_skip

SKIP = ("lm_head",)  # as Hugging Face's load_in_8bit does


def int8lt(model: nn.Module, threshold: float, outlier_weights: str, skip: tuple[str, ...] = SKIP, tied_head: bool = False) -> Callable:
    torch._dynamo.reset()
    backend = int8fx.int8lt(threshold=threshold, outlier_weights=outlier_weights, skip=skip, inner="eager", quantize_tied_heads=tied_head)
    return torch.compile(model, backend=backend)


def bitsandbytes_swap(model: nn.Module, threshold: float) -> nn.Module:
    """``load_in_8bit``'s module swap, in eval mode (in training mode bitsandbytes' CPU
    backend switches to weight-only int8)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if isinstance(child, nn.Linear) and not matches_skip(full, SKIP):
                swapped = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    has_fp16_weights=False,
                    threshold=threshold,
                )
                swapped.load_state_dict(child.state_dict())
                setattr(module, name, swapped.to("cpu").eval())
    return model


def providers(model: nn.Module) -> dict[str, Callable[[], Callable]]:
    table = {
        "fp32 eager": lambda: model,
        "int8lt t=6 (fp outlier columns, default)": lambda: int8lt(model, 6.0, "fp"),
        "int8lt t=6 (int8 outlier columns, as bitsandbytes)": lambda: int8lt(model, 6.0, "int8"),
        "int8lt t=0 (naive int8)": lambda: int8lt(model, 0.0, "int8"),
        # The most sensitive layers (a per-type sweep: keeping v_proj in fp removes most of
        # the gap), kept in fp32 through the skip list: 3% of the linear weights.
        "int8lt t=6, v_proj in fp (skip)": lambda: int8lt(model, 6.0, "fp", SKIP + ("v_proj",)),
        # The other direction: lm_head (tied to the embedding, so skipped by default) in int8
        # too. It is a fifth of the weight bytes read per decoded token in fp32.
        "int8lt t=6, lm_head in int8 too (skip nothing)": lambda: int8lt(model, 6.0, "fp", (), tied_head=True),
    }
    try:
        import bitsandbytes  # noqa: F401

        table["bitsandbytes t=6"] = lambda: bitsandbytes_swap(model, 6.0)
        table["bitsandbytes t=0"] = lambda: bitsandbytes_swap(model, 0.0)
    except ImportError:
        print("bitsandbytes is not installed: its rows are skipped (scripts/install_bnb.sh)")
    return table


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--providers", nargs="*", metavar="TEXT", help="only the providers whose name contains one of these (fp32 eager always runs)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 decoder layers, 2 chunks of 32 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.chunks, args.chunk_tokens = 2, 32
    return args


def load_model_and_chunks(args: argparse.Namespace) -> tuple[nn.Module, list[torch.Tensor]]:
    """SmolLM2 in fp32 eval mode (its first 2 blocks for --smoke) and the BBC chunks every provider reads."""
    model, tokenizer = load_smollm2()
    model.eval().requires_grad_(False)
    if args.smoke:
        keep_first_decoder_layers(model, 2)
    return model, bbc_token_chunks(tokenizer, args.chunks, args.chunk_tokens)


def measure_providers(table: dict[str, Callable[[], Callable]], chunks: list[torch.Tensor], only: Optional[list[str]]) -> list[dict]:
    """Perplexity of every provider (the first is the baseline) on the same chunks; one row each."""
    rows = []
    baseline = None
    for name, make in table.items():
        if only and baseline is not None and not any(text in name for text in only):
            continue
        start = time.perf_counter()
        nlls = chunk_nlls(make(), chunks, name)
        baseline = baseline or nlls
        change = perplexity_change(nlls, baseline)
        error = change.standard_error_pct
        rows.append(
            {
                "provider": name,
                "perplexity": round(perplexity_from_nlls(nlls, chunks), 4),
                "vs_fp32_pct": round(change.pct, 2),
                "standard_error_pct": None if error is None else round(error, 2),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def report(rows: list[dict], title: str, out_dir: str, csv_name: str) -> None:
    print(f"\n{title}")
    print("s.e.: standard error of the change, from the spread of the per-chunk NLL differences to fp32\n")
    print_markdown_table(
        ["provider", "perplexity", "vs fp32 (%)", "s.e. (pt)", "seconds"],
        [
            [
                row["provider"],
                f"{row['perplexity']:.4f}",
                f"{row['vs_fp32_pct']:+.2f}",
                format_cell("" if row["standard_error_pct"] is None else row["standard_error_pct"], ".2f"),
                f"{row['seconds']:.0f}",
            ]
            for row in rows
        ],
    )
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, csv_name), list(rows[0]))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    model, chunks = load_model_and_chunks(args)
    rows = measure_providers(providers(model), chunks, args.providers)
    tokens = args.chunks * (args.chunk_tokens - 1)
    report(
        rows,
        f"SmolLM2-135M, BBC News, {args.chunks} chunks x {args.chunk_tokens} tokens ({tokens} predicted tokens)",
        args.out,
        "bench_accuracy.csv",
    )


if __name__ == "__main__":
    main()
