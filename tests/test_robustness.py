"""Bad inputs, odd shapes, odd models: never a crash, never silently different from eager."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters

import int8fx
from int8fx import reference
from int8fx.kernels import cpu
from tests.models import MLP, reference_int8

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def run_compiled(model, *inputs, **options):
    backend = int8fx.int8lt(inner="eager", **options)
    with torch.no_grad():
        return torch.compile(model, backend=backend)(*inputs), backend


def op(x, W, bias=None, threshold=6.0):
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    return torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, W)


# ---------------------------------------------------------------- special values


def test_empty_batch():
    out, backend = run_compiled(nn.Linear(8, 4), torch.ones(0, 8))
    assert out.shape == (0, 4) and len(backend.reports[0].replaced) == 1


def test_all_zero_rows_give_the_bias():
    linear = nn.Linear(8, 4)
    x = torch.zeros(3, 8)
    x[1, 2] = 9.0  # one outlier in another row: rows 0 and 2 stay all zero
    out, _ = run_compiled(linear, x)
    assert torch.equal(out[0], linear.bias.detach()) and torch.equal(out[2], linear.bias.detach())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_nan_stays_in_its_row(threshold):
    x = torch.randn(4, 16)
    x[2, 5] = float("nan")
    out = op(x, torch.randn(8, 16), threshold=threshold)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3]]).all()


def test_inf_propagates_like_the_fp_computation():
    W = torch.randn(8, 16)
    x = torch.randn(4, 16)
    x[1, 3] = float("inf")
    fp = x @ W.t()
    out = op(x, W, threshold=6.0)  # inf is an outlier: handled in fp, exactly like eager
    assert torch.equal(torch.isinf(out), torch.isinf(fp)) and torch.equal(torch.isnan(out), torch.isnan(fp))
    assert torch.isfinite(out[[0, 2, 3]]).all()
    # Without outlier handling the row cannot be represented: it must not come out finite.
    assert not torch.isfinite(op(x, W, threshold=0.0)[1]).any()


def test_every_column_an_outlier_is_the_fp_product():
    W = torch.randn(8, 16)
    x = torch.randn(4, 16).sign() * 10
    torch.testing.assert_close(op(x, W), x @ W.t())


def test_fp16_near_its_maximum():
    torch.manual_seed(0)
    W = (torch.randn(8, 64) / 64).half()
    x = torch.randn(4, 64).half()
    x[:, 3] = 60000.0  # near fp16's max (65504)
    fp = (x.float() @ W.float().t()).half()
    out = op(x, W)
    assert torch.isfinite(out).all() == torch.isfinite(fp).all()
    assert reference.sqnr_db(fp.float(), out.float()) > 40


# ---------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("K, N", [(1, 1), (1, 7), (7, 1), (13, 31), (97, 3)])
def test_odd_and_tiny_features(K, N):
    linear = nn.Linear(K, N)
    x = torch.randn(5, K)
    out, backend = run_compiled(linear, x)
    assert len(backend.reports[0].replaced) == 1
    assert reference.sqnr_db(reference_int8(linear, 6.0)(x), out) > 60


@pytest.mark.parametrize("shape", [(16,), (1, 16), (3, 5, 16), (2, 3, 4, 16)])
def test_input_ranks(shape):
    model = MLP(16, 32, 8)
    x = torch.randn(*shape)
    out, backend = run_compiled(model, x)
    assert out.shape == (*shape[:-1], 8) and len(backend.reports[0].replaced) == 2
    assert reference.sqnr_db(reference_int8(model, 6.0)(x), out) > 60


def test_non_contiguous_and_transposed_inputs():
    model = MLP(16, 32, 8)
    base = torch.randn(16, 6)
    out, _ = run_compiled(model, base.t())
    assert reference.sqnr_db(reference_int8(model, 6.0)(base.t().contiguous()), out) > 60
    strided = torch.randn(4, 32)[:, ::2]
    out, _ = run_compiled(model, strided)
    assert reference.sqnr_db(reference_int8(model, 6.0)(strided.contiguous()), out) > 60


# ---------------------------------------------------------------- dtypes: match eager


@pytest.mark.parametrize(
    "make_input, patch",
    [
        (lambda: torch.ones(2, 8, dtype=torch.long), None),
        (lambda: torch.ones(2, 8, dtype=torch.bool), None),
        (lambda: torch.ones(2, 8, dtype=torch.bfloat16), None),
        (lambda: torch.ones(2, 8), lambda m: setattr(m.bias, "data", m.bias.data.bfloat16())),
    ],
    ids=["int", "bool", "bf16-input-fp32-weight", "bf16-bias"],
)
def test_dtype_errors_match_eager(make_input, patch):
    linear = nn.Linear(8, 4).requires_grad_(False)
    if patch:
        patch(linear)
    with pytest.raises(RuntimeError) as eager_error:
        linear(make_input())
    with pytest.raises(RuntimeError) as compiled_error:
        run_compiled(linear, make_input())
    assert str(eager_error.value).splitlines()[0] in str(compiled_error.value)


# ---------------------------------------------------------------- odd models


def test_weight_also_read_elsewhere_is_quantized_for_the_linear_only():
    class Regularized(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) + self.fc.weight.abs().mean()

    model = Regularized()
    x = torch.randn(3, 16)
    out, backend = run_compiled(model, x)
    assert len(backend.reports[0].replaced) == 1
    assert reference.sqnr_db(model(x).detach(), out) > 30


def test_meta_device_weights_stay_in_fp():
    with torch.device("meta"):
        model = MLP()
    out, backend = run_compiled(model, torch.ones(2, 32, device="meta"))
    assert out.device.type == "meta"
    assert all("meta device" in layer.reason for layer in backend.reports[0].skipped)
    assert counters["int8fx"]["weights_quantized"] == 0


def test_model_without_linears():
    out, backend = run_compiled(nn.Sequential(nn.ReLU(), nn.LayerNorm(8)), torch.randn(2, 8))
    assert out.shape == (2, 8) and backend.reports[0].layers == []


def test_linear_under_no_grad_inside_a_training_model():
    class PartlyFrozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(16, 16).requires_grad_(False)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            with torch.no_grad():
                features = self.frozen(x)
            return self.head(features)

    model = PartlyFrozen()
    backend = int8fx.int8lt(inner="eager")
    with pytest.warns(UserWarning, match=r"1 linear\(s\).*require grad"):
        torch.compile(model, backend=backend)(torch.randn(3, 16)).sum().backward()
    assert [layer.module_path for layer in backend.reports[0].replaced] == ["frozen"]
    assert model.head.weight.grad is not None


def test_module_moved_to_another_dtype_after_compile_is_requantized():
    model = MLP().requires_grad_(False)
    run = torch.compile(model, backend=int8fx.int8lt(inner="eager"))
    run(torch.randn(2, 32))
    model.to(torch.bfloat16)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = run(x)
    assert out.dtype == torch.bfloat16
    assert counters["int8fx"]["weights_requantized"] == 2
    assert reference.sqnr_db(reference_int8(model, 6.0)(x).float(), out.float()) > 40


def test_weight_replaced_by_a_new_parameter_after_compile():
    model = MLP().requires_grad_(False)
    run = torch.compile(model, backend=int8fx.int8lt(inner="eager"))
    x = torch.randn(2, 32)
    with torch.no_grad():
        run(x)
        model.up.weight = nn.Parameter(torch.randn(64, 32), requires_grad=False)
        out = run(x)
    assert reference.sqnr_db(reference_int8(model, 6.0)(x), out) > 60


# ---------------------------------------------------------------- property tests

# CI runs a small budget; a fuzz run raises it: INT8FX_FUZZ_EXAMPLES=3000 pytest -k property
EXAMPLES = int(os.environ.get("INT8FX_FUZZ_EXAMPLES", "60"))
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def linear_problem(draw):
    M = draw(st.integers(0, 9))
    K = draw(st.integers(1, 48))
    N = draw(st.integers(1, 24))
    dtype = draw(dtypes)
    threshold = draw(st.sampled_from([0.0, 1.0, 6.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    outlier_columns = draw(st.lists(st.integers(0, K - 1), max_size=3, unique=True))
    magnitude = draw(st.floats(1.0, 100.0))
    for c in outlier_columns:
        x[:, c] *= magnitude
    W = torch.randn(N, K, generator=g) / math.sqrt(K)
    bias = torch.randn(N, generator=g) if draw(st.booleans()) else None
    return x.to(dtype), W.to(dtype), None if bias is None else bias.to(dtype), threshold


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linear_problem())
def test_property_op_matches_reference(problem):
    x, W, bias, threshold = problem
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    (CA_ref, SCA_ref), columns = reference.quantize_activation(x, threshold)
    if cpu.load():  # the quantizer and GEMMs behind the op on this machine
        CA, SCA, _ = cpu.quantize_activation(x, threshold)
        assert torch.equal(CA, CA_ref) and torch.equal(SCA, SCA_ref)
        for kernel in cpu.kernels() + ("onednn", "auto"):
            assert torch.equal(cpu.int8_gemm(CA, CB, kernel), reference.int8_matmul(CA, CB))
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, W)
    y_ref = reference.int8_linear(x, CB, SCB, bias, threshold, W)
    # Only the fp outlier matmul's summation order and the final rounding may differ.
    eps = torch.finfo(x.dtype).eps
    bound = columns.sum() * eps * (x.float()[:, columns].abs() @ W.float()[:, columns].abs().t()) + eps * y_ref.float().abs()
    assert ((y.float() - y_ref.float()).abs() <= bound).all()


@st.composite
def quantization_bound_problem(draw):
    M, K, N = draw(st.integers(1, 6)), draw(st.integers(2, 64)), draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(quantization_bound_problem())
def test_property_error_within_the_quantization_step(problem):
    """|y - x W^T| <= sum_k (|x_k| dW_k + |W_k| dx_k + dx_k dW_k) with dx = SCA/254, dW = SCB/254
    (half a quantization step each) plus fp32 rounding: a bound that any wrong scale breaks."""
    x, W = problem
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 0.0, None)
    SCA = x.abs().amax(1)
    dx = (SCA / 254)[:, None, None]
    dW = (SCB / 254)[None, :, None]
    bound = (x.abs()[:, None, :] * dW + W.abs()[None, :, :] * dx + dx * dW).sum(-1)
    assert ((y - x @ W.t()).abs() <= bound * (1 + 1e-5) + 1e-6).all()


def test_each_fallback_is_logged_at_info(caplog):
    class Fallbacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.tiny = nn.Linear(16, 2)  # below min_features
            self.w = nn.Parameter(torch.randn(16, 16))
            self.b2d = nn.Parameter(torch.randn(3, 16))

        def forward(self, x):
            scaled = torch.addmm(torch.zeros(16), x, self.w, beta=0.5)  # beta != 1
            full_bias = torch.addmm(self.b2d, x, self.w.t())  # a [M, N] addend, not a bias
            return self.tiny(scaled + full_bias)

    with caplog.at_level("INFO", logger="int8fx"):
        out, backend = run_compiled(Fallbacks(), torch.randn(3, 16), min_features=4)
    reasons = sorted(layer.reason for layer in backend.reports[0].skipped)
    assert reasons == ["addmm with beta/alpha != 1", "smaller than min_features=4", "the added term is not a [16] bias"]
    for reason in reasons:
        assert any(reason in record.getMessage() and record.levelname == "INFO" for record in caplog.records)
