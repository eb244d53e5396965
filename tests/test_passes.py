"""The rewritten ATen graphs, pinned inline, and what the matcher accepts or skips."""

import functools
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import int8fx
from int8fx import reference
from int8fx.paths import matches_skip, normalize_source_path
from tests.models import GPT2MLP, MLP, Conv1D, Spellings, TiedLM, TransformerBlock, reference_int8


def rewrite(model, *inputs, **options):
    """Compiles with the eager inner compiler and returns the backend (its reports)."""
    torch._dynamo.reset()
    backend = int8fx.int8lt(inner="eager", **options)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return backend


class TestRewrittenGraphs(expecttest.TestCase):
    def test_mlp(self):
        backend = rewrite(MLP(), torch.randn(2, 3, 32))
        self.assertExpectedInline(
            backend.reports[0].after,
            """\
inputs: up_weight, up_bias, l_x_, down_weight, up_weight_cb, up_weight_scb, down_weight_cb, down_weight_scb
view = aten.view(l_x_, [6, 32])
int8_linear_default = int8fx.int8_linear(view, up_weight_cb, up_weight_scb, up_bias, 6.0, up_weight)
view_1 = aten.view(int8_linear_default, [2, 3, 64])
gelu = aten.gelu(view_1)
view_2 = aten.view(gelu, [6, 64])
int8_linear_default_1 = int8fx.int8_linear(view_2, down_weight_cb, down_weight_scb, None, 6.0, down_weight)
_unsafe_view = aten._unsafe_view(int8_linear_default_1, [2, 3, 16])
return [_unsafe_view]""",
        )

    def test_transformer_block_leaves_attention_matmuls_alone(self):
        # Checked through its int8 lines and what must survive, not a pinned 65-line graph
        # whose views change with every torch release. (Siblings ungrouped: the rewrite alone.)
        backend = rewrite(TransformerBlock(), torch.randn(2, 5, 32), group_siblings=False)
        lines = backend.reports[0].after.splitlines()
        int8_lines = [line for line in lines if "int8fx.int8_linear(" in line]
        projections = [
            "self_attn_q_proj",
            "self_attn_k_proj",
            "self_attn_v_proj",
            "self_attn_o_proj",
            "mlp_gate_proj",
            "mlp_up_proj",
            "mlp_down_proj",
        ]
        self.assertEqual(len(int8_lines), len(projections))
        for line, name in zip(int8_lines, projections):  # in program order, each with its own CB/SCB and fp weight
            self.assertIn(f"{name}_weight_cb, {name}_weight_scb, None, 6.0, {name}_weight)", line)
        # Attention's two activation matmuls stay as they were, and no plain matmul on a weight is left.
        self.assertEqual(sum("aten.bmm(" in line for line in lines), 2)
        self.assertFalse(any(op in line for line in lines for op in ("aten.mm(", "aten.addmm(", "aten.linear(")))
        self.assertTrue(lines[0].startswith("inputs: l_x_, input_layernorm_weight, self_attn_q_proj_weight"))
        self.assertTrue(lines[0].endswith("mlp_down_proj_weight_cb, mlp_down_proj_weight_scb"))
        self.assertEqual(len(backend.reports[0].replaced), 7)

    def test_gpt2_conv1d_is_quantized_along_its_output_features(self):
        backend = rewrite(GPT2MLP(), torch.randn(2, 3, 32))
        self.assertExpectedInline(
            backend.reports[0].after,
            """\
inputs: l_x_, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias, c_fc_weight_cb, c_fc_weight_scb, c_proj_weight_cb, c_proj_weight_scb
view = aten.view(l_x_, [-1, 32])
t_default = aten.t(c_fc_weight)
int8_linear_default = int8fx.int8_linear(view, c_fc_weight_cb, c_fc_weight_scb, c_fc_bias, 6.0, t_default)
view_1 = aten.view(int8_linear_default, [2, 3, 128])
gelu = aten.gelu(view_1)
view_2 = aten.view(gelu, [-1, 128])
t_default_1 = aten.t(c_proj_weight)
int8_linear_default_1 = int8fx.int8_linear(view_2, c_proj_weight_cb, c_proj_weight_scb, c_proj_bias, 6.0, t_default_1)
view_3 = aten.view(int8_linear_default_1, [2, 3, 32])
return [view_3]""",
        )
        layers = {layer.module_path: layer for layer in backend.reports[0].layers}
        # Stored [in, out] = [32, 128]; quantized as [out, in] = [128, 32].
        assert layers["c_fc"].shape == (128, 32) and layers["c_proj"].shape == (32, 128)

    def test_tied_lm_head_is_skipped_by_module_path(self):
        backend = rewrite(TiedLM(), torch.randint(0, 50, (2, 4)))
        self.assertExpectedInline(
            backend.reports[0].after,
            """\
inputs: embed_tokens_weight, l_tokens_, proj_weight, proj_bias, proj_weight_cb, proj_weight_scb
embedding = aten.embedding(embed_tokens_weight, l_tokens_)
view = aten.view(embedding, [8, 16])
int8_linear_default = int8fx.int8_linear(view, proj_weight_cb, proj_weight_scb, proj_bias, 6.0, proj_weight)
view_1 = aten.view(int8_linear_default, [2, 4, 16])
t_1 = aten.t(embed_tokens_weight)
view_2 = aten.view(view_1, [8, 16])
mm = aten.mm(view_2, t_1)
_unsafe_view = aten._unsafe_view(mm, [2, 4, 50])
return [_unsafe_view]""",
        )
        skipped = backend.reports[0].skipped
        assert [(s.module_path, s.weight) for s in skipped] == [("lm_head", "embed_tokens.weight")]
        assert "skip entry 'lm_head'" in skipped[0].reason


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16), (2, 2, 3, 16)])
def test_every_spelling_and_rank_is_replaced(shape):
    backend = rewrite(Spellings(), torch.randn(*shape))
    report = backend.reports[0]
    assert sorted(layer.module_path or "<root>" for layer in report.replaced) == [
        "<root>",
        "<root>",
        "<root>",
        "a",
    ]  # F.linear on a.weight is called from the root
    assert report.skipped == []
    assert "aten.mm" not in report.after and "aten.addmm" not in report.after


