"""``python -m int8fx`` (console script ``int8fx``): demo, eval, explain and env.

* ``demo``: SmolLM2-135M on BBC News, fp32 versus int8lt, as one table; its last rows load the
  model's fp32 safetensors as fp32 and straight into int8 (``int8fx.Int8fxConfig``), each in a
  fresh process, and compare their memory (``--no-loading`` leaves them out).
* ``eval``: the same measurements as JSON or CSV, for SmolLM2, all-MiniLM-L6-v2 or a local
  Hugging Face causal-LM directory.
* ``explain``: compiles a model once and prints, per linear, what the backend did and why.
* ``env``: what int8fx runs on this machine (``cli/environment.py``): paste it into a bug report.

The models and the text come from optional packages (``scripts/install_demo.sh``); when one
is missing the command says what to install and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from int8fx.config import DEFAULT_THRESHOLD

EXIT_MISSING_PACKAGES = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- arguments


def _add_size_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"outlier threshold of int8lt (default {DEFAULT_THRESHOLD:g}; 0 is naive int8)",
    )
    parser.add_argument("--chunks", type=int, default=4, help="perplexity: number of BBC text chunks (default 4)")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="perplexity: tokens per chunk, BOS included (default 512)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the causal LM is loaded in (default float32)")
    parser.add_argument("--prefill-tokens", type=int, default=128, help="prompt length for the prefill timing (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated for the decode timing (default 32)")
    parser.add_argument("--no-timing", action="store_true", help="skip the prefill/decode timings (and their compiles)")
    parser.add_argument("--inner", choices=("inductor", "eager"), help="int8lt's inner compiler (default inductor; eager with --quick)")
    parser.add_argument("--dump", metavar="DIR", help="write the graphs before/after the rewrite and the per-layer report to DIR")
    parser.add_argument(
        "--skip",
        action="append",
        metavar="PATH",
        help="module path (or path component) int8lt keeps in fp (repeatable; default: lm_head); e.g. --skip lm_head --skip v_proj",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test sizes: 2 decoder layers, 1 chunk of 32 tokens, 5 new tokens, eager inner compiler"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8fx", description="LLM.int8() through torch.compile(model, backend='int8lt') on real models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="SmolLM2-135M on BBC News: perplexity, memory, speed, fp32 vs int8lt")
    _add_size_options(demo)
    demo.add_argument(
        "--no-loading",
        action="store_true",
        help="skip the loading comparison: SmolLM2 loaded from fp32 safetensors as fp32 and straight into int8 "
        "(int8fx.Int8fxConfig), each in a fresh process, peak memory side by side",
    )
    demo.set_defaults(run=_run_demo)

    evaluate = commands.add_parser("eval", help="the demo's measurements as JSON/CSV, for several models")
    evaluate.add_argument("models", nargs="*", default=["smollm2"], help="smollm2, minilm, or a local Hugging Face causal-LM directory")
    evaluate.add_argument("--format", choices=("json", "csv"), default="json")
    evaluate.add_argument("--output", metavar="FILE", help="write there instead of stdout")
    evaluate.add_argument("--sentences", type=int, default=64, help="encoders: BBC sentences embedded (default 64)")
    _add_size_options(evaluate)
    evaluate.set_defaults(run=_run_eval)

    explain = commands.add_parser("explain", help="compile a model once and show, per linear, what int8lt did and why")
    explain.add_argument(
        "model", nargs="?", default="example", help="example (built in, default), smollm2, minilm, or a causal-LM directory"
    )
    explain.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    explain.add_argument("--skip", action="append", metavar="PATH", help="module path to keep in fp (repeatable; default: lm_head)")
    explain.add_argument("--tokens", type=int, default=64, help="real models: tokens of BBC text run through the model (default 64)")
    explain.add_argument("--graphs", action="store_true", help="also print the ATen graph before and after the rewrite")
    explain.add_argument("--dump", metavar="DIR", help="write the graphs and the per-layer report to DIR")
    explain.set_defaults(run=_run_explain)

    environment = commands.add_parser(
        "env", help="what int8fx runs on this machine: versions, CPU instruction sets and kernels, AMX self-check, GPUs"
    )
    environment.set_defaults(run=_run_env)
    return parser


def _run_env(args: argparse.Namespace) -> int:
    from int8fx.cli.environment import print_environment

    return print_environment()


def _settings(args: argparse.Namespace):
    from int8fx.cli.demo.evaluate import QUICK, EvalSettings

    chosen = {"threshold": args.threshold, "timing": not args.no_timing, "dump_dir": args.dump}
    if args.skip is not None:  # replaces the default, as explain's --skip does
        chosen["skip"] = tuple(args.skip)
    if args.inner is not None:
        chosen["inner"] = args.inner
    if args.quick:  # the sizes are QUICK's; the choices above still apply
        return dataclasses.replace(QUICK, **chosen)
    sizes = {
        "chunks": args.chunks,
        "chunk_tokens": args.chunk_tokens,
        "prefill_tokens": args.prefill_tokens,
        "new_tokens": args.new_tokens,
        "sentences": getattr(args, "sentences", EvalSettings.sentences),
    }
    return EvalSettings(**chosen, **sizes)


def _load_causal_lm(name: str, dtype: torch.dtype):
    from int8fx.cli.demo import models
    from int8fx.cli.demo.progress import step

    with step(f"loading {name}"):
        if name == "smollm2":
            return ("SmolLM2-135M-Instruct", *models.load_smollm2(dtype))
        return (name, *models.load_causal_lm(name, dtype))


# ---------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    from int8fx.cli.demo.evaluate import evaluate_causal_lm

    name, model, tokenizer = _load_causal_lm("smollm2", DTYPES[args.dtype])
    result = evaluate_causal_lm(name, model, tokenizer, _settings(args))
    if not args.no_loading:
        result.update(_loading_comparison(tokenizer))
    print(format_demo_table(result))
    print("\nper linear, what int8lt did and why: python -m int8fx explain smollm2")
    return 0


def _loading_comparison(tokenizer) -> dict[str, Any]:
    from int8fx.cli.demo import loading
    from int8fx.cli.demo.progress import step

    # Fresh processes: this one holds the demo's own model and compiled graphs, and its peak
    # is long past; a new process per load measures that load alone.
    with step("loading SmolLM2 from fp32 safetensors as fp32 and straight into int8, each in a fresh process"):
        return loading.smollm2_load_comparison(tokenizer)


def _loading_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """fp32 load / int8fx load, for the peak and the memory after one forward, and the load time."""
    fp32, int8 = "load_fp32_", "load_int8fx_"
    errors = [f"{loader} not measured: {result[f'load_{loader}_error']}" for loader in ("fp32", "int8fx") if result[f"load_{loader}_error"]]
    label = "loading the fp32 safetensors, each in a fresh process: fp32 / straight into int8 (Int8fxConfig)"
    if errors:
        return [(label, "; ".join(errors))]

    def pair(field: str, digits: int = 0) -> str:
        return f"{result[fp32 + field]:.{digits}f} / {result[int8 + field]:.{digits}f} ({result[int8 + field] / result[fp32 + field]:.2f}x)"

    return [
        (label, ""),
        # RSS above the process's RSS after its imports (interpreter, torch, transformers).
        ("  peak RSS over the load and one forward (MiB)", pair("peak_rss_mib")),
        (f"  RSS after one {result['load_forward_tokens']}-token forward (MiB)", pair("forward_rss_mib")),
        # Pages of the checkpoint's memory map: the fp32 model's weights, or the fp32 weights
        # the int8 load read to quantize, resident while transformers keeps the map.
        ("    of it checkpoint pages mapped from disk (MiB)", pair("forward_file_rss_mib")),
        ("  parameters and buffers (MiB)", pair("model_mib", 1)),
        ("  load time (s)", pair("load_s", 1)),
    ]


def _value(number: float, digits: int = 2) -> str:
    return f"{number:.{digits}f}"


def _perplexity_cell(result: dict[str, Any], key: str) -> str:
    """``29.00 (+1.74% ± 0.55 s.e.)``: the change over fp and its standard error over the chunks."""
    change = f"{result[key + '_delta_pct']:+.2f}%"
    error = result.get(key + "_delta_se_pct")
    if error is not None:
        change += f" ± {error:.2f} s.e."
    return f"{_value(result[key])} ({change})"


def format_demo_table(result: dict[str, Any]) -> str:
    """The demo's one table: measurement | value, from ``evaluate_causal_lm``'s result."""
    fp = result["dtype"]
    t = f"{result['threshold']:g}"
    rows = [
        (f"perplexity {fp} (eager, the reference)", _value(result["ppl_fp"])),
        (f"perplexity int8lt threshold {t}", _perplexity_cell(result, "ppl_int8lt")),
    ]
    if "ppl_int8lt_t0" in result:
        rows.append(("perplexity int8lt threshold 0 (naive int8)", _perplexity_cell(result, "ppl_int8lt_t0")))
    rows += [
        (
            "linear weights fp32 / fp16 / int8 + row scales (MiB)",
            " / ".join(_value(result[k], 1) for k in ("linear_weights_fp32_mib", "linear_weights_fp16_mib", "linear_weights_int8lt_mib")),
        ),
        ("linear layers to int8 / kept in fp", f"{result['layers_int8']} / {result['layers_fp']}"),
        *((f"  kept in fp: {reason}", "") for reason in result["layers_fp_reasons"]),
        ("graphs compiled / rewrite failed (left in fp)", f"{result['graphs']} / {result['graphs_failed']}"),
        (f"outlier columns (|x| >= {t}) over the text", result["outlier_summary"]),
        ("largest |x| entering a linear", _value(result["max_abs_linear_input"], 1)),
    ]
    if "prefill_ms_fp" in result:
        baseline = result["fp_speed_baseline"].replace("fp_", f"{fp} ")
        rows += [
            (
                f"prefill {result['prompt_tokens']} tokens (ms): {baseline} / int8lt",
                f"{result['prefill_ms_fp']:.0f} / {result['prefill_ms_int8lt']:.0f}",
            ),
            (
                f"decode (tokens/s): {baseline} / int8lt",
                f"{result['decode_tokens_per_s_fp']:.2f} / {result['decode_tokens_per_s_int8lt']:.2f}",
            ),
            ("prompt (its end)", repr(result["prompt_tail"])),
            (f"greedy sample {baseline}", repr(result["sample_fp"])),
            ("greedy sample int8lt", repr(result["sample_int8lt"])),
        ]
    if "load_fp32_error" in result:
        rows += _loading_rows(result)
    title = (
        f"{result['model']} ({result['parameters_m']:.1f} M parameters, {fp}) | {result['text']} | int8lt inner compiler: {result['inner']}"
    )
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{label.ljust(width)}  {value}".rstrip() for label, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- eval


def _run_eval(args: argparse.Namespace) -> int:
    from int8fx.cli.demo import models
    from int8fx.cli.demo.evaluate import evaluate_causal_lm, evaluate_encoder
    from int8fx.cli.demo.progress import step

    settings = _settings(args)
    results = []
    for name in args.models:
        if name == "minilm":
            with step("loading all-MiniLM-L6-v2"):
                model, tokenizer = models.load_minilm()
            results.append(evaluate_encoder("all-MiniLM-L6-v2", model, tokenizer, settings))
        else:
            label, model, tokenizer = _load_causal_lm(name, DTYPES[args.dtype])
            results.append(evaluate_causal_lm(label, model, tokenizer, settings))
    text = format_results(results, args.format)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    return 0


def format_results(results: Sequence[dict[str, Any]], fmt: str) -> str:
    """JSON (a list of objects) or CSV (one row per model, the union of the keys as columns)."""
    if fmt == "json":
        return json.dumps(list(results), indent=1) + "\n"
    columns = list(dict.fromkeys(key for result in results for key in result))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for result in results:
        writer.writerow({k: "; ".join(v) if isinstance(v, list) else v for k, v in result.items()})
    return buffer.getvalue()


# ---------------------------------------------------------------- explain


def _explain_target(args: argparse.Namespace) -> tuple[str, torch.nn.Module, Callable[[torch.nn.Module], Any]]:
    """``(label, model, run)`` where ``run(m)`` calls ``m`` (eager or compiled) on a real input."""
    if args.model == "example":
        from int8fx.cli.demo.example import ExampleModel, example_inputs

        ids = example_inputs()
        return "built-in example (2 blocks, tied lm_head)", ExampleModel().eval().requires_grad_(False), lambda m: m(ids)
    from int8fx.cli.demo.data import bbc_sentences, bbc_token_chunks

    if args.model == "minilm":
        from int8fx.cli.demo import models

        model, tokenizer = models.load_minilm()
        batch = dict(tokenizer(bbc_sentences(4), padding=True, return_tensors="pt"))
        return "all-MiniLM-L6-v2", model, lambda m: m(**batch)
    label, model, tokenizer = _load_causal_lm(args.model, torch.float32)
    ids = bbc_token_chunks(tokenizer, 1, args.tokens)[0]
    return label, model, lambda m: m(input_ids=ids, use_cache=False)


def _run_explain(args: argparse.Namespace) -> int:
    import int8fx
    from int8fx import report

    label, model, run = _explain_target(args)
    options: dict[str, Any] = {"threshold": args.threshold, "inner": "eager"}  # explaining needs no inductor
    if args.skip is not None:
        options["skip"] = tuple(args.skip)
    backend = int8fx.int8lt(**options)
    outliers = report.count_outlier_columns(model, lambda: run(model), args.threshold)
    torch._dynamo.reset()  # a clean cache: the report covers exactly this compile
    with torch.no_grad():
        run(torch.compile(model, backend=backend))
    print(f"{label}: {backend.config}")
    print(f"outlier columns (|x| >= {args.threshold:g}) in the eager run: {report.outlier_summary(outliers)}\n")
    print(report.format_layer_table(backend.reports, outliers))
    unseen = backend.unseen_weights(model)
    if unseen:
        print(f"\n{len(unseen)} linear weight(s) never reached the backend and stay in fp ({unseen[0].reason}):")
        for layer in unseen:
            print(f"  {layer.weight} {list(layer.shape)}" + (f" x {layer.experts} experts" if layer.experts else ""))
    if args.graphs:
        for graph in backend.reports:
            print(f"\n# graph {graph.index} before the rewrite\n{graph.before}\n\n# graph {graph.index} after the rewrite\n{graph.after}")
    if args.dump:
        for graph in backend.reports:
            report.write_graph_dump(args.dump, graph, outliers)
        print(f"\ngraph dumps written to {args.dump}")
    return 0


# ---------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    from int8fx.cli.demo.models import MissingPackages

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local package: never reach for a hub
    try:
        return args.run(args)
    except MissingPackages as error:
        print(f"int8fx {args.command}: {error}", file=sys.stderr)
        return EXIT_MISSING_PACKAGES
