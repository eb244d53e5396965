"""The Triton kernels of the CUDA path against ``int8fx.reference``.

On a machine without a GPU the kernels run on CPU tensors through the Triton interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), which is slow: shapes stay at
K, N <= 512 and the kernels use one large-tile config there. Shapes are chosen to cover
partial tiles in every dimension (M = 70 is two 64-row tiles, N = 200 four 64-column
tiles, K = 300 three 128-deep steps) plus M = 1 and K = 8.

What must be exact is tested exactly: ``CA``, ``SCA``, the outlier columns and the int32
accumulation. The fp epilogue is checked against a rounding bound derived below.

GPU tests (``-m gpu``, see their section below) need a CUDA device and ``TRITON_INTERPRET=0``
in the environment (conftest only sets it when it is unset); ``scripts/gpu_check.sh`` runs
them. With ``INT8FX_GPU_TESTS_ON_CPU=1`` they run here, interpreted, on small shapes.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from int8fx import reference
from int8fx.kernels.cuda import int8_gemm as cuda_gemm
from int8fx.kernels.cuda import int8_gemv as cuda_gemv
from int8fx.kernels.cuda import linear as cuda_linear
from int8fx.kernels.cuda import quantize_activation as cuda_quantize
from int8fx.kernels.cuda.int8_gemm import INTERPRETING

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
THRESHOLD = 6.0


# ---------------------------------------------------------------- inputs


def make_activation(
    M: int, K: int, dtype: torch.dtype, *, outliers: bool = True, all_outlier_row: bool = False, seed: int = 0
) -> torch.Tensor:
    """Random activations below the threshold, plus the edge cases the kernels must handle.

    With ``outliers``: a column exactly at the threshold (an outlier, the test is ``>=``),
    a value one ulp below it in another column (not an outlier), a negative outlier in the
    last column (a partial tile), and a row whose only non-zero element is an outlier
    (its scale is 0). ``all_outlier_row`` makes every element of row 0 an outlier, hence
    every column an outlier column.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
    if outliers:
        just_below = THRESHOLD - 4 * torch.finfo(dtype).eps  # the ulp of [4, 8) is 4 eps
        x[0, min(1, K - 1)] = THRESHOLD
        x[M // 2, min(2, K - 1)] = just_below
        x[M - 1, K - 1] = -25.0
        if M >= 4:
            x[2] = 0.0
            x[2, 3] = -8.0
    if all_outlier_row:
        x[0] = torch.where(torch.arange(K) % 2 == 0, 7.0, -THRESHOLD)
    return x.to(dtype)


def make_weight(N: int, K: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, CB, SCB)``; row 0 of ``W`` is zero (``SCB = 0``, ``CB = 0``)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(N, K, generator=generator) * 0.05).to(dtype)
    weight[0] = 0
    CB, SCB = reference.quantize_weight(weight)
    return weight, CB, SCB


def make_bias(N: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- the epilogue's rounding bound


def epilogue_bound(x2d, CB, SCB, bias, threshold, weight) -> torch.Tensor:
    """Largest ``|kernel - reference.int8_linear|`` that rounding alone can explain, per element.

    Both compute ``Y8`` identically (exact int32, the same fp32 roundings). They differ in
    (a) the reference rounds the outlier product ``Y16`` to the input dtype before adding,
        at most ``u_d * P`` with ``P = sum_j |x[m, j]| |w[n, j]|`` over the outlier columns
        and ``u_d`` the dtype's unit roundoff (eps / 2);
    (b) summation order: each fp32 add is off by at most ``u32 * S`` where
        ``S = |Y8| + P + |bias|`` bounds every partial sum, and each side needs at most
        ``n_o + 2`` adds (the ``n_o`` outlier products, ``Y8``, the bias): ``(2 n_o + 4) u32 S``.
    So the values before the final cast differ by ``d <= u_d P + (2 n_o + 4) u32 S``, and
    both casts to the dtype add at most ``u_d`` of their magnitude (``<= |y| + d``), plus half
    a subnormal step each: ``|kernel - ref| <= d + 2 u_d (|y| + d) + subnormal step``.
    """
    dtype = x2d.dtype
    unit_dtype = torch.finfo(dtype).eps / 2
    unit_fp32 = torch.finfo(torch.float32).eps / 2
    (CA, SCA), columns = reference.quantize_activation(x2d, threshold)
    y8 = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB).double()
    index = columns.nonzero().flatten()
    source = weight if weight is not None else reference.dequantize_rows(CB, SCB)
    products = x2d[:, index].double().abs() @ source[:, index].to(dtype).double().abs().T
    magnitude = y8.abs() + products + (0 if bias is None else bias.double().abs())
    before_cast = unit_dtype * products + (2 * index.numel() + 4) * unit_fp32 * magnitude
    y = reference.int8_linear(x2d, CB, SCB, bias, threshold, weight).double()
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    return before_cast + 2 * unit_dtype * (y.abs() + before_cast) + subnormal_step


def assert_within_bound(actual, x2d, CB, SCB, bias, threshold, weight) -> None:
    expected = reference.int8_linear(x2d, CB, SCB, bias, threshold, weight)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bound = epilogue_bound(x2d, CB, SCB, bias, threshold, weight)
    error = (actual.double() - expected.double()).abs()
    worst = (error / bound).max().item()
    assert (error <= bound).all(), f"error reaches {worst:.2f}x the rounding bound"


