"""Real architectures, built by transformers from small configs (random weights, no download):
what int8lt replaces, and that whatever it leaves in floating point is reported."""

from __future__ import annotations

import pytest
import torch

import int8fx

transformers = pytest.importorskip("transformers", reason="needs transformers (scripts/install_demo.sh)")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def qwen3_moe(experts_implementation: str):
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM._from_config(config, experts_implementation=experts_implementation).eval()


def llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config).eval()


def compile_and_report(model, **options):
    backend = int8fx.int8lt(inner="eager", **options)
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 128, (1, 8)))
    return [layer for report in backend.reports for layer in report.layers]


@pytest.mark.parametrize("experts_implementation", ["batched_mm", "grouped_mm"])
def test_moe_reports_every_expert_parameter_and_keeps_routers_in_fp(experts_implementation):
    # The experts' numerics are tested in test_moe.py.
    model = qwen3_moe(experts_implementation)
    layers = compile_and_report(model)
    by_weight = {layer.weight: layer for layer in layers}
    experts = {name for name, p in model.named_parameters() if p.dim() == 3}
    assert experts and experts <= set(by_weight)  # none silently left out
    for name in experts:
        assert by_weight[name].action == "int8" and by_weight[name].experts == 4, by_weight[name]
    routers = [layer for layer in layers if layer.module_path.endswith("mlp.gate")]
    assert len(routers) == 2 and all(layer.action == "fp" and layer.reason.startswith("MoE router") for layer in routers)
    attention = [layer for layer in layers if ".self_attn." in layer.module_path]
    assert len(attention) == 8 and all(layer.action == "int8" for layer in attention)
    # Reports name modules as named_modules() does.
    assert {layer.module_path for layer in layers} <= {name for name, _ in model.named_modules()}


def test_llama_report_paths_are_named_modules_names():
    model = llama()
    layers = compile_and_report(model)
    assert {layer.module_path for layer in layers} <= {name for name, _ in model.named_modules()}
    assert sum(layer.action == "int8" for layer in layers) == 14  # 7 linears x 2 layers; lm_head in fp


def whisper():
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


@pytest.mark.parametrize("quantize_tied_heads", [False, True])
def test_tied_output_head_stays_in_fp_whatever_its_name(quantize_tied_heads):
    model = whisper()
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight  # tied, and not called lm_head
    backend = int8fx.int8lt(inner="eager", quantize_tied_heads=quantize_tied_heads)
    with torch.no_grad():
        torch.compile(model, backend=backend)(input_features=torch.randn(1, 16, 32), decoder_input_ids=torch.tensor([[1, 5, 7]]))
    layers = {layer.module_path: layer for report in backend.reports for layer in report.layers}
    head = layers["proj_out"]
    if quantize_tied_heads:
        assert head.action == "int8"
    else:
        assert head.action == "fp" and head.reason.startswith("tied output head")
    # Every other linear of the encoder and decoder is int8 either way.
    others = [layer for path, layer in layers.items() if path != "proj_out"]
    assert len(others) >= 14 and all(layer.action == "int8" for layer in others), [(layer.module_path, layer.reason) for layer in others]


def test_skip_holds_after_moe_graph_breaks():
    # Eager experts break the graph in every MoE block: each decoder layer's attention is then
    # compiled in a frame of its own, where dynamo's paths start at the layer ("self_attn.q_proj").
    model = qwen3_moe("eager")
    layers = compile_and_report(model, skip=["model.layers.0.self_attn", "lm_head"])
    attention = {layer.module_path: layer.action for layer in layers if ".self_attn." in layer.module_path}
    assert attention == {f"model.layers.{i}.self_attn.{p}_proj": "fp" if i == 0 else "int8" for i in (0, 1) for p in "qkvo"}
    assert {layer.module_path for layer in layers} <= {name for name, _ in model.named_modules()}