def test_bias_is_folded_only_from_addmm():
    backend = rewrite(nn.Linear(8, 4), torch.randn(3, 8))
    assert re.search(r"int8fx\.int8_linear\(\w+, weight_cb, weight_scb, bias, 6\.0, weight\)", backend.reports[0].after)


def test_parameter_products_and_left_multiplication_are_skipped_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 8))
            self.w2 = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            combined = self.w1 @ self.w2  # a product of two parameters
            return self.w1 @ x.t() + combined.sum()  # the parameter on the left

    backend = rewrite(Odd(), torch.randn(3, 8))
    reasons = sorted(layer.reason for layer in backend.reports[0].skipped)
    assert reasons == ["both operands are parameters", "the parameter is the left operand (W @ x), not a linear"]


def test_skip_list_and_config_paths():
    model = nn.Sequential()
    model.add_module("encoder", MLP())
    model.add_module("head", nn.Linear(16, 4))
    backend = rewrite(model, torch.randn(2, 32), skip=("head", "encoder.down"))
    report = backend.reports[0]
    assert [layer.module_path for layer in report.replaced] == ["encoder.up"]
    assert sorted(layer.module_path for layer in report.skipped) == ["encoder.down", "head"]


def test_matches_skip_is_component_wise():
    assert matches_skip("lm_head", ("lm_head",)) == "lm_head"
    assert matches_skip("model.lm_head", ("lm_head",)) == "lm_head"
    assert matches_skip("model.layers.0.mlp.down_proj", ("mlp",)) == "mlp"
    assert matches_skip("model.lm_headless", ("lm_head",)) is None
    assert matches_skip("model.layers.1.mlp", ("layers.1",)) == "layers.1"
    assert matches_skip("model.layers.10.mlp", ("layers.1",)) is None


def test_normalize_source_path():
    src = "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']"
    assert normalize_source_path(src) == "model.layers.0.weight"
    assert normalize_source_path("L['self'].model.layers[3].mlp") == "model.layers.3.mlp"
    # A decorator's *args wrapper passes self on as args[0] (transformers' *ForCausalLM.forward).
    assert normalize_source_path("L['args'][0].model.layers[3].mlp") == "model.layers.3.mlp"
    assert normalize_source_path("L['args'][0]._modules['lm_head']._parameters['weight']") == "lm_head.weight"


