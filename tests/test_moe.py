"""MoE experts in int8: ``int8fx::int8_grouped_linear`` against the per-expert reference, and
Qwen3-MoE / Mixtral (transformers 5.x, from small configs, no download) compiled with int8lt for
each experts implementation that reaches a graph (``grouped_mm``, ``batched_mm``).

The reference for a model is the same model with each expert run as its own ``nn.Linear``
LLM.int8() (``reference.int8_linear`` on the tokens routed to that expert) and every other
quantized linear through ``reference.int8_linear`` too.
"""

from __future__ import annotations

import pytest
import torch

import int8fx
import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx)
from int8fx import reference
from tests.models import with_reference_linears

DTYPES = [torch.float32, torch.bfloat16]
E, N, K = 4, 12, 40


def expert_weights(seed=1):
    return torch.randn(E, N, K, generator=torch.Generator().manual_seed(seed)) / K**0.5


def routed_rows(M=23, outlier_columns=(3, 17), seed=0, dtype=torch.float32):
    """``x [M, K]`` with outlier columns, and ids that leave expert 2 empty and route two rows nowhere (id E)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    for c in outlier_columns:
        x[::3, c] = 20.0
    ids = torch.tensor([0, 1, 3])[torch.randint(0, 3, (M,), generator=g)]
    ids[[4, 9]] = E
    return x.to(dtype), ids


def int8_linear_per_expert(x, CB, SCB, ids, bias, threshold, weight):
    """What the op must equal: the per-expert ``int8_linear`` op on each expert's rows."""
    out = torch.zeros(x.shape[0], CB.shape[1], dtype=x.dtype)
    for e in range(CB.shape[0]):
        rows = (ids == e).nonzero().flatten()
        if rows.numel():
            out[rows] = torch.ops.int8fx.int8_linear(
                x[rows], CB[e], SCB[e], None if bias is None else bias[e], threshold, None if weight is None else weight[e]
            )
    return out


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fp_weight", [False, True])
def test_grouped_op_is_int8_linear_per_expert(dtype, threshold, with_bias, fp_weight):
    # Same kernel on the same rows: bit-identical.
    x, ids = routed_rows(dtype=dtype)
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    bias = torch.randn(E, N) if with_bias else None
    weight = W.to(dtype) if fp_weight else None
    y = torch.ops.int8fx.int8_grouped_linear(x, CB, SCB, ids, bias, threshold, weight)
    assert y.dtype == dtype and y.shape == (x.shape[0], N)
    assert torch.equal(y, int8_linear_per_expert(x, CB, SCB, ids, bias, threshold, weight))
    assert torch.equal(y[ids == E], torch.zeros_like(y[ids == E]))  # routed to no expert: zero, no bias


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_op_matches_the_reference(dtype):
    x, ids = routed_rows(dtype=dtype)
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    y = torch.ops.int8fx.int8_grouped_linear(x, CB, SCB, ids, None, 6.0, W)
    y_ref = reference.int8_grouped_linear(x, CB, SCB, ids, None, 6.0, W)
    # Per expert, the kernel and the reference may differ by the summation order of the fp outlier
    # product (<= |O| eps sum |x_o||w_o|) and one rounding to the output dtype; the int8 part is exact.
    eps = torch.finfo(dtype).eps
    for e in range(E):
        rows = ids == e
        columns = reference.outlier_columns(x[rows], 6.0)
        bound = columns.sum() * eps * (x[rows][:, columns].float().abs() @ W[e][:, columns].abs().t()) + eps * y_ref[rows].float().abs()
        assert ((y[rows].float() - y_ref[rows].float()).abs() <= bound).all(), e


