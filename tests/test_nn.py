"""int8fx.nn (Linear8bitLt, Int8Params), int8fx.functional.matmul and int8fx.swap.replace_linear.

Numerics are checked against the ``torch.ops.int8fx.int8_linear`` op called directly with the
expected arguments (exact equality: the modules must add nothing but plumbing) and against
the fp linear with SQNR floors derived below.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import int8fx.ops  # noqa: F401
from int8fx import reference
from int8fx.functional import MatmulLtState, matmul
from int8fx.nn import Int8Params, Linear8bitLt
from int8fx.swap import replace_linear

K, N = 64, 48
OUTLIER_COLUMNS = [3, 17]

# SQNR floor of an int8 linear on N(0, 1) inputs and nn.Linear's uniform weights, derived:
# a row quantized with step absmax/127 has noise variance step^2/12. For 64 Gaussian values
# absmax ~ 2.4 sigma, so the activation noise-to-signal ratio is (2.4/127)^2/12 = 3.0e-5; a
# uniform(-a, a) weight row has absmax ~ a and variance a^2/3, so its ratio is 1/(4*127^2) =
# 1.6e-5. Together 4.5e-5 = 43.4 dB (measured 42.7-43.7 dB over seeds). 40 dB leaves 3 dB for
# the spread of the absmax; a wrong scale (e.g. /127 applied twice) or a dropped outlier
# column costs far more than that.
SQNR_FLOOR_DB = 40.0
# Columns scaled by 20 blow up the row scale when they are quantized (threshold 0): the
# outlier decomposition must buy a clear margin over that (measured about 11 dB).
OUTLIER_GAIN_DB = 6.0


def _fp_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N)


def _int8_module(linear: nn.Linear, threshold: float = 6.0, has_fp16_weights: bool = False) -> Linear8bitLt:
    module = Linear8bitLt(K, N, bias=linear.bias is not None, has_fp16_weights=has_fp16_weights, threshold=threshold)
    module.load_state_dict(linear.state_dict())
    return module.cpu()


def _inputs(shape=(4, 5, K), dtype=torch.float32, outliers: bool = True, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(shape)
    if outliers:
        x[..., OUTLIER_COLUMNS] *= 20
    return x.to(dtype)


def _state_bytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


# ---------------------------------------------------------------- quantization on moves


@pytest.mark.parametrize("move", ["to_str", "to_device", "cpu", "module_to_with_dtype"])
def test_moving_the_module_quantizes_the_weight(move):
    linear = _fp_linear()
    module = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
    module.load_state_dict(linear.state_dict())
    assert module.weight.dtype == torch.float32  # not before the move
    moves = {
        "to_str": lambda m: m.to("cpu"),
        "to_device": lambda m: m.to(torch.device("cpu")),
        "cpu": lambda m: m.cpu(),
        "module_to_with_dtype": lambda m: m.to("cpu", torch.float16),
    }
    module = moves[move](module)
    CB, SCB = reference.quantize_weight(linear.weight.detach())
    weight = module.weight
    assert isinstance(weight, Int8Params) and not weight.requires_grad
    assert weight.dtype == torch.int8 and torch.equal(weight.data, CB)
    assert weight.SCB.dtype == torch.float32 and torch.equal(weight.SCB, SCB)
    assert weight.CB.data_ptr() == weight.data_ptr()  # CB is the data, not a second copy
    # Only int8 CB and fp32 SCB are kept for the weight (plus the bias).
    tensors = [weight.data, weight.SCB, module.bias]
    assert sum(t.numel() * t.element_size() for t in tensors) == N * K + 4 * N + module.bias.element_size() * N


def test_has_fp16_weights_keeps_the_fp_weight_on_moves():
    linear = _fp_linear()
    module = _int8_module(linear, has_fp16_weights=True)
    assert module.weight.dtype == torch.float32 and module.weight.requires_grad
    assert torch.equal(module.weight, linear.weight)


def test_int8params_alone_quantizes_and_carries_its_scales():
    W = _fp_linear().weight.detach()
    # The make_llm_int8_linear pattern: Int8Params(fp weight, has_fp16_weights=False).to(device).
    param = Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    CB, SCB = reference.quantize_weight(W)
    assert torch.equal(param.CB, CB) and torch.equal(param.SCB, SCB)
    on_meta = param.to("meta")
    assert isinstance(on_meta, Int8Params) and on_meta.SCB.device.type == "meta" and on_meta.dtype == torch.int8
    for clone in (copy.deepcopy(param), pickle.loads(pickle.dumps(param))):
        assert isinstance(clone, Int8Params) and not clone.has_fp16_weights
        assert torch.equal(clone, CB) and torch.equal(clone.SCB, SCB)
        assert clone.data_ptr() != param.data_ptr() and clone.SCB.data_ptr() != param.SCB.data_ptr()


def test_module_survives_deepcopy_pickle_and_meta_round_trip():
    module = _int8_module(_fp_linear())
    x = _inputs()
    expected = module(x)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert isinstance(clone.weight, Int8Params)
        assert clone.state.CB is clone.weight and clone.state.SCB is clone.weight.SCB  # still one tensor
        assert torch.equal(clone(x), expected)
    on_meta = copy.deepcopy(module).to("meta")
    assert on_meta.weight.SCB.device.type == "meta" and isinstance(on_meta.weight, Int8Params)
    materialized = on_meta.to_empty(device="cpu")
    assert materialized.weight.SCB.device.type == "cpu" and materialized.weight.dtype == torch.int8


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_the_int8_op_with_bias_in_input_dtype(dtype, threshold):
    linear = _fp_linear()
    module = _int8_module(linear, threshold=threshold)
    x = _inputs(dtype=dtype)
    out = module(x)
    expected = torch.ops.int8fx.int8_linear(x, module.weight.data, module.weight.SCB, linear.bias.detach().to(dtype), threshold, None)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], N)
    assert torch.equal(out, expected)
    assert module.bias.dtype == torch.float32  # cast per call, never stored


def test_int8_module_accuracy_and_outlier_decomposition():
    linear = _fp_linear()
    plain_x, outlier_x = _inputs(outliers=False), _inputs(outliers=True)
    with torch.no_grad():
        naive = _int8_module(linear, threshold=0.0)
        decomposed = _int8_module(linear, threshold=6.0)
        assert reference.sqnr_db(linear(plain_x), decomposed(plain_x)) >= SQNR_FLOOR_DB
        decomposed_db = reference.sqnr_db(linear(outlier_x), decomposed(outlier_x))
        naive_db = reference.sqnr_db(linear(outlier_x), naive(outlier_x))
    assert decomposed_db >= SQNR_FLOOR_DB
    assert decomposed_db >= naive_db + OUTLIER_GAIN_DB


def test_state_records_the_outlier_columns_of_the_last_call():
    module = _int8_module(_fp_linear(), threshold=6.0)
    x = _inputs(outliers=False) * 0.5  # |x| < 6 everywhere but where set below
    assert x.abs().max() < 6
    x[1, 2, 7] = 6.0  # exactly at the threshold: an outlier (>=)
    x[0, 0, 30] = -9.0
    x[3, 4, 40] = 5.99
    module(x)
    assert module.state.idx.tolist() == [7, 30]
    module(x * 0.1)
    assert module.state.idx.numel() == 0
    assert module.state.CB is module.weight and module.state.SCB is module.weight.SCB
    naive = _int8_module(_fp_linear(), threshold=0.0)
    naive(x)
    assert naive.state.idx is None


def test_lazy_quantization_on_first_forward():
    linear = _fp_linear()
    module = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
    module.load_state_dict(linear.state_dict())  # never moved to a device
    out = module(_inputs())
    assert module.weight.dtype == torch.int8
    assert torch.equal(out, _int8_module(linear)(_inputs()))


def test_input_gradient_flows_and_int8_weight_gets_none():
    module = _int8_module(_fp_linear())
    x = _inputs().requires_grad_()
    out = module(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    CB, SCB = module.weight.data, module.weight.SCB
    expected_dx = reference.int8_linear_input_grad(grad_out.reshape(-1, N), CB, SCB).reshape(x.shape)
    assert torch.equal(x.grad, expected_dx)
    assert module.weight.grad is None
    assert torch.allclose(module.bias.grad, grad_out.reshape(-1, N).sum(0), rtol=0, atol=1e-5)


def test_has_fp16_weights_trains_the_fp_weight():
    linear = _fp_linear()
    module = _int8_module(linear, has_fp16_weights=True)
    x = _inputs().requires_grad_()
    out = module(x)
    CB, SCB = reference.quantize_weight(linear.weight.detach())
    # The outlier columns use the kept fp weight.
    expected = torch.ops.int8fx.int8_linear(x.detach(), CB, SCB, linear.bias.detach(), 6.0, linear.weight.detach())
    assert torch.equal(out.detach(), expected)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    g2, x2 = grad_out.reshape(-1, N), x.detach().reshape(-1, K)
    assert torch.equal(x.grad, reference.int8_linear_input_grad(g2, CB, SCB).reshape(x.shape))
    assert torch.equal(module.weight.grad, g2.t() @ x2)
    assert module.bias.grad is not None


# ---------------------------------------------------------------- state dict


def test_state_dict_has_the_bitsandbytes_format():
    module = _int8_module(_fp_linear())
    state = module.state_dict()
    assert list(state) == ["weight", "bias", "SCB", "weight_format"]
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (N, K)
    assert state["SCB"].dtype == torch.float32 and state["SCB"].shape == (N,)
    assert state["weight_format"].dtype == torch.uint8 and state["weight_format"].dim() == 0
    assert state["weight_format"].item() == 0
    assert all(type(t) is torch.Tensor for t in state.values())  # loadable with weights_only=True
    fp_state = Linear8bitLt(K, N, has_fp16_weights=True).state_dict()
    assert list(fp_state) == ["weight", "bias"]


def test_8bit_state_dict_is_under_0p3_of_fp32():
    linear = nn.Linear(512, 512)
    module = Linear8bitLt(512, 512, has_fp16_weights=False)
    module.load_state_dict(linear.state_dict())
    module.cpu()
    # int8 weight + fp32 bias + fp32 SCB: (512*512 + 2*4*512) / (4*512*512 + 4*512) = 0.254
    assert _state_bytes(module.state_dict()) < 0.3 * _state_bytes(linear.state_dict())
    saved_8bit, saved_fp32 = io.BytesIO(), io.BytesIO()
    torch.save(module.state_dict(), saved_8bit)
    torch.save(linear.state_dict(), saved_fp32)
    assert saved_8bit.tell() < 0.3 * saved_fp32.tell()


@pytest.mark.parametrize("assign", [False, True])
def test_quantized_checkpoint_loads_into_a_module_never_moved(assign):
    source = _int8_module(_fp_linear())
    x = _inputs()
    device = "meta" if assign else None  # assign=True: the empty-weights loading flow
    target = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0, device=device)
    result = target.load_state_dict(source.state_dict(), strict=True, assign=assign)
    assert not result.missing_keys and not result.unexpected_keys
    assert isinstance(target.weight, Int8Params) and target.weight.dtype == torch.int8
    assert torch.equal(target.weight.SCB, source.weight.SCB)
    assert torch.equal(target(x), source(x))


def test_quantized_checkpoint_loads_into_a_quantized_module():
    source, target = _int8_module(_fp_linear(0)), _int8_module(_fp_linear(1))
    weight_object = target.weight
    target.load_state_dict(source.state_dict())
    assert target.weight is weight_object  # loaded in place, like any parameter
    x = _inputs()
    assert torch.equal(target(x), source(x))


def test_fp_checkpoint_into_a_quantized_module_is_requantized():
    linear = _fp_linear(1)
    target = _int8_module(_fp_linear(0))
    target.load_state_dict(linear.state_dict())
    CB, SCB = reference.quantize_weight(linear.weight.detach())
    assert torch.equal(target.weight.data, CB) and torch.equal(target.weight.SCB, SCB)


def test_bad_checkpoints_raise_clear_errors():
    state = _int8_module(_fp_linear()).state_dict()
    with pytest.raises(RuntimeError, match="has_fp16_weights=False"):
        Linear8bitLt(K, N, has_fp16_weights=True).load_state_dict(state)
    with pytest.raises(RuntimeError, match="weight_format"):
        Linear8bitLt(K, N, has_fp16_weights=False).load_state_dict({**state, "weight_format": torch.tensor(2, dtype=torch.uint8)})
    no_scales = {k: v for k, v in state.items() if k != "SCB"}
    with pytest.raises(RuntimeError, match="SCB"):
        Linear8bitLt(K, N, has_fp16_weights=False).load_state_dict(no_scales)


def test_torch_save_round_trips():
    module = _int8_module(_fp_linear())
    x = _inputs()
    whole = io.BytesIO()
    torch.save(module, whole)
    whole.seek(0)
    loaded = torch.load(whole, weights_only=False)  # a whole module is code: needs weights_only=False
    assert isinstance(loaded.weight, Int8Params) and torch.equal(loaded(x), module(x))
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    state.seek(0)
    fresh = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
    fresh.load_state_dict(torch.load(state, weights_only=True))
    assert torch.equal(fresh(x), module(x))


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed (pip install safetensors)")
    module = _int8_module(_fp_linear())
    path = tmp_path / "int8.safetensors"
    safetensors_torch.save_file(module.state_dict(), str(path))
    fresh = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
    fresh.load_state_dict(safetensors_torch.load_file(str(path)))
    x = _inputs()
    assert torch.equal(fresh(x), module(x))


# ---------------------------------------------------------------- functional


def test_matmul_quantizes_once_and_fills_the_state():
    linear = _fp_linear()
    W, b = linear.weight.detach(), linear.bias.detach()
    state = MatmulLtState(has_fp16_weights=False)
    x = _inputs()
    out = matmul(x, W, state=state, threshold=6.0, bias=b)
    CB, SCB = reference.quantize_weight(W)
    assert state.threshold == 6.0 and torch.equal(state.CB, CB) and torch.equal(state.SCB, SCB)
    assert state.idx.tolist() == OUTLIER_COLUMNS
    assert torch.equal(out, torch.ops.int8fx.int8_linear(x, CB, SCB, b, 6.0, W))
    cached = state.CB
    matmul(x, W, state=state)
    assert state.CB is cached  # not quantized again


def test_matmul_with_int8_weight_uses_the_state_scales():
    linear = _fp_linear()
    CB, SCB = reference.quantize_weight(linear.weight.detach())
    x = _inputs()
    state = MatmulLtState(SCB=SCB, threshold=6.0, has_fp16_weights=False)
    out = matmul(x, CB, state=state)
    assert torch.equal(out, torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, None))
    param = Int8Params(CB, SCB=SCB)  # or the scales the Int8Params carries
    assert torch.equal(matmul(x, param, threshold=6.0), out)
    with pytest.raises(ValueError, match="SCB"):
        matmul(x, CB)


def test_matmul_with_fp16_weights_gives_the_weight_a_gradient():
    W = _fp_linear().weight.detach().clone().requires_grad_()
    x = _inputs()
    state = MatmulLtState(has_fp16_weights=True, threshold=6.0)
    out = matmul(x, W, state=state)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(W.grad, grad_out.reshape(-1, N).t() @ x.reshape(-1, K))
    written = torch.empty_like(out)
    assert matmul(x, W.detach(), out=written, state=state) is written


# ---------------------------------------------------------------- replace_linear


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(K, 2 * K)
        self.down = nn.Linear(2 * K, K)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(), _Block()])
        self.model.lm_head = nn.Linear(K, 16)
        self.my_lm_head = nn.Linear(K, 16)
        self.lm_head = nn.Linear(K, 16)
        self.attention = nn.MultiheadAttention(K, 4, batch_first=True)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.model.lm_head(x) + self.my_lm_head(x) + self.lm_head(x)


def test_replace_linear_converts_in_place_and_skips_by_path_component():
    model = _Tiny()
    x = _inputs(outliers=False)
    with torch.no_grad():
        expected = model(x)
    old_weight = weakref.ref(model.model.layers[0].up.weight)
    assert replace_linear(model, threshold=6.0, skip=("lm_head",)) is model
    gc.collect()
    assert old_weight() is None  # the fp weight is freed
    for name in ("model.layers.0.up", "model.layers.1.down", "my_lm_head"):
        converted = model.get_submodule(name)
        assert isinstance(converted, Linear8bitLt) and converted.weight.dtype == torch.int8
        assert converted.state.threshold == 6.0
    for name in ("lm_head", "model.lm_head", "attention.out_proj"):  # skipped; MHA reads out_proj.weight itself
        assert type(model.get_submodule(name)) is not Linear8bitLt
    with torch.no_grad():
        assert reference.sqnr_db(expected, model(x)) >= SQNR_FLOOR_DB - 3  # several layers' noise adds up


def test_replace_linear_saves_memory_and_keeps_shared_modules_shared():
    shared = nn.Linear(K, K)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fp_bytes = _state_bytes(model.state_dict())
    replace_linear(model)
    assert model[0] is model[2] and isinstance(model[0], Linear8bitLt)
    assert _state_bytes(model.state_dict()) < 0.3 * fp_bytes
    with pytest.raises(ValueError, match="threshold"):
        replace_linear(nn.Sequential(nn.Linear(4, 4)), threshold=-1.0)
    assert isinstance(replace_linear(nn.Linear(4, 4)), Linear8bitLt)  # a bare Linear is returned converted


def test_replace_linear_on_meta_then_load_an_8bit_checkpoint():
    # The empty-weights flow: build on meta, swap, then assign the 8-bit tensors directly.
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(K, 2 * K), nn.ReLU(), nn.Linear(2 * K, N, bias=False))

    quantized = replace_linear(build())
    with torch.device("meta"):
        empty = build()
    replace_linear(empty)
    result = empty.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(isinstance(m.weight, Int8Params) and not m.weight.is_meta for m in (empty[0], empty[2]))
    x = _inputs()
    assert torch.equal(empty(x), quantized(x))


# ---------------------------------------------------------------- torch.compile


def _int8_model(threshold: float, has_fp16_weights: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [
        Linear8bitLt(K, 2 * K, has_fp16_weights=has_fp16_weights, threshold=threshold),
        nn.ReLU(),
        Linear8bitLt(2 * K, N, has_fp16_weights=has_fp16_weights, threshold=threshold),
    ]
    return nn.Sequential(*layers).cpu()


def _int8_op_calls(graphs) -> int:
    """int8_linear calls in dynamo's graphs, nested ones (autograd.Function bodies) included."""
    return sum(
        node.target in (torch.ops.int8fx.int8_linear, torch.ops.int8fx.int8_linear.default)
        for gm in graphs
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for node in sub.graph.nodes
    )


