"""Checkpoints move between bitsandbytes' Linear8bitLt and int8fx's, with the same outputs.

bitsandbytes 0.50.x runs its int8 path on CPU in eval mode. CI installs it with
``pip install "bitsandbytes>=0.50,<0.51" --no-deps`` (its other dependencies, numpy and
packaging, are already there); without it these tests are skipped.

How close "the same outputs" is, derived from what each side computes on CPU:

* Both quantize the input identically: bitsandbytes casts it to fp16 first, so the inputs
  below are fp16-representable (then the cast is exact), and both use absmax scales,
  ``>= threshold`` and round-half-to-even. The outlier columns must be *equal*.
* int8 part ``P = C32 * SCA * SCB / 127^2``: C32 is exact int32 on both sides, but
  bitsandbytes multiplies by the fp32 constant ``6.200124e-05`` where ``1/127^2 =
  6.2000124e-05``, so its ``P`` is larger by the relative ``delta_c = 1.8e-5``; a few fp32
  roundings on each side add ``u32 = 2^-24`` each.
* Outlier part ``Q = X[:, O] @ dequant(W)[:, O].T``: both dequantize in fp32 (one or two
  roundings per weight) and multiply in the input's dtype, with up to ``k`` (outlier
  columns) roundings each of the accumulation.
* fp16/bf16 outputs: bitsandbytes rounds ``P + b`` to the output dtype before adding
  ``Q`` (one rounding, unit ``u``); int8fx sums in fp32 and rounds once; both round the
  dequantized outlier weights to the input dtype.

With ``S = |P| + |X_O| @ |W_O|.T + |b|`` elementwise:
``|y_bnb - y_int8fx| <= delta_c |P| + 2 (k + 6) u32 S + [16-bit] (2k + 5) u S + 4 * 2^-24``.
In fp32 that is about 1e-4 here, while one activation element quantized one step apart moves
outputs by ``SCA * SCB * |CB| / 127^2``, about 2e-3: the fp32 comparison catches any
difference in quantization, the 16-bit ones check the dtype handling.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

from int8fx import reference
from int8fx.nn import Linear8bitLt

bnb = pytest.importorskip(
    "bitsandbytes",
    reason="bitsandbytes is not installed: pip install 'bitsandbytes>=0.50,<0.51' --no-deps",
)

K, N = 64, 48
THRESHOLD = 6.0
OUTLIER_COLUMNS = [3, 17, 40]
# bitsandbytes' CPU dequantization constant standing for 1/127^2 (see the module docstring).
BNB_INV_127_SQUARED = 6.200124e-05
FP32_UNIT_ROUNDOFF = 2.0**-24


@pytest.fixture(autouse=True)
def _quiet_bitsandbytes():
    # It warns on every fp32/bf16 call that it casts the input to fp16 for quantization.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _fp_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N)


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(4, 5, K)
    x[..., OUTLIER_COLUMNS[:2]] *= 8
    x[..., OUTLIER_COLUMNS[2]] = torch.randn(4, 5).clamp(-1, 1)
    x[2, 3, OUTLIER_COLUMNS[2]] = THRESHOLD  # exactly at the threshold: an outlier for both (>=)
    return x.half().to(dtype)  # fp16-representable, so bitsandbytes' fp16 cast is exact


def _bnb_module(state_dict: dict) -> nn.Module:
    module = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=THRESHOLD)
    module = module.to("cpu")  # bitsandbytes must quantize before it accepts an 8-bit state dict
    module.load_state_dict(state_dict)
    return module.eval()  # its CPU int8 path runs in eval mode


def _bound(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The elementwise bound of the module docstring, for ``x [..., K]``."""
    x2d = x.reshape(-1, K).double()
    (CA, SCA), columns = reference.quantize_activation(x2d, THRESHOLD)
    P = reference.int8_matmul(CA, CB).double() * SCA.double()[:, None] * SCB.double()[None, :] / 127**2
    W = CB.double() * SCB.double()[:, None] / 127
    Q_abs = x2d[:, columns].abs() @ W[:, columns].abs().t()
    S = P.abs() + Q_abs + bias.to(x.dtype).double().abs()
    k = int(columns.sum())
    delta_c = abs(BNB_INV_127_SQUARED * 127**2 - 1)
    bound = delta_c * P.abs() + 2 * (k + 6) * FP32_UNIT_ROUNDOFF * S + 4 * FP32_UNIT_ROUNDOFF
    if x.dtype != torch.float32:
        bound = bound + (2 * k + 5) * (torch.finfo(x.dtype).eps / 2) * S
    return bound.reshape(*x.shape[:-1], N)


