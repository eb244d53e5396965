"""Activation quantization fused with outlier detection (Triton, CUDA path).

From ``X [M, K]`` (fp16 / bf16 / fp32) it produces, in two launches that each read ``X``
once (plus a memset of the ``K`` column flags):

1. ``_row_stats_kernel``: per row, the absmax over the *non-outlier elements* (``SCA``,
   fp32, not divided by 127) and a flag for every outlier column. A program sees only its
   rows, so it marks a column by storing 1 into the shared flag: every writer writes the
   same value, so the race is benign and no atomics are needed.
2. ``_quantize_kernel``: ``CA = round(x * (127 / SCA))`` as int8, outlier columns zeroed.
   Program 0 also compacts the flags into the sorted outlier column indices and their
   count. The GEMM reads both on device, so nothing syncs with the host (CUDA graphs and
   torch.compile stay happy) and the fp outlier GEMM needs no separate launch.

Numerics are bit-identical to ``int8fx.reference.quantize_activation``; the two jit
helpers below are shared with the small-M kernel so both paths quantize identically.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from int8fx import reference

# The quantization's constants, as Triton reads module globals: constexpr objects only.
INT8_MAX = tl.constexpr(float(reference.INT8_MAX))
INT8_MAX_SQUARED = tl.constexpr(float(reference.INT8_MAX**2))

# Memory-bound kernels: a tile of 8 rows x 256 columns (2048 elements, 16 per thread with
# 4 warps) keeps loads wide and gives M / 8 programs, enough to fill a GPU from M = 1024.
# Not tuned on hardware yet; the interpreter runs the same sizes.
BLOCK_M = 8
BLOCK_K = 256
NUM_WARPS = 4


class OutlierColumns(NamedTuple):
    """Outlier columns in compact form, left on the device (no host sync)."""

    index: Tensor  # int32 [K]; the first ``count`` entries are the columns, ascending
    count: Tensor  # int32 [1]


class QuantizedActivation(NamedTuple):
    CA: Tensor  # int8 [M, K], outlier columns zeroed
    SCA: Tensor  # fp32 [M], absmax over the non-outlier elements of each row
    outliers: Optional[OutlierColumns]  # None when threshold <= 0


# ---------------------------------------------------------------- shared jit helpers

@triton.jit
def row_inverse_scale(absmax):
    """``127 / absmax`` per row, 0 where absmax is 0, rounded exactly as the reference.

    The reference writes ``127 / absmax``, which torch evaluates as
    ``reciprocal(absmax) * 127`` (two roundings); ``div_rn`` is the IEEE-exact division
    (plain ``/`` is approximate on NVIDIA GPUs).
    """
    has_scale = absmax > 0
    return tl.where(has_scale, tl.math.div_rn(1.0, tl.where(has_scale, absmax, 1.0)) * INT8_MAX, 0.0)


@triton.jit
def update_row_absmax(absmax, magnitude):
    """``max(absmax, max of each row of magnitude [rows, cols])``, NaN once a NaN is seen, as the
    reference's ``amax``. ``tl.max`` and ``tl.maximum`` drop NaN (IEEE maxNum, on GPUs and in the
    interpreter alike), which quantized a NaN row as if it were finite and gave it a finite output.
    (A ``tl.reduce`` with a NaN-keeping combine would say the same, but the interpreter runs such a
    reduce element by element, 100x slower.)"""
    row_max = tl.max(magnitude, axis=1)
    row_has_nan = tl.max((magnitude != magnitude).to(tl.int32), axis=1) > 0
    row_max = tl.where(row_has_nan, float("nan"), row_max)
    return tl.maximum(absmax, row_max, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_values(x32, inverse_scale):
    """``round_half_even(x32 * inverse_scale)`` clamped to [-127, 127], as int8."""
    scaled = x32 * inverse_scale
    # Clamping first is equivalent (rounding is monotone and the bounds are integers) and
    # keeps the product from being contracted into an FMA with the add below, which would
    # skip the product's fp32 rounding that torch performs.
    scaled = tl.minimum(tl.maximum(scaled, -INT8_MAX), INT8_MAX)
    # Round half to even without libdevice (the interpreter has none): adding 1.5 * 2**23
    # moves |v| <= 2**22 into [2**23, 2**24), where fp32 values are 1 apart, so the add
    # itself rounds to an integer in the IEEE default mode (ties to even); the subtraction
    # is exact.
    magic = 12582912.0
    rounded = (scaled + magic) - magic
    return rounded.to(tl.int8)


# ---------------------------------------------------------------- kernels

@triton.jit
def _row_stats_kernel(
    x_ptr, absmax_ptr, column_flag_ptr,
    M, K, stride_xm, stride_xk,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    threshold = tl.cast(threshold, tl.float32)  # fp64 when launched from inductor code
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        magnitude = tl.abs(x.to(tl.float32))
        if HAS_THRESHOLD:
            is_outlier = magnitude >= threshold
            magnitude = tl.where(is_outlier, 0.0, magnitude)
            column_hit = tl.max(is_outlier.to(tl.int32), axis=0) > 0
            tl.store(column_flag_ptr + cols, tl.full([BLOCK_K], 1, tl.int32), mask=column_hit)
        absmax = update_row_absmax(absmax, magnitude)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)


@triton.jit
def _quantize_kernel(
    x_ptr, absmax_ptr, column_flag_ptr, ca_ptr, outlier_index_ptr, outlier_count_ptr,
    M, K, stride_xm, stride_xk, stride_cam,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    inverse_scale = row_inverse_scale(tl.load(absmax_ptr + rows, mask=row_ok, other=0.0))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        q = quantize_values(x.to(tl.float32), inverse_scale[:, None])
        if HAS_THRESHOLD:
            is_column = tl.load(column_flag_ptr + cols, mask=col_ok, other=0) > 0
            q = tl.where(is_column[None, :], 0, q).to(tl.int8)
        tl.store(ca_ptr + rows[:, None] * stride_cam + cols[None, :], q, mask=mask)
    if HAS_THRESHOLD:
        if pid == 0:
            _compact_columns(column_flag_ptr, outlier_index_ptr, outlier_count_ptr, K, BLOCK_K)


@triton.jit
def _compact_columns(column_flag_ptr, outlier_index_ptr, outlier_count_ptr, K, BLOCK_K: tl.constexpr):
    """Writes the flagged column indices, ascending, and their count (an exclusive scan)."""
    count = 0
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        flag = tl.load(column_flag_ptr + cols, mask=cols < K, other=0)
        slot = count + tl.cumsum(flag, axis=0) - flag
        tl.store(outlier_index_ptr + slot, cols, mask=flag > 0)
        count += tl.sum(flag, axis=0)
    tl.store(outlier_count_ptr, count)


# ---------------------------------------------------------------- host entry

def quantize_activation(x2d: Tensor, threshold: float) -> QuantizedActivation:
    """Row-wise int8 quantization of ``x2d [M, K]`` around its outlier columns."""
    M, K = x2d.shape
    device = x2d.device
    has_threshold = threshold > 0
    SCA = torch.empty(M, dtype=torch.float32, device=device)
    CA = torch.empty((M, K), dtype=torch.int8, device=device)
    column_flag = outliers = None
    if has_threshold:
        column_flag = torch.zeros(K, dtype=torch.int32, device=device)
        outliers = OutlierColumns(torch.empty(K, dtype=torch.int32, device=device), torch.empty(1, dtype=torch.int32, device=device))
    if M == 0:  # no program would run to write the count
        if outliers is not None:
            outliers.count.zero_()
        return QuantizedActivation(CA, SCA, outliers)
    grid = (triton.cdiv(M, BLOCK_M),)
    _row_stats_kernel[grid](
        x2d, SCA, column_flag,
        M, K, x2d.stride(0), x2d.stride(1),
        float(threshold),
        HAS_THRESHOLD=has_threshold, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    _quantize_kernel[grid](
        x2d, SCA, column_flag, CA,
        None if outliers is None else outliers.index,
        None if outliers is None else outliers.count,
        M, K, x2d.stride(0), x2d.stride(1), CA.stride(0),
        HAS_THRESHOLD=has_threshold, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    return QuantizedActivation(CA, SCA, outliers)
