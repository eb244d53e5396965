"""Small-M (decode, ``M <= 16``) LLM.int8() linear in two Triton launches.

At decode time the int8 weight is the only large operand, so the main kernel is GEMV-shaped:
one program per ``BLOCK_N`` output features, each holding all (at most 16) rows of ``X``,
so every byte of ``CB`` is read exactly once and there is no second pass over the output.

Launch 1 is ``quantize_activation``'s row-statistics kernel on 16-row tiles: one program
per ``BLOCK_K`` chunk of ``X`` writes its rows' partial absmax and its outlier columns' flags.
Launch 2 (this kernel) reduces the partials to each row's scale, then quantizes each ``X``
tile on the fly in its main loop, zeroes the flagged columns and multiplies them in fp
instead. ``CA`` never reaches global memory. Quantization uses the same jit helpers as
``quantize_activation``, so ``CA`` and ``SCA`` are bit-identical to the reference.

Not dispatched by ``linear``: on an H200 (4096x4096, M = 1) this version took 28 µs at
threshold 0 and 45 µs at 6, the first one (row statistics in every program) 19 and 38, where
quantize + GEMM took 20 µs at M = 64. The K loop, which quantizes in registers before each
MMA, is bound by latency rather than by the weight's bytes. ``bench_linear``'s
``int8fx fused gemv t=6`` provider keeps measuring it.

Not done: split-K. When ``N / BLOCK_N`` is below the GPU's SM count (small models) part of
the GPU idles; split-K would fix that at the cost of a reduction (workspace or atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from int8fx.kernels.cuda import quantize_activation
from int8fx.kernels.cuda.int8_gemm import INTERPRETING, dequantize_accumulator, outlier_dot, outlier_weight_tile, round_to
from int8fx.kernels.cuda.quantize_activation import INT8_MAX, quantize_values, reduce_partial_absmax, row_inverse_scale

# Largest M this kernel takes: the rows of one tl.dot tile (16 is the MMA minimum).
MAX_M = 16


def _gemv_configs() -> list[triton.Config]:
    """Narrow N tiles give enough programs to cover the SMs (N = 4096 / 32 = 128 programs);
    long K tiles and several stages keep enough weight bytes in flight to stream at HBM
    speed. The autotuner picks per (N, K) and specialization."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_stages=num_stages, num_warps=4)
        for block_n in (16, 32, 64)
        for block_k, num_stages in ((256, 4), (512, 3))
    ]


# The key holds the specializations besides the sizes: the config tuned at threshold 0 was reused at
# threshold 6 (same N, K) on an H200, where its fp outlier tiles needed 256 KiB of shared memory.
@triton.autotune(configs=_gemv_configs(), key=["N", "K", "EPILOGUE", "HAS_THRESHOLD", "OUTLIER_W_FROM_CB"])
@triton.jit
def _int8_gemv_kernel(
    # pointers
    x_ptr, b_ptr, out_ptr, scb_ptr, bias_ptr, w_ptr, partial_absmax_ptr, column_flag_ptr,
    # sizes
    M, N, K, num_chunks,
    # strides
    stride_xm, stride_xk, stride_bn, stride_bk, stride_om, stride_on, stride_wn, stride_wk,
    # meta-parameters
    EPILOGUE: tl.constexpr, HAS_THRESHOLD: tl.constexpr, HAS_BIAS: tl.constexpr, OUTLIER_W_FROM_CB: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    absmax = reduce_partial_absmax(partial_absmax_ptr, rm, row_ok, M, num_chunks, CHUNKS)
    inverse_scale = row_inverse_scale(absmax)

    # Quantize each X tile, int8 MMA with the weight tile, fp MMA on the flagged (outlier) columns.
    b_ptrs = b_ptr + (rn % N)[None, :] * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_outliers = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    scb = tl.load(scb_ptr + rn, mask=col_ok, other=0.0)
    scb_step = tl.math.div_rn(scb, INT8_MAX)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs + k0 * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x32 = x.to(tl.float32)
        q = quantize_values(x32, inverse_scale[:, None])
        b = tl.load(b_ptrs + k0 * stride_bk, mask=k_ok[:, None], other=0)
        if HAS_THRESHOLD:
            is_column = tl.load(column_flag_ptr + k0 + rk, mask=k_ok, other=0) > 0
            q = tl.where(is_column[None, :], 0, q).to(tl.int8)
            if tl.max(is_column.to(tl.int32), axis=0) > 0:
                x_outliers = tl.where(is_column[None, :], x, 0.0)
                w_tile = outlier_weight_tile(b_ptr, w_ptr, scb_step, rn, k0 + rk, is_column[:, None] & col_ok[None, :],
                                             stride_bn, stride_bk, stride_wn, stride_wk, OUTLIER_W_FROM_CB)
                acc_outliers = outlier_dot(x_outliers, w_tile, acc_outliers)
        acc = tl.dot(q, b, acc, out_dtype=tl.int32)

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    out_mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE:
        y = dequantize_accumulator(acc, absmax, scb)
        if HAS_THRESHOLD:
            y += acc_outliers
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, round_to(y, out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


def int8_linear_small_m(
    x2d: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float,
    weight: Optional[Tensor], *, epilogue: bool = True,
) -> Tensor:
    """LLM.int8() ``x2d [M <= 16, K]`` times ``CB [N, K]``: ``[M, N]`` in ``x2d``'s dtype.

    ``epilogue=False`` returns the exact int32 ``CA @ CB.T`` instead (tests, debugging).
    """
    M, K = x2d.shape
    N = CB.shape[0]
    if M > MAX_M:
        raise ValueError(f"the small-M kernel takes at most {MAX_M} rows, got {M}")
    out = torch.empty((M, N), dtype=x2d.dtype if epilogue else torch.int32, device=x2d.device)
    if M == 0 or N == 0:
        return out
    stats = quantize_activation.activation_stats(x2d, threshold, block_m=MAX_M)
    chunks = stats.partial_absmax.shape[0]
    w_strides = (0, 0) if weight is None else weight.stride()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _int8_gemv_kernel[grid](
        x2d, CB, out, SCB, bias, weight, stats.partial_absmax, stats.column_flag,
        M, N, K, chunks,
        *x2d.stride(), *CB.stride(), *out.stride(), *w_strides,
        EPILOGUE=epilogue, HAS_THRESHOLD=threshold > 0, HAS_BIAS=bias is not None,
        OUTLIER_W_FROM_CB=weight is None, CHUNKS=triton.next_power_of_2(chunks), BLOCK_M=MAX_M,
    )
    return out
