"""Small-M (decode, ``M <= 16``) LLM.int8() linear in a single Triton launch.

At decode time the int8 weight is the only large operand, so the kernel is GEMV-shaped:
one program per ``BLOCK_N`` output features, each holding all (at most 16) rows of ``X``,
so every byte of ``CB`` is read exactly once and there is no second pass over the output.

With all rows in one program, a program can also derive the activation statistics itself:
it reads ``X`` once for the row absmax over non-outlier elements, then again in the main
loop, where it quantizes each ``X`` tile on the fly, finds that tile's outlier columns
(every row is present) and multiplies them in fp. That replaces the three launches of the
large-M path (flag memset, row stats, quantize) and keeps ``CA`` out of global memory.
The price is re-reading ``X`` from L2 in every program: ``2 * N / BLOCK_N * |X|`` bytes,
small next to the weight at M = 1 but comparable to it at M = 16 with a narrow
``BLOCK_N`` (the autotuner weighs this when it picks ``BLOCK_N``). Quantization uses the same jit helpers as
``quantize_activation``, so ``CA`` and ``SCA`` are bit-identical to the reference.

Not done: split-K. When ``N / BLOCK_N`` is below the GPU's SM count (small models) part of
the GPU idles; split-K would fix that at the cost of a reduction (workspace or atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from int8fx.kernels.cuda.int8_gemm import INTERPRETING, dequantize_accumulator, outlier_dot, outlier_weight_tile, round_to
from int8fx.kernels.cuda.quantize_activation import INT8_MAX, quantize_values, row_inverse_scale, update_row_absmax

# Largest M this kernel takes: the rows of one tl.dot tile (16 is the MMA minimum).
MAX_M = 16


def _gemv_configs() -> list[triton.Config]:
    """Narrow N tiles give enough programs to cover the SMs (N = 4096 / 32 = 128 programs);
    long K tiles and several stages keep enough weight bytes in flight to stream at HBM
    speed. Not yet measured on a GPU; the autotuner picks per (N, K)."""
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
    x_ptr, b_ptr, out_ptr, scb_ptr, bias_ptr, w_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_bn, stride_bk, stride_om, stride_on, stride_wn, stride_wk,
    threshold,
    # meta-parameters
    EPILOGUE: tl.constexpr, HAS_THRESHOLD: tl.constexpr, HAS_BIAS: tl.constexpr, OUTLIER_W_FROM_CB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    threshold = tl.cast(threshold, tl.float32)  # fp64 when launched from inductor code
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk

    # Pass 1: row absmax over the non-outlier elements (every program computes the same).
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0 * stride_xk, mask=row_ok[:, None] & (rk < K - k0)[None, :], other=0.0)
        magnitude = tl.abs(x.to(tl.float32))
        if HAS_THRESHOLD:
            magnitude = tl.where(magnitude >= threshold, 0.0, magnitude)
        absmax = update_row_absmax(absmax, magnitude)
    inverse_scale = row_inverse_scale(absmax)

    # Pass 2: quantize each X tile, int8 MMA with the weight tile, fp MMA on outlier columns.
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
            is_column = tl.max((tl.abs(x32) >= threshold).to(tl.int32), axis=0) > 0
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
    w_strides = (0, 0) if weight is None else weight.stride()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _int8_gemv_kernel[grid](
        x2d, CB, out, SCB, bias, weight,
        M, N, K,
        *x2d.stride(), *CB.stride(), *out.stride(), *w_strides,
        float(threshold),
        EPILOGUE=epilogue, HAS_THRESHOLD=threshold > 0, HAS_BIAS=bias is not None,
        OUTLIER_W_FROM_CB=weight is None, BLOCK_M=MAX_M,
    )
    return out