def passthrough(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class DecoratedHead(nn.Module):
    """A model whose forward is wrapped the way transformers wraps *ForCausalLM.forward."""

    def __init__(self):
        super().__init__()
        self.model = MLP()
        self.lm_head = nn.Linear(16, 8)

    @passthrough
    def forward(self, x):
        return self.lm_head(self.model(x))


def test_report_paths_are_named_modules_names_under_a_decorated_forward():
    model = DecoratedHead()
    backend = rewrite(model, torch.randn(2, 32))
    paths = {layer.module_path: layer.action for layer in backend.reports[0].layers}
    assert paths == {"model.up": "int8", "model.down": "int8", "lm_head": "fp"}
    assert set(paths) <= {name for name, _ in model.named_modules()}
    assert {layer.weight for layer in backend.reports[0].layers} == {"model.up.weight", "model.down.weight", "lm_head.weight"}


def test_activation_matmuls_are_not_candidates():
    def attention(q, k, v):
        return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    q = torch.randn(2, 4, 8)
    backend = rewrite(attention, q, q, q)
    assert backend.reports[0].layers == []


def test_non_flattenable_3d_input_bmm_is_replaced():
    # A transposed single-token input: linear decomposes to bmm with the weight broadcast
    # over the batch (what Llama's o_proj sees at decode).
    linear = nn.Linear(32, 16)
    x = torch.randn(3, 32, 1).transpose(1, 2)
    backend = rewrite(linear, x)
    assert len(backend.reports[0].replaced) == 1 and "aten.bmm" not in backend.reports[0].after
    with torch.no_grad():
        out = torch.compile(linear, backend=int8fx.int8lt(inner="eager"))(x)
    assert out.shape == (3, 1, 16)
    torch.testing.assert_close(out, reference_int8(linear, 6.0)(x.contiguous()), rtol=0, atol=1e-5)


class ToyMoE(nn.Module):
    """A router and experts stored as 3-D parameters, used the ways transformers' MoE blocks do."""

    def __init__(self, dim=32, hidden=16, experts=4):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) / dim**0.5)  # like experts.gate_up_proj
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)

    def forward(self, x):
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1), 2)
        # batched_mm style: each token's expert weights gathered, then W @ x
        h = torch.bmm(self.up[chosen[:, 0]], x.unsqueeze(-1)).squeeze(-1)
        # eager style, one expert: F.linear on a slice of the stacked parameter
        return F.linear(F.silu(h), self.down[1]) * weights[:, :1]


def test_moe_experts_and_router_are_reported_not_silently_left():
    backend = rewrite(ToyMoE(), torch.randn(5, 32))
    layers = {layer.weight: layer for layer in backend.reports[0].layers}
    assert set(layers) == {"gate.weight", "up", "down"}  # every parameter product, none missing
    # bmm on gathered expert weights (transformers' batched_mm) is int8 per expert (tests/test_moe.py);
    # F.linear on one expert's slice is not a form the rewrite handles: reported in fp.
    assert layers["up"].action == "int8" and layers["up"].experts == 4 and "aten.bmm" not in backend.reports[0].after
    assert layers["down"].action == "fp" and layers["down"].experts == 4
    assert "MoE experts: the 3-D parameter [4, 32, 16]" in layers["down"].reason and "select" in layers["down"].reason
    assert layers["up"].shape == (16, 32) and layers["down"].shape == (32, 16)
    assert layers["gate.weight"].action == "fp" and layers["gate.weight"].reason.startswith("MoE router")


def test_routers_are_quantized_on_request():
    backend = rewrite(ToyMoE(), torch.randn(5, 32), quantize_routers=True, quantize_experts=False)
    layers = {layer.weight: layer for layer in backend.reports[0].layers}
    assert {name: layer.action for name, layer in layers.items()} == {"gate.weight": "int8", "up": "fp", "down": "fp"}
    assert layers["up"].reason == "MoE experts: quantize_experts=False"


# ---------------------------------------------------------------- siblings


def siblings_lines(report) -> list[str]:
    return [line for line in report.after.splitlines() if "int8fx.int8_linear" in line]


def test_siblings_of_one_input_are_grouped_and_the_rest_left_alone():
    backend = rewrite(TransformerBlock(), torch.randn(2, 5, 32))
    lines = siblings_lines(backend.reports[0])
    grouped = [line for line in lines if "int8_linear_siblings(" in line]
    assert len(lines) == 4 and len(grouped) == 2
    # q/k/v in one call, gate/up in another; each keeps its own CB, SCB and fp weight, in order.
    for line, names in zip(grouped, (["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"], ["mlp_gate_proj", "mlp_up_proj"])):
        assert f"[{', '.join(f'{n}_weight_cb' for n in names)}], [{', '.join(f'{n}_weight_scb' for n in names)}]" in line
        assert f"6.0, [{', '.join(f'{n}_weight' for n in names)}])" in line
    # o_proj and down_proj read inputs of their own.
    assert sum("self_attn_o_proj_weight_cb" in line or "mlp_down_proj_weight_cb" in line for line in lines if line not in grouped) == 2
    assert len(backend.reports[0].replaced) == 7  # the report still lists every linear


