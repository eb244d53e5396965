"""MoE experts (transformers 5.x: 3-D ``gate_up_proj`` / ``down_proj``) loaded straight into int8
with ``Int8fxConfig``: int8 tensors, the per-expert LLM.int8() numerics, compiling, the checkpoint
round trip and the memory.

Tiny Qwen3-MoE and Mixtral built from configs with outliers where the experts read their inputs,
saved as per-expert safetensors (transformers' save format for both) to temporary folders.

The reference for a loaded model is the fp32 model with each linear, and each expert on its own
tokens, run through ``reference.int8_linear`` (outlier columns with the dequantized int8 columns,
as ``Linear8bitLt`` loaded by ``from_pretrained`` does); routers and ``lm_head`` stay in fp.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

import int8fx
from int8fx import reference
from int8fx.nn import Int8Experts, convert_experts_
from tests.models import with_reference_linears

transformers = pytest.importorskip("transformers", reason="needs transformers (scripts/install_demo.sh)")
safetensors_torch = pytest.importorskip("safetensors.torch")
hf = pytest.importorskip("int8fx.hf")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

E, HIDDEN, INTERMEDIATE, VOCAB = 4, 64, 32, 128
OUTLIER_CHANNELS = [3, 40]  # hidden channels scaled x10 before the experts: inputs with |x| >= 6
# Two computations of the same fp32 numbers in different orders agree to a few ulps (2**-23
# relative is ~138 dB; measured 135-140 dB). 100 dB leaves room for 1e-5 relative error; the
# same model without the outlier part lands below 40 dB (each test checks its floor can fail).
SAME_COMPUTATION_SQNR_DB = 100.0
NO_OUTLIER_PART_SQNR_DB = 40.0


def qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def mixtral():
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


ARCHITECTURES = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}
# Where each architecture's checkpoint keeps expert 0's first weight and its per-expert names.
FIRST_EXPERT = {
    "qwen3_moe": ("model.layers.0.mlp.experts.0.", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("model.layers.0.block_sparse_moe.experts.0.", ("w1", "w3", "w2")),
}


def with_outliers(model):
    """Outliers at the experts' input (large norm weights) and between their two products (one
    intermediate unit of every expert scaled x100)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[OUTLIER_CHANNELS] = 10.0
            layer.mlp.experts.gate_up_proj[:, [5, INTERMEDIATE + 5], :] *= 100
    return model


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """``(architecture, folder)``: the fp32 model saved as transformers saves it (per-expert keys)."""
    torch.manual_seed(0)
    model = with_outliers(ARCHITECTURES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path


def load_int8(path, **options):
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=int8fx.Int8fxConfig(**options))


def load_fp32(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def experts_of(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if name.endswith("mlp.experts")}


def tokens(batch=2, length=12, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x).logits


# ---------------------------------------------------------------- the reference


def reference_linear(x, weight, threshold, outlier_part=True):
    """``nn.Linear`` in LLM.int8() as ``Linear8bitLt`` runs it; without its fp outlier part when asked."""
    CB, SCB = reference.quantize_weight(weight)
    if outlier_part:
        return reference.int8_linear(x, CB, SCB, None, threshold, None)
    x2d = x.reshape(-1, x.shape[-1])
    (CA, SCA), _ = reference.quantize_activation(x2d, threshold)
    out = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB)
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def as_reference(model, threshold=6.0, outlier_part=True):
    return with_reference_linears(model, lambda x, w: reference_linear(x, w, threshold, outlier_part))


# ---------------------------------------------------------------- loading