def test_bound_is_tight_enough_to_catch_mistakes():
    """The bound must not hide a dropped bias, a dropped outlier part or the wrong outlier weight."""
    x = make_activation(70, 300, torch.float16)
    weight, CB, SCB = make_weight(200, 300, torch.float16)
    bias = make_bias(200, torch.float16)
    bound = epilogue_bound(x, CB, SCB, bias, THRESHOLD, weight)
    right = reference.int8_linear(x, CB, SCB, bias, THRESHOLD, weight).double()
    (CA, SCA), _ = reference.quantize_activation(x, THRESHOLD)
    int8_part = reference.dequantize_output(reference.int8_matmul(CA, CB), SCA, SCB)
    wrong = {
        "no bias": reference.int8_linear(x, CB, SCB, None, THRESHOLD, weight),
        "no outlier part": (int8_part + bias.float()).half(),
        "int8 outlier weight": reference.int8_linear(x, CB, SCB, bias, THRESHOLD, None),
    }
    for mistake, y in wrong.items():
        assert ((y.double() - right).abs() > bound).any(), mistake


# ---------------------------------------------------------------- activation quantization


def assert_quantization_matches(x2d, threshold, CA, SCA, outliers) -> None:
    (CA_ref, SCA_ref), columns = reference.quantize_activation(x2d, threshold)
    assert torch.equal(SCA, SCA_ref)
    assert torch.equal(CA, CA_ref)
    if threshold <= 0:
        assert outliers is None
    else:
        count = int(outliers.count)
        assert torch.equal(outliers.index[:count].long(), columns.nonzero().flatten())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M, K", [(1, 8), (70, 300), (3, 2100)], ids=["tiny", "several tiles", "flags compacted in 3 blocks"])
def test_quantize_activation_bit_exact(M, K, dtype, threshold):
    x = make_activation(M, K, dtype)
    assert_quantization_matches(x, threshold, *cuda_quantize.quantize_activation(x, threshold))


@pytest.mark.parametrize("case", ["no outliers", "all-outlier row"])
def test_quantize_activation_outlier_extremes(case):
    x = make_activation(37, 300, torch.bfloat16, outliers=False, all_outlier_row=case == "all-outlier row")
    result = cuda_quantize.quantize_activation(x, THRESHOLD)
    assert_quantization_matches(x, THRESHOLD, *result)
    assert int(result.outliers.count) == (300 if case == "all-outlier row" else 0)


def test_outlier_columns_across_compaction_blocks():
    # Outlier columns on both sides of each 1024-column compaction block, seen by different row blocks.
    x = make_activation(70, 2100, torch.bfloat16, outliers=False)
    for row, column in ((0, 0), (69, 1023), (40, 1024), (5, 2047), (33, 2048), (1, 2099)):
        x[row, column] = -THRESHOLD
    result = cuda_quantize.quantize_activation(x, THRESHOLD)
    assert_quantization_matches(x, THRESHOLD, *result)
    assert int(result.outliers.count) == 6


def test_quantize_activation_strided_input():
    x = make_activation(40, 600, torch.float16)[:, ::2]
    assert_quantization_matches(x, THRESHOLD, *cuda_quantize.quantize_activation(x, THRESHOLD))