@pytest.mark.parametrize("has_fp16_weights", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_compiles_fullgraph_to_the_int8_op(threshold, has_fp16_weights):
    torch._dynamo.reset()
    model = _int8_model(threshold, has_fp16_weights)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = _inputs()
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x_compiled)
    expected = model(x_eager)
    assert counter.frame_count == 1 and _int8_op_calls(counter.graphs) == 2
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(x_compiled.grad, x_eager.grad)


@pytest.mark.parametrize("backend", ["inductor", "int8lt"])
def test_compiles_fullgraph(backend):
    torch._dynamo.reset()
    model = _int8_model(6.0)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = _inputs()
    with torch.no_grad():
        out, expected = compiled(x), model(x)
    assert counter.frame_count == 1 and _int8_op_calls(counter.graphs) == 2
    # The int8 op runs as an extern call and ReLU is exact: nothing may differ.
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_quantize_and_carry_the_scales():
    linear = _fp_linear()
    module = Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
    module.load_state_dict(linear.state_dict())
    module = module.cuda()
    assert module.weight.is_cuda and module.weight.dtype == torch.int8 and module.weight.SCB.is_cuda
    x = _inputs(dtype=torch.float16).cuda()
    out = module(x)
    assert out.dtype == torch.float16 and module.state.idx.tolist() == OUTLIER_COLUMNS
    back = copy.deepcopy(module).cpu()
    assert back.weight.SCB.device.type == "cpu" and torch.equal(back.weight.data, module.weight.data.cpu())