def test_experts_load_as_int8_with_one_scale_per_expert_row(checkpoint, monkeypatch):
    from int8fx.hf import memory

    _, path = checkpoint
    monkeypatch.setattr(memory, "BLOCK_BYTES", 4 * HIDDEN * 24)  # several row blocks per 3-D weight, the last one ragged
    model, fp32 = load_int8(path), load_fp32(path)
    fp_experts = experts_of(fp32)
    assert set(experts_of(model)) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    for name, experts in experts_of(model).items():
        assert isinstance(experts, Int8Experts) and isinstance(experts, type(fp_experts[name])) and experts.threshold == 6.0
        for weight, shape in (("gate_up_proj", (E, 2 * INTERMEDIATE, HIDDEN)), ("down_proj", (E, HIDDEN, INTERMEDIATE))):
            CB, SCB = getattr(experts, weight), getattr(experts, weight + "_SCB")
            assert CB.dtype == torch.int8 and tuple(CB.shape) == shape and not CB.requires_grad
            assert SCB.dtype == torch.float32 and tuple(SCB.shape) == shape[:2]
            # Streamed in row blocks, the bytes of one quantization of the whole fp32 weight.
            expected_CB, expected_SCB = reference.quantize_experts(getattr(fp_experts[name], weight))
            assert torch.equal(CB, expected_CB) and torch.equal(SCB, expected_SCB), f"{name}.{weight}"
    quantizer = model.hf_quantizer
    assert quantizer.int8_experts == list(experts_of(model))
    assert not any("experts" in path for path in quantizer.fp_modules)
    router = type(model.model.layers[0].mlp.gate).__name__
    assert quantizer.fp_modules["model.layers.0.mlp.gate"] == f"{router} is not an nn.Linear"  # routers stay in fp
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_logits_are_the_per_expert_llm_int8_reference(checkpoint):
    _, path = checkpoint
    model = load_int8(path)
    prompts = [tokens(), tokens(batch=1, length=1, seed=3)]  # a batch, and one token (two experts get no row)
    for x in prompts:
        assert reference.sqnr_db(logits(as_reference(load_fp32(path)), x), logits(model, x)) >= SAME_COMPUTATION_SQNR_DB
    # The floor can fail: the reference without its fp outlier part is far off.
    without_outliers = logits(as_reference(load_fp32(path), outlier_part=False))
    assert reference.sqnr_db(without_outliers, logits(model)) < NO_OUTLIER_PART_SQNR_DB