def test_outlier_columns_are_found_per_expert():
    # Column 3 is an outlier (20) in expert 0's rows only; expert 1's rows hold a large but
    # non-outlier 5 there. Expert 1 must quantize column 3, not multiply it in fp because
    # another expert's tokens had an outlier in it.
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    x[ids == 0, 3] = 20.0
    x[ids == 1, 3] = 5.0
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    y = torch.ops.int8fx.int8_grouped_linear(x, CB, SCB, ids, None, 6.0, W)
    expert_1 = reference.int8_linear(x[ids == 1], CB[1], SCB[1], None, 6.0, W[1])
    whole_batch_columns = reference.int8_linear(x, CB[1], SCB[1], None, 6.0, W[1])[ids == 1]
    torch.testing.assert_close(y[ids == 1], expert_1, rtol=0, atol=1e-5)
    assert (y[ids == 1] - whole_batch_columns).abs().max() > 1e-3  # the test can tell the two apart


def test_grouped_op_with_no_rows_and_no_routed_rows():
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    empty = torch.ops.int8fx.int8_grouped_linear(torch.empty(0, K), CB, SCB, torch.empty(0, dtype=torch.long), None, 6.0, W)
    assert empty.shape == (0, N)
    nowhere = torch.ops.int8fx.int8_grouped_linear(torch.randn(3, K), CB, SCB, torch.full((3,), E), torch.randn(E, N), 6.0, W)
    assert torch.equal(nowhere, torch.zeros(3, N))


def test_grouped_op_rejects_bad_arguments_clearly():
    x, ids = routed_rows()
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    op = torch.ops.int8fx.int8_grouped_linear
    cases = [
        (lambda: op(x, CB[0], SCB, ids, None, 6.0), "CB must be a 3-D int8 tensor"),
        (lambda: op(x, CB, SCB[:, :-1], ids, None, 6.0), "SCB must be fp32"),
        (lambda: op(x[:, :-1], CB, SCB, ids, None, 6.0), "input must be 2-D"),
        (lambda: op(x[None], CB, SCB, ids, None, 6.0), "input must be 2-D"),
        (lambda: op(x, CB, SCB, ids[:-1], None, 6.0), "expert_ids must be int32/int64"),
        (lambda: op(x, CB, SCB, ids.float(), None, 6.0), "expert_ids must be int32/int64"),
        (lambda: op(x, CB, SCB, ids, torch.randn(N), 6.0), "bias must be"),
        (lambda: op(x, CB, SCB, ids, None, 6.0, W[:, :, :-1]), "weight must be"),
        (lambda: op(x, CB, SCB, torch.where(ids == 1, E + 1, ids), None, 6.0), r"expert_ids must lie in \[0, 4\]"),
        (lambda: op(x, CB, SCB, torch.where(ids == 1, -1, ids), None, 6.0), r"expert_ids must lie in \[0, 4\]"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_opcheck_int8_grouped_linear():
    x, ids = routed_rows()
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    torch.library.opcheck(torch.ops.int8fx.int8_grouped_linear, (x, CB, SCB, ids, torch.randn(E, N), 6.0, W))


def test_grouped_op_gives_input_and_bias_gradients_of_the_per_expert_linears():
    x, ids = routed_rows()
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    grad = torch.randn(x.shape[0], N)
    x1, b1 = x.clone().requires_grad_(), torch.randn(E, N, requires_grad=True)
    torch.ops.int8fx.int8_grouped_linear(x1, CB, SCB, ids, b1, 6.0, W).backward(grad)
    x2, b2 = x.clone().requires_grad_(), b1.detach().clone().requires_grad_()
    int8_linear_per_expert(x2, CB, SCB, ids, b2, 6.0, W).backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_experts_are_quantized_per_expert_and_row():
    W = expert_weights()
    CB, SCB = reference.quantize_experts(W)
    for e in range(E):
        CB_e, SCB_e = reference.quantize_weight(W[e])
        assert torch.equal(CB[e], CB_e) and torch.equal(SCB[e], SCB_e)


# ---------------------------------------------------------------- models

transformers = pytest.importorskip("transformers", reason="needs transformers (scripts/install_demo.sh)")

OUTLIER_CHANNELS = [3, 40]  # hidden channels scaled x10 before the experts: inputs with |x| >= 6
# Two models that compute the same thing in fp32 in different orders agree to a few ulps:
# 2**-23 relative is ~138 dB, and the measured agreement is 130-140 dB. 100 dB leaves room for
# 1e-5 relative error; an expert path without its outlier part, or with the outlier columns
# of the whole batch, lands below 40 dB (the last assertion of each test shows it).
SAME_COMPUTATION_SQNR_DB = 100.0


def qwen3_moe(experts_implementation, layers=2):
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM._from_config(config, experts_implementation=experts_implementation)


def mixtral(experts_implementation, layers=2):
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM._from_config(config, experts_implementation=experts_implementation)


def build(architecture, experts_implementation, dtype=torch.float32, layers=2):
    """A random model with outliers: at the experts' input (large norm weights) and between their
    two products (one intermediate unit of every expert scaled x100)."""
    torch.manual_seed(0)
    model = architecture(experts_implementation, layers).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[OUTLIER_CHANNELS] = 10.0
            intermediate = layer.mlp.experts.down_proj.shape[-1]
            layer.mlp.experts.gate_up_proj[:, [5, intermediate + 5], :] *= 100
    return model.to(dtype)


def _reference_linear(x, weight, threshold):
    CB, SCB = reference.quantize_weight(weight)
    return reference.int8_linear(x, CB, SCB, None, threshold, weight)


def as_reference(model, threshold=6.0):
    """``model`` run as int8lt should run it: attention linears and experts in LLM.int8() (the
    reference), routers and ``lm_head`` in fp."""
    return with_reference_linears(model, lambda x, w: _reference_linear(x, w, threshold))


PROMPTS = [
    torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1)),
    torch.tensor([[5, 9, 2, 77, 31]]),
    torch.tensor([[7]]),
]