class TwoHeads(nn.Module):
    """Two GPT-2 Conv1D heads of one input (weights stored [in, out]) and a third of another."""

    def __init__(self, dim=32):
        super().__init__()
        self.a, self.b, self.c = Conv1D(48, dim), Conv1D(16, dim), Conv1D(dim, 48)

    def forward(self, x):
        return self.c(self.a(x)), self.b(x)


def test_siblings_with_transposed_weights_computed_after_the_first():
    # b's weight transpose comes after a's int8 call in the rewritten graph: it moves up.
    model, x = TwoHeads(), torch.randn(2, 3, 32)
    x[..., 4] = 20.0
    backend = rewrite(model, x)
    lines = siblings_lines(backend.reports[0])
    assert len(lines) == 2 and "int8_linear_siblings(view, [a_weight_cb, b_weight_cb]" in lines[0]
    # Its fp weights are the two transposes, both computed before the call.
    graph = backend.reports[0].after.splitlines()
    call = graph.index(lines[0])
    weights = re.search(r"6\.0, \[(.*)\]\)$", lines[0]).group(1).split(", ")
    definitions = {line.split(" = ")[0]: (i, line.split(" = ")[1]) for i, line in enumerate(graph) if " = " in line}
    assert [definitions[name][1] for name in weights] == ["aten.t(a_weight)", "aten.t(b_weight)"]
    assert all(definitions[name][0] < call for name in weights)


@torch.no_grad()
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("model, shape", [(TransformerBlock, (2, 5, 32)), (TwoHeads, (2, 3, 32))])
def test_grouped_siblings_give_the_ungrouped_outputs_bit_for_bit(model, shape, dynamic):
    torch.manual_seed(0)
    module, x = model().eval(), torch.randn(*shape)
    x[..., 3] = 25.0  # an outlier column for the first linears
    outputs, groups = {}, {}
    for group in (True, False):
        torch._dynamo.reset()
        counters["int8fx"].clear()
        backend = int8fx.int8lt(inner="eager", group_siblings=group)
        outputs[group] = torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)(x)
        groups[group] = counters["int8fx"]["sibling_groups"]
    assert groups == {True: 2 if model is TransformerBlock else 1, False: 0}
    for grouped, ungrouped in zip(*map(torch.utils._pytree.tree_leaves, outputs.values())):
        assert torch.equal(grouped, ungrouped)


class WrittenBetween(nn.Module):
    """Two linears of one tensor, written in place through a view between them: they read
    different data, though the graph gives both the same input node."""

    def __init__(self, dim=32):
        super().__init__()
        self.a, self.b = nn.Linear(dim, 16), nn.Linear(dim, 24)

    def forward(self, x):
        h = x + 1
        first = self.a(h)
        h[..., 3].mul_(20.0)  # an outlier column for the second linear only
        return first, self.b(h)


@torch.no_grad()
def test_siblings_with_an_in_place_update_between_them_are_not_grouped():
    model, x = WrittenBetween(), torch.randn(2, 3, 32)
    backend = rewrite(model, x)
    lines = siblings_lines(backend.reports[0])
    assert len(lines) == 2 and not any("int8_linear_siblings(" in line for line in lines), lines
    expected = reference_int8(model, 6.0)(x)
    got = torch.compile(model, backend=int8fx.int8lt(inner="eager"), fullgraph=True)(x)
    assert all(reference.sqnr_db(e, g) > 30 for e, g in zip(expected, got))


def test_outlier_columns_are_recorded_for_every_grouped_linear():
    model, x = TwoHeads(), torch.randn(2, 3, 32)
    x[..., 4] = 20.0
    x[..., 9] = -7.0
    backend = rewrite(model, x)
    layers = {layer.module_path: layer for layer in backend.reports[0].layers}
    assert layers["a"].outliers.columns == layers["b"].outliers.columns == 2
    assert layers["a"].outliers.max_abs == layers["b"].outliers.max_abs == 20.0
