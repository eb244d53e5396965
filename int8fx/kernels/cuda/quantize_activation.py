"""Activation quantization fused with outlier detection (Triton, CUDA path).

From ``X [M, K]`` (fp16 / bf16 / fp32) it produces, in two launches that each read ``X``
once (plus a memset of the ``K`` column flags where several row blocks share a column):

1. ``_row_stats_kernel``: one program per ``[BLOCK_M, BLOCK_K]`` tile of ``X``. It writes
   its rows' absmax over the *non-outlier elements* of its columns (a partial absmax,
   ``[K chunks, M]`` fp32) and marks its outlier columns in a flag array. Programs that
   share a column store 1 into the same flag: every writer writes the same value, so the
   race is benign and no atomics are needed.
2. ``_quantize_kernel``: one program per tile again. It reduces its rows' partial absmax
   (``SCA``, fp32, not divided by 127), writes ``CA = round(x * (127 / SCA))`` as int8 with
   the outlier columns zeroed. One extra program compacts the flags into the sorted outlier
   column indices and their count. The GEMM reads both on device, so nothing syncs with the
   host (CUDA graphs and torch.compile stay happy) and the fp outlier GEMM needs no launch.

Every program does one tile (no loop over K): an H200 showed the earlier design, one program
per 8 rows looping over K, latency-bound at 0.4 TB/s with outliers (88 µs at M = 4096,
K = 4096, where the copy rate allows 12). The small-M kernel runs launch 1 alone and reduces
the partials itself (``activation_stats``).

Numerics are bit-identical to ``int8fx.reference.quantize_activation``; the jit helpers
below are shared with the small-M kernel so both paths quantize identically.
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

# Memory-bound kernels: a tile of 32 rows x 256 columns (8192 elements, 64 per thread with 4
# warps) per program; K = 4096 at M = 64 is 2 x 16 programs, at M = 4096 2048 of them. The
# small-M path uses 16-row tiles (all of its rows). Flags are compacted 1024 at a time.
BLOCK_M = 32
BLOCK_K = 256
COMPACT_BLOCK = 1024
NUM_WARPS = 4


class OutlierColumns(NamedTuple):
    """Outlier columns in compact form, left on the device (no host sync)."""

    index: Tensor  # int32 [K]; the first ``count`` entries are the columns, ascending
    count: Tensor  # int32 [1]


class QuantizedActivation(NamedTuple):
    CA: Tensor  # int8 [M, K], outlier columns zeroed
    SCA: Tensor  # fp32 [M], absmax over the non-outlier elements of each row
    outliers: Optional[OutlierColumns]  # None when threshold <= 0


class ActivationStats(NamedTuple):
    """What ``_row_stats_kernel`` leaves on the device for a kernel that quantizes ``X`` itself."""

    partial_absmax: Tensor  # fp32 [K chunks, M]: each row's absmax over one BLOCK_K chunk
    column_flag: Optional[Tensor]  # int32 [K], 1 for an outlier column; None when threshold <= 0


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


@triton.jit
def reduce_partial_absmax(partial_ptr, rows, row_ok, M, num_chunks, CHUNKS: tl.constexpr):
    """The absmax of ``rows`` over their ``num_chunks`` partials (``[num_chunks, M]``, row stride
    ``M``), NaN where any partial is NaN (``tl.max`` would drop it). ``CHUNKS``: a power of two
    at least ``num_chunks``."""
    chunks = tl.arange(0, CHUNKS)
    mask = (chunks < num_chunks)[:, None] & row_ok[None, :]
    partial = tl.load(partial_ptr + chunks[:, None] * M + rows[None, :], mask=mask, other=0.0)
    row_max = tl.max(partial, axis=0)
    row_has_nan = tl.max((partial != partial).to(tl.int32), axis=0) > 0
    return tl.where(row_has_nan, float("nan"), row_max)


# ---------------------------------------------------------------- kernels

@triton.jit
def _row_stats_kernel(
    x_ptr, partial_absmax_ptr, column_flag_ptr,
    M, K, stride_xm, stride_xk,
    threshold,
    HAS_THRESHOLD: tl.constexpr, ONE_ROW_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    threshold = tl.cast(threshold, tl.float32)  # fp64 when launched from inductor code
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    magnitude = tl.abs(x.to(tl.float32))
    if HAS_THRESHOLD:
        is_outlier = magnitude >= threshold
        magnitude = tl.where(is_outlier, 0.0, magnitude)
        column_hit = tl.max(is_outlier.to(tl.int32), axis=0)
        if ONE_ROW_BLOCK:  # this program is its columns' only writer: no memset needed
            tl.store(column_flag_ptr + cols, column_hit, mask=col_ok)
        else:  # the flags were zeroed; only hits are written (the benign race)
            tl.store(column_flag_ptr + cols, column_hit, mask=col_ok & (column_hit > 0))
    absmax = update_row_absmax(tl.zeros([BLOCK_M], dtype=tl.float32), magnitude)
    tl.store(partial_absmax_ptr + pid_k * M + rows, absmax, mask=row_ok)


@triton.jit
def _quantize_kernel(
    x_ptr, partial_absmax_ptr, column_flag_ptr, ca_ptr, sca_ptr, outlier_index_ptr, outlier_count_ptr,
    M, K, num_chunks, stride_xm, stride_xk, stride_cam,
    HAS_THRESHOLD: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT_BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_m == tl.cdiv(M, BLOCK_M):  # the extra row of programs (threshold > 0 only)
        if HAS_THRESHOLD:  # compiled only where the flag pointers exist
            if pid_k == 0:
                _compact_columns(column_flag_ptr, outlier_index_ptr, outlier_count_ptr, K, COMPACT_BLOCK)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < K
        absmax = reduce_partial_absmax(partial_absmax_ptr, rows, row_ok, M, num_chunks, CHUNKS)
        if pid_k == 0:
            tl.store(sca_ptr + rows, absmax, mask=row_ok)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        q = quantize_values(x.to(tl.float32), row_inverse_scale(absmax)[:, None])
        if HAS_THRESHOLD:
            is_column = tl.load(column_flag_ptr + cols, mask=col_ok, other=0) > 0
            q = tl.where(is_column[None, :], 0, q).to(tl.int8)
        tl.store(ca_ptr + rows[:, None] * stride_cam + cols[None, :], q, mask=mask)


@triton.jit
def _compact_columns(column_flag_ptr, outlier_index_ptr, outlier_count_ptr, K, BLOCK: tl.constexpr):
    """Writes the flagged column indices, ascending, and their count (an exclusive scan)."""
    count = 0
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        flag = tl.load(column_flag_ptr + cols, mask=cols < K, other=0)
        slot = count + tl.cumsum(flag, axis=0) - flag
        tl.store(outlier_index_ptr + slot, cols, mask=flag > 0)
        count += tl.sum(flag, axis=0)
    tl.store(outlier_count_ptr, count)


# ---------------------------------------------------------------- host entry

def chunk_count(K: int) -> int:
    """How many ``BLOCK_K`` chunks the partial absmax of a row has."""
    return triton.cdiv(K, BLOCK_K)


def activation_stats(x2d: Tensor, threshold: float, block_m: int = BLOCK_M) -> ActivationStats:
    """Launch 1 alone: partial row absmax and outlier column flags of ``x2d [M, K]`` (``M > 0``)."""
    M, K = x2d.shape
    row_blocks = triton.cdiv(M, block_m)
    partial_absmax = torch.empty((chunk_count(K), M), dtype=torch.float32, device=x2d.device)
    column_flag = None
    if threshold > 0:
        allocate = torch.empty if row_blocks == 1 else torch.zeros
        column_flag = allocate(K, dtype=torch.int32, device=x2d.device)
    _row_stats_kernel[(row_blocks, chunk_count(K))](
        x2d, partial_absmax, column_flag,
        M, K, x2d.stride(0), x2d.stride(1),
        float(threshold),
        HAS_THRESHOLD=threshold > 0, ONE_ROW_BLOCK=row_blocks == 1,
        BLOCK_M=block_m, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    return ActivationStats(partial_absmax, column_flag)


def quantize_activation(x2d: Tensor, threshold: float) -> QuantizedActivation:
    """Row-wise int8 quantization of ``x2d [M, K]`` around its outlier columns."""
    M, K = x2d.shape
    device = x2d.device
    has_threshold = threshold > 0
    SCA = torch.empty(M, dtype=torch.float32, device=device)
    CA = torch.empty((M, K), dtype=torch.int8, device=device)
    outliers = None
    if has_threshold:
        outliers = OutlierColumns(torch.empty(K, dtype=torch.int32, device=device), torch.empty(1, dtype=torch.int32, device=device))
    if M == 0:  # no program would run to write the count
        if outliers is not None:
            outliers.count.zero_()
        return QuantizedActivation(CA, SCA, outliers)
    stats = activation_stats(x2d, threshold)
    grid = (triton.cdiv(M, BLOCK_M) + int(has_threshold), chunk_count(K))
    _quantize_kernel[grid](
        x2d, stats.partial_absmax, stats.column_flag, CA, SCA,
        None if outliers is None else outliers.index,
        None if outliers is None else outliers.count,
        M, K, chunk_count(K), x2d.stride(0), x2d.stride(1), CA.stride(0),
        HAS_THRESHOLD=has_threshold, CHUNKS=triton.next_power_of_2(chunk_count(K)),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, COMPACT_BLOCK=COMPACT_BLOCK, num_warps=NUM_WARPS,
    )
    return QuantizedActivation(CA, SCA, outliers)