def run_compiled_and_reference(architecture, experts_implementation, dtype=torch.float32, **options):
    """Logits of the int8lt-compiled model and of its reference, per prompt: a batch, a new length
    (a recompile with dynamic shapes) and one token (two of the four experts get no row)."""
    backend = int8fx.int8lt(inner="eager", **options)
    compiled = torch.compile(build(architecture, experts_implementation, dtype), backend=backend)
    ref = as_reference(build(architecture, experts_implementation, dtype))
    with torch.no_grad():
        pairs = [(compiled(p).logits, ref(p).logits) for p in PROMPTS]
    return backend, pairs


def expert_layers(backend):
    return [layer for report in backend.reports for layer in report.layers if layer.experts is not None]


ARCHITECTURES = [pytest.param(qwen3_moe, id="qwen3_moe"), pytest.param(mixtral, id="mixtral")]


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_experts_run_in_int8_as_the_per_expert_reference(architecture, experts_implementation):
    from torch._dynamo.utils import counters

    backend, pairs = run_compiled_and_reference(architecture, experts_implementation)
    experts = expert_layers(backend)
    # Both 3-D parameters of both layers, int8, in the first graph and in the recompiled one.
    assert {layer.weight for layer in experts} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert all(layer.action == "int8" and layer.experts == E for layer in experts), experts
    assert counters["int8fx"]["weights_quantized"] == 4 + 8  # experts, and q/k/v/o of 2 layers: once for all recompiles
    for compiled, ref in pairs:
        assert reference.sqnr_db(ref, compiled) >= SAME_COMPUTATION_SQNR_DB
    # The floor can fail: the same model with no outlier decomposition in its reference is far off.
    with torch.no_grad():
        naive = as_reference(build(architecture, experts_implementation), threshold=0.0)(PROMPTS[0]).logits
    assert reference.sqnr_db(naive, pairs[0][0]) < 40.0


@pytest.mark.usefixtures("fresh_dynamo")
def test_bf16_grouped_mm_experts_are_int8():
    # In bf16 transformers calls aten._grouped_mm (the fp32 path calls its own grouped_mm_fallback op).
    backend, pairs = run_compiled_and_reference(qwen3_moe, "grouped_mm", torch.bfloat16)
    assert "aten._grouped_mm(" in backend.reports[0].before and "aten._grouped_mm(" not in backend.reports[0].after
    assert len(expert_layers(backend)) >= 4 and all(layer.action == "int8" for layer in expert_layers(backend))
    # bf16 rounding: one rounding is 2**-9 relative (54 dB) and a few add up; measured 45 dB. An
    # experts path without its outlier part is at 17 dB.
    for compiled, ref in pairs:
        assert reference.sqnr_db(ref.float(), compiled.float()) >= 40.0


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_compiles_the_int8_experts():
    model = build(qwen3_moe, "grouped_mm", layers=1)
    ref = as_reference(build(qwen3_moe, "grouped_mm", layers=1))
    backend = int8fx.int8lt()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for prompt in PROMPTS[:2]:
            assert reference.sqnr_db(ref(prompt).logits, compiled(prompt).logits) >= SAME_COMPUTATION_SQNR_DB
    assert all(layer.action == "int8" for layer in expert_layers(backend))