def test_matmul_state_compares_field_by_field():
    CB, SCB = reference.quantize_weight(_fp_linear().weight.detach())
    assert MatmulLtState() == MatmulLtState() and MatmulLtState(threshold=6.0) != MatmulLtState()
    assert MatmulLtState(CB=CB, SCB=SCB) == MatmulLtState(CB=CB.clone(), SCB=SCB)
    assert MatmulLtState(CB=CB) != MatmulLtState(CB=CB.flip(0)) and MatmulLtState(CB=CB) != MatmulLtState()
    with pytest.raises(TypeError):
        hash(MatmulLtState())


def test_matmul_with_a_filled_state_reads_only_the_state():
    W = _fp_linear().weight.detach()
    CB, SCB = reference.quantize_weight(W)
    x = _inputs()
    expected = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, None)
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, threshold=6.0)
    assert torch.equal(matmul(x, CB.t(), state=state), expected)  # int8 B in another layout: not read
    assert torch.equal(matmul(x, W.t(), state=state), expected)  # fp B that is not [out, in]: not used either
    # fp B that is the weight: its outlier columns are the fp ones, as before.
    assert torch.equal(matmul(x, W, state=state), torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, W))


def test_int8_vectorwise_quant_is_the_reference_quantization():
    from int8fx.functional import int8_vectorwise_quant

    x = _inputs()
    CA, SCA, columns = int8_vectorwise_quant(x, 6.0)
    (expected_CA, expected_SCA), mask = reference.quantize_activation(x.reshape(-1, x.shape[-1]), 6.0)
    assert CA.shape == x.shape and torch.equal(CA.reshape(expected_CA.shape), expected_CA) and torch.equal(SCA, expected_SCA)
    assert columns.tolist() == mask.nonzero().flatten().tolist() == OUTLIER_COLUMNS
    assert int8_vectorwise_quant(x, 0.0)[2] is None


class _TwoHeads(nn.Module):
    """Two int8 linears of one input, as q/k projections loaded in int8."""

    def __init__(self):
        super().__init__()
        self.q, self.k = (Linear8bitLt(K, n, has_fp16_weights=False, threshold=6.0) for n in (N, 2 * K))

    def forward(self, x):
        return self.q(x), self.k(x)


def test_int8_modules_of_one_input_are_grouped_when_compiled():
    # A model loaded in int8 has nothing left to rewrite: the backend still groups its siblings.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TwoHeads().cpu()  # .cpu() quantizes, as loading does
    backend = int8fx.int8lt(inner="eager")
    x = _inputs()
    with torch.no_grad():
        out, expected = torch.compile(model, backend=backend, fullgraph=True)(x), model(x)
    assert "int8fx.int8_linear_siblings(" in backend.reports[0].after
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