def tie_activation() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with absmax 127 (so the scale ``127 / 127`` is exactly 1) holding halfway values."""
    values = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, 127.0, 3.4999998]
    expected = [0, 2, 2, 0, -2, -2, 126, 126, 127, 3]
    x = torch.tensor([values, [-v for v in values]], dtype=torch.float32)
    assert (x.abs().amax(1).reciprocal() * 127 == 1).all()
    return x, torch.tensor([expected, [-e for e in expected]], dtype=torch.int8)


def test_quantize_activation_rounds_half_to_even():
    x, expected = tie_activation()
    CA, _, _ = cuda_quantize.quantize_activation(x, 0.0)
    assert torch.equal(CA, expected)


def test_gemv_rounds_half_to_even():
    # With CB = identity the int32 result is CA itself.
    x, expected = tie_activation()
    identity = torch.eye(x.shape[1], dtype=torch.int8)
    C32 = cuda_gemv.int8_linear_small_m(x, identity, torch.ones(x.shape[1]), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, expected.int())


# ---------------------------------------------------------------- int32 accumulation


def fp32_inexact_operands() -> tuple[torch.Tensor, torch.Tensor]:
    """Operands whose exact dot products are odd and above 2**24 (fp32 would round them).

    K = 2081 exceeds the suite's K <= 512 on purpose: a smaller K cannot reach 2**24. The
    other dimensions stay tiny, so the interpreter runs it quickly. Each sum is
    ``127 * CB[n, 0]`` (odd) plus 2080 products ``+-127 * 127`` (an even count of odd terms).
    """
    K = 2081
    CA = torch.full((3, K), 127, dtype=torch.int8)
    CB = torch.full((5, K), 127, dtype=torch.int8)
    CB[:, 0] = torch.tensor([-127, 1, 3, -5, 7], dtype=torch.int8)
    CA[1] = -127
    return CA, CB


@pytest.mark.parametrize("M, K, N", [(130, 300, 200), (1, 8, 9)])
def test_int8_matmul_exact(M, K, N):
    generator = torch.Generator().manual_seed(3)
    CA = torch.randint(-127, 128, (M, K), generator=generator, dtype=torch.int8)
    CB = torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8)
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), reference.int8_matmul(CA, CB))


def test_int8_matmul_exact_beyond_fp32():
    CA, CB = fp32_inexact_operands()
    expected = reference.int8_matmul(CA, CB)
    assert (expected.abs() > 2**24).all() and (expected % 2 == 1).all()
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), expected)


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M", [1, 16])
def test_gemv_int32_exact(M, threshold):
    x = make_activation(M, 300, torch.bfloat16)
    _, CB, SCB = make_weight(200, 300, torch.bfloat16)
    (CA, _), _ = reference.quantize_activation(x, threshold)
    C32 = cuda_gemv.int8_linear_small_m(x, CB, SCB, None, threshold, None, epilogue=False)
    assert torch.equal(C32, reference.int8_matmul(CA, CB))


def test_gemv_int32_exact_beyond_fp32():
    # Rows of CA with absmax 127 quantize to themselves (the scale is exactly 1).
    CA, CB = fp32_inexact_operands()
    C32 = cuda_gemv.int8_linear_small_m(CA.float(), CB, torch.ones(CB.shape[0]), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, reference.int8_matmul(CA, CB))


@pytest.mark.parametrize("K", [300, 130])  # 130: two K steps of 128 for 4 or 8 splits, most of them empty
def test_split_k_is_exact(K):
    # Decode's split-K configs add int32 partial sums with atomics; the last program of a tile
    # finishes it. Exact in any order.
    split_configs = [c for c in GEMM_CONFIGS if c.kwargs["SPLIT_K"] > 1]
    assert split_configs, "no split-K config to test"
    generator = torch.Generator().manual_seed(5)
    for config in split_configs:
        with pinned(cuda_gemm._int8_gemm_kernel, config):
            for M, N in ((1, 40), (13, 70)):
                CA = torch.randint(-127, 128, (M, K), generator=generator, dtype=torch.int8)
                CB = torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8)
                assert torch.equal(cuda_gemm.int8_matmul(CA, CB), reference.int8_matmul(CA, CB)), config_id(config)


def test_split_k_runs_the_whole_epilogue():
    x, CB, SCB, bias, weight = linear_inputs(5, 300, 40, torch.float32, True, "fp")
    CA, SCA, outliers = cuda_quantize.quantize_activation(x, THRESHOLD)
    config = next(c for c in GEMM_CONFIGS if c.kwargs["SPLIT_K"] > 1)
    with pinned(cuda_gemm._int8_gemm_kernel, config):
        y = cuda_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x, outliers, weight)
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)
    with pinned(cuda_gemm._int8_gemm_kernel, config):  # no outliers: bit-exact with the reference
        y0 = cuda_gemm.int8_gemm(*cuda_quantize.quantize_activation(x, 0.0)[:2], CB, SCB, bias, x, None, None)
    assert torch.equal(y0, reference.int8_linear(x, CB, SCB, bias, 0.0))


def test_split_k_only_where_its_workspace_is_sized():
    # The workspace holds one arrival counter per tile of the narrowest split tile.
    for config in (c for c in GEMM_CONFIGS if c.kwargs["SPLIT_K"] > 1):
        assert config.kwargs["BLOCK_M"] >= cuda_gemm.SPLIT_K_MIN_BLOCK_M and config.kwargs["BLOCK_N"] >= cuda_gemm.SPLIT_K_MIN_BLOCK_N
    prune = cuda_gemm._prune_configs
    for bucket in (1, 16):
        assert any(c.kwargs["SPLIT_K"] > 1 for c in prune(GEMM_CONFIGS, {"M_BUCKET": bucket}))
    for bucket in (32, 4096):
        assert all(c.kwargs["SPLIT_K"] == 1 for c in prune(GEMM_CONFIGS, {"M_BUCKET": bucket}))


# ---------------------------------------------------------------- fused epilogue

# (dtype, threshold, with bias, outlier weight: "fp" kept weight or "int8" dequantized CB)
EPILOGUE_CASES = [
    (torch.float16, THRESHOLD, True, "fp"),
    (torch.float16, THRESHOLD, False, "int8"),
    (torch.bfloat16, THRESHOLD, True, "int8"),
    (torch.bfloat16, THRESHOLD, False, "fp"),
    (torch.bfloat16, 0.0, True, "fp"),
    (torch.float32, THRESHOLD, True, "fp"),
    (torch.float32, THRESHOLD, False, "int8"),
    (torch.float32, 0.0, False, "int8"),
]


def linear_inputs(M, K, N, dtype, with_bias, outlier_weight, **activation_options):
    x = make_activation(M, K, dtype, **activation_options)
    weight, CB, SCB = make_weight(N, K, dtype)
    bias = make_bias(N, dtype) if with_bias else None
    return x, CB, SCB, bias, weight if outlier_weight == "fp" else None


@pytest.mark.parametrize("dtype, threshold, with_bias, outlier_weight", EPILOGUE_CASES)
def test_gemm_epilogue(dtype, threshold, with_bias, outlier_weight):
    x, CB, SCB, bias, weight = linear_inputs(70, 300, 200, dtype, with_bias, outlier_weight)
    CA, SCA, outliers = cuda_quantize.quantize_activation(x, threshold)
    y = cuda_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x, outliers, weight)
    assert_within_bound(y, x, CB, SCB, bias, threshold, weight)


@pytest.mark.parametrize("dtype, threshold, with_bias, outlier_weight", EPILOGUE_CASES)
@pytest.mark.parametrize("M", [1, 13])
def test_gemv_epilogue(M, dtype, threshold, with_bias, outlier_weight):
    x, CB, SCB, bias, weight = linear_inputs(M, 300, 200, dtype, with_bias, outlier_weight)
    y = cuda_gemv.int8_linear_small_m(x, CB, SCB, bias, threshold, weight)
    assert_within_bound(y, x, CB, SCB, bias, threshold, weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_exact_without_outliers(dtype):
    # Without outlier columns the kernels perform the reference's fp32 operations in the
    # reference's order (dequantize, add the bias, round once), so the output is bit-exact.
    x, CB, SCB, bias, _ = linear_inputs(70, 300, 200, dtype, True, "int8")
    expected = reference.int8_linear(x, CB, SCB, bias, 0.0)
    CA, SCA, _ = cuda_quantize.quantize_activation(x, 0.0)
    assert torch.equal(cuda_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x, None, None), expected)
    assert torch.equal(cuda_gemv.int8_linear_small_m(x[:5], CB, SCB, bias, 0.0, None), expected[:5])


@pytest.mark.parametrize("M", [3, 40])
def test_all_outlier_row(M):
    # Every column is an outlier column: the int8 part is all zero, the fp part is everything.
    x, CB, SCB, bias, weight = linear_inputs(M, 200, 100, torch.float16, True, "fp", all_outlier_row=True)
    y = cuda_linear.linear(x, CB, SCB, bias, THRESHOLD, weight)
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)


def test_gemv_rejects_large_m():
    x = torch.zeros(cuda_gemv.MAX_M + 1, 8)
    with pytest.raises(ValueError, match="at most"):
        cuda_gemv.int8_linear_small_m(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 0.0, None)


# ---------------------------------------------------------------- host entry


@pytest.mark.parametrize("leading", [(1,), (2, 20)], ids=["decode", "prefill"])
def test_int8_linear_dispatch(leading):
    K, N = 96, 72
    x2d, CB, SCB, bias, weight = linear_inputs(int(torch.tensor(leading).prod()), K, N, torch.bfloat16, True, "fp")
    y = cuda_linear.linear(x2d.reshape(*leading, K), CB, SCB, bias, THRESHOLD, weight)
    assert y.shape == (*leading, N)
    assert_within_bound(y.reshape(-1, N), x2d, CB, SCB, bias, THRESHOLD, weight)


def test_siblings_equal_their_linears_bit_for_bit():
    # q/k/v-like siblings: one quantization of x serves every GEMM, so each output is exactly
    # its own linear's (a wrong pairing of CB, SCB, bias and weight would not be).
    x, CB, SCB, bias, weight = linear_inputs(20, 96, 72, torch.bfloat16, True, "fp")
    _, CB2, SCB2, _, weight2 = linear_inputs(20, 96, 40, torch.bfloat16, False, "fp")
    siblings = ([CB, CB2], [SCB, SCB2], [bias, None], [weight, weight2])
    outputs = cuda_linear.linears(x.reshape(2, 10, 96), *siblings[:3], THRESHOLD, siblings[3])
    assert [tuple(y.shape) for y in outputs] == [(2, 10, 72), (2, 10, 40)]
    for y, *linear in zip(outputs, *siblings):
        cb, scb, b, w = linear
        assert torch.equal(y.reshape(20, -1), cuda_linear.linear(x, cb, scb, b, THRESHOLD, w))


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M", [3, 20], ids=["small-M kernel", "quantize + GEMM"])
def test_nan_row_stays_nan(M, threshold):
    # tl.max drops NaN (IEEE maxNum); the row absmax must keep it, or a NaN row quantizes as finite.
    x, CB, SCB, bias, weight = linear_inputs(M, 96, 72, torch.bfloat16, True, "fp", outliers=False)
    x[1, 5] = float("nan")
    y = cuda_linear.linear(x, CB, SCB, bias, threshold, weight if threshold > 0 else None)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[torch.arange(M) != 1]).all()


@triton.jit
def _round_to_bf16_kernel(v_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, cuda_gemm.round_to(tl.load(v_ptr + offsets), tl.bfloat16))


def test_round_to_bf16_keeps_every_nan():
    # GPUs write NaN as 0x7FFFFFFF, whose payload the hand rounding carried into the sign bit: -0.
    bits = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x3F808000, 0x3F818000, 0x7F800000, 0x3F800001, 0], dtype=torch.int32)
    v = bits.view(torch.float32)
    out = torch.empty(v.shape, dtype=torch.bfloat16)
    _round_to_bf16_kernel[(1,)](v, out, N=v.numel())
    assert torch.isnan(out[:3]).all()
    assert torch.equal(out[3:], v[3:].to(torch.bfloat16))  # ties to even, either way; Inf stays Inf


def test_autotuning_keys_hold_the_specializations():
    # A config tuned without the outlier path must not be reused with it (same N, K): it may not
    # fit the GPU's shared memory there, which an H200 showed.
    assert {"EPILOGUE", "HAS_THRESHOLD", "OUTLIER_W_FROM_CB"} <= set(cuda_gemv._int8_gemv_kernel.keys)
    assert {"EPILOGUE", "HAS_OUTLIERS", "OUTLIER_W_FROM_CB"} <= set(cuda_gemm._int8_gemm_kernel.keys)


def test_int8_linear_empty_batch():
    _, CB, SCB = make_weight(8, 16, torch.float16)
    for threshold in (0.0, THRESHOLD):
        y = cuda_linear.linear(torch.zeros(0, 16, dtype=torch.float16), CB, SCB, None, threshold, None)
        assert y.shape == (0, 8) and y.dtype == torch.float16


# ---------------------------------------------------------------- GPU (-m gpu)
#
# What scripts/gpu_check.sh runs first on a lent GPU: every kernel against the reference on
# Llama-3-8B's shapes and on odd ones (K, N multiples of no block size and not of 16; M = 1,
# 17, and 4097: a partial row tile past a power of two), thresholds 0 and 6, the three
# dtypes, columns exactly at the threshold, no outliers, all-outlier rows, NaN/Inf rows and
# exact int32 accumulation. Three rules keep these checks honest and fast:
#
# * outputs are poisoned: every tensor the kernels' host code allocates with ``torch.empty``
#   starts as NaN (floats), -128 (int8: never a quantized value) or -2**31 (int32: beyond
#   any product sum for K < 2**17), so an unwritten tile or row fails;
# * the autotuners are pinned to one config per test: no timing runs (seconds per test
#   instead of tuning every specialization), and no earlier run of another config can have
#   filled the output; ``test_gpu_every_config`` checks each config the autotuner may pick;
# * the reference runs on the same device, its exact int8 product in fp64
#   (``exact_int8_matmul``), so M = 4097 costs milliseconds, not a CPU int64 matmul.
#
# With INT8FX_GPU_TESTS_ON_CPU=1 under the interpreter (the dry run of scripts/gpu_check.sh),
# the same tests run on CPU tensors with small shapes and the GPU's tile configs, so they
# cannot rot before a GPU is lent.


def _gpu_test_device() -> Optional[str]:
    if torch.cuda.is_available() and not INTERPRETING:
        return "cuda"
    if INTERPRETING and os.environ.get("INT8FX_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    return None


GPU_DEVICE = _gpu_test_device()


def gpu_test(fn):
    """Marks ``fn`` as a GPU test (``-m gpu``) that runs where ``GPU_DEVICE`` is set."""
    reason = "needs CUDA and TRITON_INTERPRET=0 (or INT8FX_GPU_TESTS_ON_CPU=1 under the interpreter)"
    return pytest.mark.gpu(pytest.mark.skipif(GPU_DEVICE is None, reason=reason)(fn))


@dataclass(frozen=True)
class GpuSizes:
    rows: tuple[int, ...]  # M: decode, the first M past the small-M kernel, a partial last row tile
    odd: tuple[int, int]  # (K, N): multiples of no block size (nor of 16: unaligned rows)
    real: tuple[tuple[int, int], ...]  # (K, N) of the linears of the model
    real_rows: tuple[int, ...]


SIZES = {
    "cuda": GpuSizes(rows=(1, 17, 4097), odd=(4111, 4103), real=((4096, 4096), (4096, 14336), (14336, 4096)), real_rows=(1, 16, 64, 4096)),
    # The interpreter's cost is per program: few output tiles (N = 40), but K still spans partial steps.
    "cpu": GpuSizes(rows=(1, 17, 70), odd=(300, 40), real=((264, 48),), real_rows=(1, 40)),
}[GPU_DEVICE or "cpu"]


def hardware_configs(module, make_configs) -> list:
    """The autotuner configs ``make_configs`` gives on a GPU, also under the interpreter
    (which otherwise gets one config of its own)."""
    saved = module.INTERPRETING
    module.INTERPRETING = False
    try:
        return make_configs()
    finally:
        module.INTERPRETING = saved


GEMM_CONFIGS = hardware_configs(cuda_gemm, cuda_gemm._gemm_configs)
GEMV_CONFIGS = hardware_configs(cuda_gemv, cuda_gemv._gemv_configs)


def config_id(config) -> str:
    meta = config.kwargs
    tile = "x".join(str(meta[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if name in meta)
    split = f"-k{meta['SPLIT_K']}" if meta.get("SPLIT_K", 1) > 1 else ""
    return f"{tile}{split}-s{config.num_stages}w{config.num_warps}"


def pick_config(configs: list, **meta):
    """The config with these block sizes (the first config if none has them)."""
    return next((c for c in configs if all(c.kwargs.get(k) == v for k, v in meta.items())), configs[0])


# One mid-size tile each for the tests that are not about configs.
DEFAULT_GEMM_CONFIG = pick_config(GEMM_CONFIGS, BLOCK_M=128, BLOCK_N=128)
DEFAULT_GEMV_CONFIG = pick_config(GEMV_CONFIGS, BLOCK_N=32, BLOCK_K=256)


@contextlib.contextmanager
def pinned(kernel, config):
    """Runs the autotuned ``kernel`` with ``config`` alone: no timing runs, no cached choice."""
    saved_configs, saved_cache = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved_configs, saved_cache


_REAL_EMPTY = torch.empty
# int8 -128 is never a quantized value; int32 -2**31 is beyond any sum of K < 2**17 products.
POISON = {torch.int8: -128, torch.int32: -(2**31)}


def poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` whose memory holds a value no kernel may leave behind."""
    tensor = _REAL_EMPTY(*args, **kwargs)
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    if tensor.dtype in POISON:
        return tensor.fill_(POISON[tensor.dtype])
    return tensor