@pytest.mark.usefixtures("fresh_dynamo")
def test_eager_experts_never_reach_the_backend_and_are_listed_as_unseen():
    # transformers' "eager" experts loop over nonzero()'s result: dynamo runs that frame eagerly,
    # so no graph holds the expert weights. They must not stay in fp unreported.
    model = build(qwen3_moe, "eager")
    backend = int8fx.int8lt(inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(PROMPTS[0])
    unseen = backend.unseen_weights(compiled)
    assert {layer.weight for layer in unseen} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert all(layer.action == "fp" and layer.experts == E and "ran eagerly" in layer.reason for layer in unseen)
    assert {layer.module_path for report in backend.reports for layer in report.replaced} >= {"model.layers.0.self_attn.q_proj"}


@pytest.mark.usefixtures("fresh_dynamo")
def test_no_weight_is_unseen_when_every_expert_is_compiled():
    model = build(qwen3_moe, "grouped_mm")
    backend = int8fx.int8lt(inner="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(PROMPTS[0])
    assert backend.unseen_weights(model) == []
    # Another model's weights were never seen: every linear and expert stack of it is listed.
    other = build(qwen3_moe, "grouped_mm")
    assert len(backend.unseen_weights(other)) == 2 * (4 + 2) + 1  # q/k/v/o and two expert stacks per layer, lm_head


@pytest.mark.usefixtures("fresh_dynamo")
def test_quantize_experts_false_keeps_them_in_fp_with_the_reason():
    backend = int8fx.int8lt(inner="eager", quantize_experts=False)
    with torch.no_grad():
        torch.compile(build(mixtral, "grouped_mm"), backend=backend)(PROMPTS[0])
    experts = expert_layers(backend)
    assert len(experts) == 4 and all(layer.action == "fp" and layer.reason == "MoE experts: quantize_experts=False" for layer in experts)
    assert "int8fx.int8_grouped_linear" not in backend.reports[0].after


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_report_records_each_expert_weights_outlier_columns(experts_implementation):
    model = build(qwen3_moe, experts_implementation, layers=1)
    model.config._attn_implementation = "eager"  # sdpa's CPU kernel is tagged as drawing random numbers: no probe
    backend = int8fx.int8lt(inner="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(PROMPTS[0])
    stats = {layer.weight.rpartition(".")[2]: layer.outliers for layer in expert_layers(backend)}
    # The two scaled hidden channels at gate_up_proj's input; the scaled intermediate unit at down_proj's.
    assert (stats["gate_up_proj"].columns, stats["gate_up_proj"].in_features) == (len(OUTLIER_CHANNELS), 64)
    assert (stats["down_proj"].columns, stats["down_proj"].in_features) == (1, 32)


@pytest.mark.usefixtures("fresh_dynamo")
def test_experts_changed_in_place_are_requantized():
    from torch._dynamo.utils import counters

    model, ref = build(mixtral, "batched_mm", layers=1), as_reference(build(mixtral, "batched_mm", layers=1))
    compiled = torch.compile(model, backend=int8fx.int8lt(inner="eager"))
    with torch.no_grad():
        compiled(PROMPTS[0])
        for m in (model, ref):
            m.model.layers[0].mlp.experts.down_proj[1].mul_(-3)  # an in-place update of one expert
        assert reference.sqnr_db(ref(PROMPTS[0]).logits, compiled(PROMPTS[0]).logits) >= SAME_COMPUTATION_SQNR_DB
    assert counters["int8fx"]["weights_requantized"] == 1