def _assert_same_outputs(bnb_module: nn.Module, int8fx_module: Linear8bitLt, dtype: torch.dtype) -> None:
    x = _inputs(dtype)
    with torch.no_grad():
        expected, out = bnb_module(x), int8fx_module(x)
    assert out.dtype == expected.dtype == dtype
    assert int8fx_module.state.idx.tolist() == bnb_module.state.idx.tolist() == OUTLIER_COLUMNS
    weight = int8fx_module.weight
    bound = _bound(x, weight.data, weight.SCB, int8fx_module.bias.detach())
    error = (out.double() - expected.double()).abs()
    assert bool((error <= bound).all()), f"max error {error.max():.3g}, bound there {bound.flatten()[error.argmax()]:.3g}"


def test_numeric_conventions_match_bitsandbytes():
    # On fp16-representable data bitsandbytes' quantizers and the reference agree exactly.
    W = _fp_linear().weight.detach().half()
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.clone())
    expected_CB, expected_SCB = reference.quantize_weight(W)
    assert torch.equal(CB, expected_CB) and torch.equal(SCB, expected_SCB)
    x2d = _inputs(torch.float16).reshape(-1, K)
    CA, SCA, columns = bnb.functional.int8_vectorwise_quant(x2d.clone(), threshold=THRESHOLD)
    (expected_CA, expected_SCA), expected_columns = reference.quantize_activation(x2d, THRESHOLD)
    assert torch.equal(CA, expected_CA) and torch.equal(SCA, expected_SCA)
    assert columns.tolist() == expected_columns.nonzero().flatten().tolist() == OUTLIER_COLUMNS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitsandbytes_checkpoint_loads_into_int8fx(dtype):
    source = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=THRESHOLD)
    source.load_state_dict(_fp_linear().state_dict())
    source = source.to("cpu").eval()  # bitsandbytes quantizes here
    saved = io.BytesIO()
    torch.save(source.state_dict(), saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    # No .to(device) first: int8fx accepts the 8-bit checkpoint directly.
    target = Linear8bitLt(K, N, has_fp16_weights=False, threshold=THRESHOLD)
    result = target.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.weight.data, source.weight.data) and torch.equal(target.weight.SCB, source.weight.SCB)
    _assert_same_outputs(source, target, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8fx_checkpoint_loads_into_bitsandbytes(dtype):
    source = Linear8bitLt(K, N, has_fp16_weights=False, threshold=THRESHOLD)
    source.load_state_dict(_fp_linear(1).state_dict())
    source = source.cpu()  # int8fx quantizes here (from fp32)
    target = _bnb_module(source.state_dict())
    assert torch.equal(target.weight.data, source.weight.data) and torch.equal(target.weight.SCB, source.weight.SCB)
    _assert_same_outputs(target, source, dtype)


# ---------------------------------------------------------------- the functional API, side by side


def test_int8_vectorwise_quant_matches_bitsandbytes():
    from int8fx.functional import int8_vectorwise_quant

    x = _inputs(torch.float16).reshape(-1, K)
    for threshold in (0.0, THRESHOLD):
        CA, SCA, columns = int8_vectorwise_quant(x, threshold)
        bnb_CA, bnb_SCA, bnb_columns = bnb.functional.int8_vectorwise_quant(x.clone(), threshold)
        assert torch.equal(CA, bnb_CA) and torch.equal(SCA, bnb_SCA)
        if threshold == 0:
            assert columns is None and bnb_columns is None
        else:
            assert columns.tolist() == bnb_columns.tolist() == OUTLIER_COLUMNS


def test_matmul_with_a_filled_state_ignores_b_as_bitsandbytes_does():
    import int8fx

    linear = _fp_linear()
    CB, SCB = reference.quantize_weight(linear.weight.detach())
    x = _inputs(torch.float16)
    ours = int8fx.MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False)
    theirs = bnb.MatmulLtState()
    theirs.CB, theirs.SCB, theirs.has_fp16_weights, theirs.is_training = CB, SCB, False, False
    # bitsandbytes' own tests pass the int8 weight transposed here: with a filled state B is not read.
    out = int8fx.matmul(x, CB.t(), state=ours, threshold=THRESHOLD)
    expected = bnb.matmul(x, CB.t(), state=theirs, threshold=THRESHOLD)
    assert torch.equal(out, torch.ops.int8fx.int8_linear(x, CB, SCB, None, THRESHOLD, None))
    bound = _bound(x, CB, SCB, torch.zeros(N))
    assert bool(((out.double() - expected.double()).abs() <= bound).all())
    assert ours.idx.tolist() == theirs.idx.tolist() == OUTLIER_COLUMNS


def test_int8params_takes_the_keywords_bitsandbytes_ignores():
    from int8fx.nn import Int8Params

    weight = torch.randn(N, K)
    extra = {"module": None, "_is_hf_initialized": True}
    ours = Int8Params(weight, requires_grad=False, **extra)
    bnb.nn.Int8Params(weight, requires_grad=False, **extra)  # the same call works on both
    assert torch.equal(ours.data, weight) and ours.dtype == torch.float32