def exact_int8_matmul(CA: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """``CA @ CB.T`` exactly, on any device: in fp64, every product (at most 127**2) and every
    partial sum (at most 127**2 * K) is an integer below 2**53, so no step rounds. CUDA has
    no int64 matmul for ``reference.int8_matmul``."""
    return (CA.double() @ CB.double().t()).to(torch.int32)


def test_exact_int8_matmul_is_the_reference():
    CA, CB = fp32_inexact_operands()
    assert torch.equal(exact_int8_matmul(CA, CB), reference.int8_matmul(CA, CB))


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Poisoned allocations, pinned autotuners, and the reference on the device in exact arithmetic."""
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(reference, "int8_matmul", exact_int8_matmul)
    if GPU_DEVICE == "cuda":  # the reference's fp products: IEEE fp32 accumulation, as the bound assumes
        matmul = torch.backends.cuda.matmul
        monkeypatch.setattr(matmul, "allow_tf32", False)
        monkeypatch.setattr(matmul, "allow_fp16_reduced_precision_reduction", False)
        monkeypatch.setattr(matmul, "allow_bf16_reduced_precision_reduction", False)
    with pinned(cuda_gemm._int8_gemm_kernel, DEFAULT_GEMM_CONFIG), pinned(cuda_gemv._int8_gemv_kernel, DEFAULT_GEMV_CONFIG):
        yield


def on_device(*tensors):
    return tuple(None if t is None else t.to(GPU_DEVICE) for t in tensors)


def assert_int32_exact(x2d, CB, threshold) -> None:
    """The int8 product of the path ``linear`` takes for ``x2d``, against the reference's (and,
    on the large-M path, ``CA``, ``SCA`` and the outlier columns bit for bit)."""
    (CA_ref, _), _ = reference.quantize_activation(x2d, threshold)
    if x2d.shape[0] <= cuda_gemv.MAX_M:
        C32 = cuda_gemv.int8_linear_small_m(x2d, CB, torch.ones(CB.shape[0], device=CB.device), None, threshold, None, epilogue=False)
    else:
        CA, SCA, outliers = cuda_quantize.quantize_activation(x2d, threshold)
        assert_quantization_matches(x2d, threshold, CA, SCA, outliers)
        C32 = cuda_gemm.int8_matmul(CA, CB)
    assert torch.equal(C32, reference.int8_matmul(CA_ref, CB))


@gpu_test
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", SIZES.rows)
def test_gpu_linear_matches_reference(M, dtype, threshold, gpu_kernels):
    # make_activation's edge cases: a column exactly at the threshold, one an ulp below it,
    # an outlier in the last (partial) column tile, a row whose only non-zero is an outlier.
    K, N = SIZES.odd
    x, CB, SCB, bias, weight = on_device(*linear_inputs(M, K, N, dtype, True, "fp"))
    assert_int32_exact(x, CB, threshold)
    for outlier_weight in (weight, None) if threshold > 0 else (None,):  # fp columns, then bitsandbytes' int8 ones
        y = cuda_linear.linear(x, CB, SCB, bias, threshold, outlier_weight)
        assert_within_bound(y, x, CB, SCB, bias, threshold, outlier_weight)


@gpu_test
@pytest.mark.parametrize("case", ["no outliers", "all-outlier row"])
@pytest.mark.parametrize("M", SIZES.rows)
def test_gpu_outlier_extremes(M, case, gpu_kernels):
    K, N = SIZES.odd
    x, CB, SCB, bias, weight = on_device(
        *linear_inputs(M, K, N, torch.float16, True, "fp", outliers=False, all_outlier_row=case == "all-outlier row")
    )
    assert_int32_exact(x, CB, THRESHOLD)
    y = cuda_linear.linear(x, CB, SCB, bias, THRESHOLD, weight)
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)


@gpu_test
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M", SIZES.rows[:2])
def test_gpu_special_values_stay_in_their_row(M, threshold, value, gpu_kernels):
    # The promises of tests/test_robustness.py, for the CUDA kernels: NaN in an input row gives
    # NaN in that output row only; Inf is an outlier at threshold 6 (so its row is the fp
    # computation's: Inf, or NaN where a weight is 0), and cannot come out finite at threshold 0.
    K, N = SIZES.odd
    x, CB, SCB, bias, weight = on_device(*linear_inputs(M, K, N, torch.bfloat16, True, "fp", outliers=False))
    row = M // 2
    x[row, 5] = value
    y = cuda_linear.linear(x, CB, SCB, bias, threshold, weight if threshold > 0 else None)
    others = torch.arange(M, device=y.device) != row
    assert torch.isfinite(y[others]).all()
    if math.isnan(value):
        assert torch.isnan(y[row]).all()
    elif threshold > 0:
        fp = x[row].float() @ weight.float().t()
        assert torch.equal(torch.isinf(y[row]), torch.isinf(fp)) and torch.equal(torch.isnan(y[row]), torch.isnan(fp))
    else:
        assert not torch.isfinite(y[row]).any()


@gpu_test
def test_gpu_rounds_half_to_even(gpu_kernels):
    x, expected = on_device(*tie_activation())
    CA, _, _ = cuda_quantize.quantize_activation(x, 0.0)
    assert torch.equal(CA, expected)
    identity = torch.eye(x.shape[1], dtype=torch.int8, device=GPU_DEVICE)
    C32 = cuda_gemv.int8_linear_small_m(x, identity, torch.ones(x.shape[1], device=GPU_DEVICE), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, expected.int())


@gpu_test
def test_gpu_int32_exact_beyond_fp32(gpu_kernels):
    CA, CB = on_device(*fp32_inexact_operands())
    expected = reference.int8_matmul(CA, CB)
    assert (expected.abs() > 2**24).all() and (expected % 2 == 1).all()
    assert torch.equal(cuda_gemm.int8_matmul(CA, CB), expected)
    # Rows of CA with absmax 127 quantize to themselves in the small-M kernel (scale exactly 1).
    C32 = cuda_gemv.int8_linear_small_m(CA.float(), CB, torch.ones(CB.shape[0], device=GPU_DEVICE), None, 0.0, None, epilogue=False)
    assert torch.equal(C32, expected)


def _every_config():
    return [pytest.param("gemm", c, id=f"gemm-{config_id(c)}") for c in GEMM_CONFIGS] + [
        pytest.param("gemv", c, id=f"gemv-{config_id(c)}") for c in GEMV_CONFIGS
    ]


@gpu_test
@pytest.mark.parametrize("kernel, config", _every_config())
def test_gpu_every_config(kernel, config, gpu_kernels):
    # Whatever the autotuner picks must be exact and complete: each config alone, on the odd
    # shape, int32 product and the full epilogue (bias, outliers with the fp weight, bf16).
    K, N = SIZES.odd
    M = SIZES.rows[-1] if kernel == "gemm" else cuda_gemv.MAX_M
    if config.kwargs.get("SPLIT_K", 1) > 1:  # decode only: its workspace is sized for M <= 16
        M = cuda_gemm.SPLIT_K_MAX_M
    x, CB, SCB, bias, weight = on_device(*linear_inputs(M, K, N, torch.bfloat16, True, "fp"))
    autotuned = cuda_gemm._int8_gemm_kernel if kernel == "gemm" else cuda_gemv._int8_gemv_kernel
    with pinned(autotuned, config):
        try:
            assert_int32_exact(x, CB, THRESHOLD)
            y = cuda_linear.linear(x, CB, SCB, bias, THRESHOLD, weight)
        except OutOfResources as error:  # the autotuner skips such a config too
            pytest.skip(f"{config_id(config)} does not fit this GPU: {error}")
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)


def llama_activation(M: int, K: int, dtype: torch.dtype, seed: int = 4) -> torch.Tensor:
    """Normal activations with 0.1% outlier columns (magnitude 8 to 20), as in LLM.int8()."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator).clamp_(-4, 4)
    columns = torch.randperm(K, generator=generator)[: max(1, K // 1000)]
    magnitude = torch.rand(M, columns.numel(), generator=generator) * 12 + 8
    x[:, columns] = magnitude * torch.sign(torch.randn(M, columns.numel(), generator=generator))
    return x.to(dtype)


@gpu_test
@pytest.mark.parametrize("M", SIZES.real_rows)
@pytest.mark.parametrize("K, N", SIZES.real, ids=[f"{K}x{N}" for K, N in SIZES.real])
def test_gpu_real_shapes(K, N, M, gpu_kernels):
    x = llama_activation(M, K, torch.bfloat16).to(GPU_DEVICE)
    weight, CB, SCB = on_device(*make_weight(N, K, torch.bfloat16))
    bias = make_bias(N, torch.bfloat16).to(GPU_DEVICE)
    assert_int32_exact(x, CB, THRESHOLD)
    if M > 16:  # cuBLAS's int8 GEMM (M > 16 only) as a second, independent oracle
        CA, _, _ = cuda_quantize.quantize_activation(x, 0.0)
        assert torch.equal(cuda_gemm.int8_matmul(CA, CB), torch._int_mm(CA, CB.t()))
    y = cuda_linear.linear(x, CB, SCB, bias, THRESHOLD, weight)
    assert_within_bound(y, x, CB, SCB, bias, THRESHOLD, weight)


@gpu_test
def test_gpu_linear_under_cuda_graph(gpu_kernels):
    # The path never syncs with the host, so it can be captured once and replayed on new data,
    # with outlier columns other than the captured call's (their count lives on the device).
    if GPU_DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    K, N = SIZES.real[0]
    weight, CB, SCB = on_device(*make_weight(N, K, torch.bfloat16))
    for M in (1, 40):  # the small-M kernel, then quantize + GEMM
        static_x = llama_activation(M, K, torch.bfloat16, seed=5).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: compiles and loads the kernels
            cuda_linear.linear(static_x, CB, SCB, None, THRESHOLD, weight)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = cuda_linear.linear(static_x, CB, SCB, None, THRESHOLD, weight)
        fresh = llama_activation(M, K, torch.bfloat16, seed=6).cuda()
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(static_y, cuda_linear.linear(fresh, CB, SCB, None, THRESHOLD, weight))


# ---------------------------------------------------------------- GPU compilation, without a GPU


def _compile_for_gpu(kernel, signature: dict, constexprs: dict, capability: int):
    """Compiles ``kernel`` to a cubin for an NVIDIA GPU of ``capability`` (e.g. 90), no device needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    kernel = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 3})


_OUTLIER_POINTERS = ("column_flag_ptr", "outlier_index_ptr", "outlier_count_ptr")


def _gpu_compile_cases() -> dict:
    """Per kernel, the fully-featured specialization (bf16 input, outliers, bias, fp weight) and the
    one without a threshold (``<kernel>_no_threshold``), whose outlier pointers are ``None``: the
    interpreter never runs the branches one specialization skips, and an H200 found a call through
    a ``None`` pointer there that only the GPU compiler saw. The GEMM also as decode's split-K."""
    cases = _outlier_compile_cases()
    kernel, signature, constexprs = cases["gemm"]
    decode_tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4}
    cases["gemm_split_k"] = (kernel, signature, {**constexprs, **decode_tile})
    for name, (kernel, signature, constexprs) in list(cases.items()):
        flag = "HAS_OUTLIERS" if "HAS_OUTLIERS" in constexprs else "HAS_THRESHOLD"
        pointers = {arg: None for arg in _OUTLIER_POINTERS if arg in signature}
        kept = {arg: kind for arg, kind in signature.items() if arg not in pointers and arg != "threshold"}
        cases[f"{name}_no_threshold"] = (kernel, kept, {**constexprs, flag: False, **pointers, **_threshold_constexpr(signature)})
    return cases


def _threshold_constexpr(signature: dict) -> dict:
    return {"threshold": 0.0} if "threshold" in signature else {}


def _outlier_compile_cases() -> dict:
    """One fully-featured specialization per kernel (bf16 input, outliers, bias, fp weight)."""
    int32 = lambda *names: {name: "i32" for name in names}
    return {
        "row_stats": (
            cuda_quantize._row_stats_kernel,
            {
                "x_ptr": "*bf16",
                "partial_absmax_ptr": "*fp32",
                "column_flag_ptr": "*i32",
                **int32("M", "K", "stride_xm", "stride_xk"),
                "threshold": "fp32",
            },
            {"HAS_THRESHOLD": True, "ONE_ROW_BLOCK": False, "BLOCK_M": 32, "BLOCK_K": 256},
        ),
        "quantize": (
            cuda_quantize._quantize_kernel,
            {
                "x_ptr": "*bf16",
                "partial_absmax_ptr": "*fp32",
                "column_flag_ptr": "*i32",
                "ca_ptr": "*i8",
                "sca_ptr": "*fp32",
                "outlier_index_ptr": "*i32",
                "outlier_count_ptr": "*i32",
                **int32("M", "K", "num_chunks", "stride_xm", "stride_xk", "stride_cam"),
            },
            {"HAS_THRESHOLD": True, "CHUNKS": 16, "BLOCK_M": 32, "BLOCK_K": 256, "COMPACT_BLOCK": 1024},
        ),
        "gemm": (
            cuda_gemm._int8_gemm_kernel,
            {
                "a_ptr": "*i8",
                "b_ptr": "*i8",
                "out_ptr": "*bf16",
                "sca_ptr": "*fp32",
                "scb_ptr": "*fp32",
                "bias_ptr": "*bf16",
                "x_ptr": "*bf16",
                "w_ptr": "*bf16",
                "outlier_index_ptr": "*i32",
                "outlier_count_ptr": "*i32",
                "workspace_ptr": "*i32",
                **int32(
                    "M",
                    "N",
                    "K",
                    "M_BUCKET",
                    "stride_am",
                    "stride_ak",
                    "stride_bn",
                    "stride_bk",
                    "stride_om",
                    "stride_on",
                    "stride_xm",
                    "stride_xk",
                    "stride_wn",
                    "stride_wk",
                ),
            },
            {
                "EPILOGUE": True,
                "HAS_BIAS": True,
                "HAS_OUTLIERS": True,
                "OUTLIER_W_FROM_CB": False,
                "BLOCK_O": 16,
                "BLOCK_M": 128,
                "BLOCK_N": 128,
                "BLOCK_K": 128,
                "GROUP_M": 8,
                "SPLIT_K": 1,
            },
        ),
        "gemv": (
            cuda_gemv._int8_gemv_kernel,
            {
                "x_ptr": "*bf16",
                "b_ptr": "*i8",
                "out_ptr": "*bf16",
                "scb_ptr": "*fp32",
                "bias_ptr": "*bf16",
                "w_ptr": "*bf16",
                "partial_absmax_ptr": "*fp32",
                "column_flag_ptr": "*i32",
                **int32(
                    "M",
                    "N",
                    "K",
                    "num_chunks",
                    "stride_xm",
                    "stride_xk",
                    "stride_bn",
                    "stride_bk",
                    "stride_om",
                    "stride_on",
                    "stride_wn",
                    "stride_wk",
                ),
            },
            {
                "EPILOGUE": True,
                "HAS_THRESHOLD": True,
                "HAS_BIAS": True,
                "OUTLIER_W_FROM_CB": False,
                "CHUNKS": 16,
                "BLOCK_M": 16,
                "BLOCK_N": 32,
                "BLOCK_K": 256,
            },
        ),
    }


def _has_nvidia_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def hopper_ptx(tmp_path_factory) -> Path:
    """PTX of every kernel compiled for sm_90, from a subprocess: under TRITON_INTERPRET=1 (set
    for this process) ``@triton.jit`` makes interpreted functions that cannot be compiled."""
    out = tmp_path_factory.mktemp("ptx")
    script = (
        "import os, sys\n"
        "os.environ['TRITON_INTERPRET'] = '0'\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_kernels_triton import _compile_for_gpu, _gpu_compile_cases\n"
        "for name, case in _gpu_compile_cases().items():\n"
        f"    open(os.path.join({str(out)!r}, name + '.ptx'), 'w').write(_compile_for_gpu(*case, capability=90).asm['ptx'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton has no NVIDIA backend")
@pytest.mark.parametrize("kernel", ["row_stats", "quantize", "gemm", "gemm_split_k", "gemv"])
def test_kernels_compile_without_a_threshold_for_hopper(kernel, hopper_ptx):
    # Threshold 0: the outlier pointers are None, and no branch may still reach them.
    ptx = (hopper_ptx / f"{kernel}_no_threshold.ptx").read_text()
    assert ".entry" in ptx


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton has no NVIDIA backend")
@pytest.mark.parametrize("kernel", ["row_stats", "quantize", "gemm", "gemm_split_k", "gemv"])
def test_kernels_compile_for_hopper(kernel, hopper_ptx):
    # The interpreter never runs Triton's GPU compiler; this does (through ptxas, for sm_90),
    # catching type and lowering errors, and checks the instructions the numerics rely on.
    ptx = (hopper_ptx / f"{kernel}.ptx").read_text()
    if kernel == "row_stats":
        assert "max.NaN.f32" in ptx  # the row absmax keeps NaN (plain max.f32 drops it: a NaN row came out finite)
    if kernel in ("quantize", "gemv"):
        assert "div.rn.f32" in ptx  # the IEEE division the reference's scales need
    if kernel == "gemm":
        assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx  # Hopper int8 tensor cores
    if kernel == "gemv":
        assert "mma.sync.aligned.m16n8k32" in ptx and ".s32.s8.s8.s32" in ptx  # 16-row int8 MMA
    if kernel == "gemm_split_k":
        # Partial sums added in L2, then the tile's arrival counted with acquire-release after a
        # barrier (so every thread's sums are in), and the last program reading the total from L2.
        adds, arrival = ptx.find(".global.gpu.relaxed.add.u32"), ptx.find("atom.global.gpu.acq_rel.add.u32")
        assert 0 <= adds < arrival and "bar.sync" in ptx[adds:arrival]
        assert "ld.global.cg.b32" in ptx[arrival:]
    if kernel in ("gemm", "gemm_split_k", "gemv"):
        assert ".f32.bf16.bf16" in ptx  # the outlier product on bf16 tensor cores, not widened to fp32