def test_bf16_checkpoint_loads_into_int8_experts_with_fp32_scales(checkpoint, tmp_path):
    _, path = checkpoint
    load_fp32(path).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_int8(tmp_path)
    for name, experts in experts_of(model).items():
        assert experts.gate_up_proj.dtype == torch.int8 and experts.gate_up_proj_SCB.dtype == torch.float32
        # Quantized from the bf16 weights: the bf16 weights' own quantization, bit for bit.
        bf16 = experts_of(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))[name]
        assert torch.equal(experts.down_proj, reference.quantize_experts(bf16.down_proj).data)
    bf16_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=int8fx.Int8fxConfig()
    )
    out = logits(bf16_model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 rounds every activation to 2**-9 relative (54 dB) and two layers of roundings add up:
    # measured 38-42 dB. Without the outlier part the same comparison is below 0 dB.
    assert reference.sqnr_db(logits(as_reference(load_fp32(tmp_path))), out.float()) >= 30.0


def test_skip_modules_keep_experts_in_fp_and_the_threshold_reaches_them(checkpoint, caplog):
    _, path = checkpoint
    with caplog.at_level(logging.WARNING, logger="int8fx.hf.quantizer"):
        model = load_int8(path, threshold=4.0, skip_modules=["lm_head", "model.layers.1.mlp.experts"])
    assert "matches no linear layer" not in caplog.text  # an experts module is a layer skip_modules can name
    experts = experts_of(model)
    assert isinstance(experts["model.layers.0.mlp.experts"], Int8Experts) and experts["model.layers.0.mlp.experts"].threshold == 4.0
    kept = experts["model.layers.1.mlp.experts"]
    assert not isinstance(kept, Int8Experts) and kept.gate_up_proj.dtype == torch.float32
    assert model.hf_quantizer.fp_modules["model.layers.1.mlp.experts"] == "skip_modules"
    assert torch.isfinite(logits(model)).all()


def test_dtype_moves_keep_the_scales_fp32_and_copies_keep_the_class(checkpoint):
    _, path = checkpoint
    model = load_int8(path)
    copied = copy.deepcopy(model)
    assert isinstance(experts_of(copied)["model.layers.0.mlp.experts"], Int8Experts)
    assert torch.equal(logits(copied), logits(model))
    model = model.to(torch.bfloat16)
    experts = experts_of(model)["model.layers.0.mlp.experts"]
    assert experts.gate_up_proj.dtype == torch.int8 and experts.gate_up_proj_SCB.dtype == torch.float32
    assert torch.isfinite(logits(model)).all()


def test_torch_save_of_the_whole_model_keeps_the_int8_experts(checkpoint, tmp_path):
    # Int8<Class> is made at run time, so pickle cannot find it by name; it is rebuilt from the
    # model's own class, which it can.
    _, path = checkpoint
    model = load_int8(path)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    experts = experts_of(loaded)["model.layers.0.mlp.experts"]
    assert type(experts) is type(experts_of(model)["model.layers.0.mlp.experts"]) and experts.gate_up_proj.dtype == torch.int8
    assert torch.equal(logits(loaded), logits(model))


def test_convert_experts_in_memory_equals_loading(checkpoint):
    _, path = checkpoint
    fp32 = load_fp32(path)
    for experts in experts_of(fp32).values():
        convert_experts_(experts, threshold=6.0)
    loaded = load_int8(path)
    for name, experts in experts_of(loaded).items():
        assert all(torch.equal(t, experts_of(fp32)[name].state_dict()[k]) for k, t in experts.state_dict().items()), name


def test_dequantize_gives_back_the_models_own_experts(checkpoint):
    _, path = checkpoint
    model = load_int8(path)
    fp_class = type(experts_of(load_fp32(path))["model.layers.0.mlp.experts"])
    int8 = {name: (e.down_proj.clone(), e.down_proj_SCB.clone()) for name, e in experts_of(model).items()}
    model = model.dequantize()
    for name, experts in experts_of(model).items():
        CB, SCB = int8[name]
        assert type(experts) is fp_class and experts.down_proj.dtype == torch.float32
        assert torch.equal(experts.down_proj, reference.dequantize_rows(CB.reshape(-1, INTERMEDIATE), SCB.reshape(-1)).view(CB.shape))
        assert set(experts.state_dict()) == {"gate_up_proj", "down_proj"}


# ---------------------------------------------------------------- compiling the loaded model


def test_int8lt_reports_the_loaded_experts_as_already_int8_and_runs_them_as_eager(checkpoint):
    from torch._dynamo.utils import counters

    _, path = checkpoint
    model = load_int8(path)
    backend = int8fx.int8lt(inner="eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for x in (tokens(), tokens(batch=1, length=5, seed=1)):
        assert torch.equal(logits(compiled, x), logits(model, x))  # the same ops on the same tensors
    layers = [layer for report in backend.reports for layer in report.layers if layer.experts is not None]
    assert {layer.weight for layer in layers} == {
        f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")
    }
    assert all(layer.action == "int8" and layer.reason.startswith("already int8") and layer.experts == E for layer in layers)
    shapes = {layer.weight.rpartition(".")[2]: layer.shape for layer in layers}
    assert shapes == {"gate_up_proj": (2 * INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
    assert counters["int8fx"]["weights_quantized"] == 0  # everything int8 was int8 already


def test_inductor_compiles_the_loaded_experts(tmp_path):
    torch.manual_seed(0)
    with_outliers(qwen3_moe()).save_pretrained(tmp_path)
    model = load_int8(tmp_path)
    eager = logits(model)
    by_int8lt = logits(torch.compile(model, backend="int8lt", fullgraph=True))
    torch._dynamo.reset()
    by_inductor = logits(torch.compile(model, fullgraph=True))
    # One graph with the same int8 ops either way; inductor fuses the fp ops around them (activation,
    # routing weights), which moves the logits by ulps only.
    assert torch.equal(by_int8lt, by_inductor)
    assert reference.sqnr_db(eager, by_int8lt) >= SAME_COMPUTATION_SQNR_DB


# ---------------------------------------------------------------- saving and reloading


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(safetensors_torch.load_file(os.path.join(folder, name)))
    return tensors


def _assert_same_experts(model, other):
    for name, experts in experts_of(model).items():
        reloaded = experts_of(other)[name]
        assert isinstance(reloaded, Int8Experts)
        assert all(torch.equal(t, reloaded.state_dict()[k]) for k, t in experts.state_dict().items()), name


def test_save_writes_each_expert_as_an_int8_linear_and_reloads_bit_identical(checkpoint, tmp_path):
    architecture, path = checkpoint
    model = load_int8(path)
    model.save_pretrained(tmp_path / "int8")
    tensors = _saved_tensors(tmp_path / "int8")
    prefix, (gate, up, down) = FIRST_EXPERT[architecture]
    # Per expert, bitsandbytes' names for an int8 linear: weight int8 [out, in] and SCB fp32 [out].
    for name, shape in ((gate, (INTERMEDIATE, HIDDEN)), (up, (INTERMEDIATE, HIDDEN)), (down, (HIDDEN, INTERMEDIATE))):
        weight, SCB = tensors[f"{prefix}{name}.weight"], tensors[f"{prefix}{name}.SCB"]
        assert weight.dtype == torch.int8 and tuple(weight.shape) == shape
        assert SCB.dtype == torch.float32 and tuple(SCB.shape) == shape[:1]
    experts = experts_of(model)["model.layers.0.mlp.experts"]
    assert torch.equal(tensors[f"{prefix}{up}.weight"], experts.gate_up_proj[0, INTERMEDIATE:])
    assert torch.equal(tensors[f"{prefix}{up}.SCB"], experts.gate_up_proj_SCB[0, INTERMEDIATE:])
    assert not any("gate_up_proj" in key for key in tensors)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert reloaded.hf_quantizer.pre_quantized
    _assert_same_experts(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))
    reloaded.save_pretrained(tmp_path / "again")  # and saving the reloaded model writes the same tensors
    again = _saved_tensors(tmp_path / "again")
    assert again.keys() == tensors.keys() and all(torch.equal(again[key], tensors[key]) for key in tensors)


def test_the_fused_layout_round_trips_too(checkpoint, tmp_path):
    _, path = checkpoint
    model = load_int8(path)
    model.save_pretrained(tmp_path, save_original_format=False)  # the tensors as the model holds them
    tensors = _saved_tensors(tmp_path)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_SCB"].shape == (E, 2 * INTERMEDIATE)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_experts(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_an_expert_missing_its_scales_fails_naming_the_tensor(checkpoint, tmp_path, caplog):
    architecture, path = checkpoint
    load_int8(path).save_pretrained(tmp_path)
    prefix, (_, _, down) = FIRST_EXPERT[architecture]
    tensors = _saved_tensors(tmp_path)
    del tensors[f"{prefix.removesuffix('0.')}1.{down}.SCB"]  # layer 0, expert 1's down_proj scales
    safetensors_torch.save_file(tensors, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    transformers.utils.logging.enable_propagation()  # transformers names the tensor in its load report
    try:
        with pytest.raises((ValueError, RuntimeError)) as error:
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        transformers.utils.logging.disable_propagation()
    # Three experts' scales for four experts' weights: a size mismatch, never a half-loaded model.
    assert "model.layers.0.mlp.experts.down_proj_SCB" in str(error.value) + caplog.text


# ---------------------------------------------------------------- memory


def test_loaded_experts_hold_one_byte_per_weight(checkpoint):
    from int8fx.hf import memory

    _, path = checkpoint
    model, fp32 = load_int8(path), load_fp32(path)
    for name, experts in experts_of(model).items():
        weights = E * (2 * INTERMEDIATE * HIDDEN + HIDDEN * INTERMEDIATE)
        scales = E * (2 * INTERMEDIATE + HIDDEN)  # one fp32 per expert row
        int8_bytes = sum(t.numel() * t.element_size() for t in (*experts.parameters(), *experts.buffers()))
        fp_bytes = sum(p.numel() * p.element_size() for p in experts_of(fp32)[name].parameters())
        assert int8_bytes == weights + 4 * scales and fp_bytes == 4 * weights
    mapped = memory._safetensors_mappings()  # and nothing the model holds is a view of the checkpoint's files
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        assert not any(low <= tensor.data_ptr() < high for low, high in mapped), name
