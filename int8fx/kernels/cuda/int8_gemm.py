"""int8 GEMM with the whole LLM.int8() epilogue fused (Triton, CUDA path).

``Y = CA @ CB.T * SCA[:, None] * SCB[None, :] / 127**2 + X[:, O] @ W[:, O].T + bias``
in one kernel: the int8 tiles go through ``tl.dot`` with exact int32 accumulation, then
the same program dequantizes, adds the outlier columns' fp product (gathered through the
compact column list of ``quantize_activation``), adds the bias and writes the
output once in the input's dtype. No int32 or fp32 intermediate reaches global memory and
there is no separate fp GEMM launch for the outliers.

Decode (M <= 16): a 16-row tile per program leaves most SMs idle when ``N / BLOCK_N`` is
below the SM count (64 programs for N = 4096 on 132 SMs), each streaming its whole K. Split-K
configs cut K into ``SPLIT_K`` ranges, one program each: the int32 partial sums are added
into a zeroed workspace with atomics (int32 addition is exact in any order, so the result is
bit-identical), and the program that arrives last at a tile, counted by a per-tile atomic,
runs the epilogue on the total. The autotuner times them against the unsplit tiles. Every call
at M <= 16 zeroes a fresh workspace (one memset launch), whichever tile wins.

Weight layout: ``CB [N, K]`` int8 row-major, as ``quantize_weight`` makes it. Both
operands are then K-major, which is what int8 MMA (and Hopper's wgmma, which has no
transposed 8-bit operands) wants, so no repacking helper is needed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from int8fx.kernels.cuda.quantize_activation import INT8_MAX, INT8_MAX_SQUARED, OutlierColumns

# Kernels are traced by the CPU interpreter in the tests (tests/conftest.py); there,
# autotuning would only multiply the (slow) runs, so a single large-tile config is used.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Outlier columns handled per step of the fused fp part (tl.dot needs >= 16).
BLOCK_O = 16


# ---------------------------------------------------------------- shared jit helpers

@triton.jit
def dequantize_accumulator(acc, sca, scb):
    """``C32 * (SCA[:, None] * SCB[None, :]) / 127**2`` in fp32, with the reference's roundings."""
    return tl.math.div_rn(acc.to(tl.float32) * (sca[:, None] * scb[None, :]), INT8_MAX_SQUARED)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype``, to nearest even, as torch's ``.to(dtype)``.

    bf16 is rounded by hand because the interpreter truncates fp32 -> bf16 casts (GPUs
    round to nearest even either way): add half a bf16 ulp minus one, plus the bit that
    breaks ties to even, and keep the top 16 bits. NaN goes through the plain cast: the
    add carries out of a NaN's payload (NVIDIA's canonical NaN is 0x7FFFFFFF), which made
    it -0 on an H200.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(dtype)


@triton.jit
def outlier_weight_tile(
    b_ptr, w_ptr, scb_step, rn, cols, mask,
    stride_bn, stride_bk, stride_wn, stride_wk,
    W_FROM_CB: tl.constexpr,
):
    """Weight columns ``cols`` for output features ``rn`` as a ``[len(cols), len(rn)]`` fp32 tile.

    ``W_FROM_CB``: dequantized ``CB * (SCB / 127)`` (``scb_step``), as bitsandbytes does;
    otherwise the kept fp weight. The caller rounds it to the input dtype, as the reference.
    """
    if W_FROM_CB:
        cb = tl.load(b_ptr + rn[None, :] * stride_bn + cols[:, None] * stride_bk, mask=mask, other=0)
        return cb.to(tl.float32) * scb_step[None, :]
    else:
        return tl.load(w_ptr + rn[None, :] * stride_wn + cols[:, None] * stride_wk, mask=mask, other=0.0).to(tl.float32)


# On a GPU the outlier product of fp16 / bf16 inputs runs on the tensor cores in that dtype: each
# product of two such values is exact in the fp32 accumulator, so only the summation order differs
# from the reference. The interpreter cannot multiply bf16 tiles and takes the fp32 route.
NATIVE_OUTLIER_DOT = tl.constexpr(not INTERPRETING)


@triton.jit
def outlier_dot(x_tile, w_tile, acc):
    """``acc + x_tile @ w_tile`` with ``w_tile`` rounded to ``x_tile``'s dtype first.

    Products of two fp16/bf16/fp32 values are formed and summed in fp32 (fp32 inputs as
    "ieee": no TF32). The fp32 route (fp32 inputs; every input in the interpreter) costs two
    to four times the shared memory of the native one: an H200 ran out of it with a tuned
    GEMV tile.
    """
    w_tile = round_to(w_tile, x_tile.dtype)
    if NATIVE_OUTLIER_DOT and x_tile.dtype != tl.float32:
        return tl.dot(x_tile, w_tile, acc, out_dtype=tl.float32)
    else:
        return tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")


# ---------------------------------------------------------------- configs

def _gemm_configs() -> list[triton.Config]:
    """Tile shapes for int8 MMA on A100 / H100 (``BLOCK_K = 128`` bytes: one 128-B row per load).

    Shared memory per stage is ``(BLOCK_M + BLOCK_N) * BLOCK_K`` bytes (48 KiB for
    128x256); configs that do not fit a GPU fail to compile and the autotuner skips them.
    The list spans the usual int8 GEMM shapes and the autotuner picks per (M bucket, N, K);
    an H200's picks are in benchmarks/README.md.
    """
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "SPLIT_K": 1}, num_warps=4)]

    def config(block_m, block_n, block_k, num_stages, num_warps, split_k=1):
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "SPLIT_K": split_k}
        return triton.Config(meta, num_stages=num_stages, num_warps=num_warps)

    return [
        # large M (>= 512): big tiles amortize operand loads over more MMAs
        config(128, 256, 128, 3, 8),
        config(256, 128, 128, 3, 8),
        config(128, 128, 128, 4, 8),
        # medium M (32 to 256): fewer wasted rows, more programs
        config(64, 256, 128, 3, 8),
        config(64, 128, 128, 4, 4),
        config(128, 64, 128, 4, 4),
        # small M (17 to 32): deeper K steps keep the weight stream going
        config(32, 128, 256, 3, 4),
        config(32, 64, 256, 4, 4),
        # M up to 128 streams the weight: narrow N tiles give enough programs to fill the SMs
        # (on an H200 at M = 64, 4096x4096, the best of the above took 10 µs, 1.6 TB/s)
        config(64, 64, 256, 4, 4),
        config(32, 32, 512, 3, 4),
        # decode (M <= 16): one 16-row MMA tile, the weight streamed once
        config(16, 64, 256, 4, 4),
        config(16, 32, 512, 3, 4),
        # decode, K split between 4 or 8 programs per tile (more programs than SMs from N = 2048)
        config(16, 64, 256, 4, 4, split_k=4),
        config(16, 64, 128, 4, 4, split_k=8),
        config(16, 32, 256, 4, 4, split_k=4),
    ]


# Split-K configs run at M <= 16 only: the workspace they add into is zeroed for those calls.
SPLIT_K_MAX_M = 16
# The narrowest split-K tile, which sizes the per-tile arrival counters.
SPLIT_K_MIN_BLOCK_M, SPLIT_K_MIN_BLOCK_N = 16, 32


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drops tiles taller than the M bucket (their extra rows would be pure waste), the 16-row
    decode tiles above M = 16 (they would stream the weight once per 16 rows) and split-K above
    ``SPLIT_K_MAX_M`` (no workspace)."""
    m_bucket = named_args["M_BUCKET"]

    def fits(c: triton.Config) -> bool:
        meta = c.kwargs
        if meta["SPLIT_K"] > 1 and m_bucket > SPLIT_K_MAX_M:
            return False
        return meta["BLOCK_M"] <= max(m_bucket, 32) and (m_bucket <= 16 or meta["BLOCK_M"] > 16)

    kept = [c for c in configs if fits(c)]
    return kept or [c for c in configs if c.kwargs["SPLIT_K"] == 1]


def m_bucket(M: int) -> int:
    """Autotuning key for M: its next power of two, so a new batch size reuses a tuned config."""
    return triton.next_power_of_2(M)


# ---------------------------------------------------------------- kernel

@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id to (pid_m, pid_n), walking GROUP_M row-tiles per column so B tiles are reused in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows
    return pid_m, pid_n


@triton.jit
def _finish_tile(
    acc, rm, rn, row_ok, col_ok, out_mask,
    b_ptr, out_ptr, sca_ptr, scb_ptr, bias_ptr, x_ptr, w_ptr, outlier_index_ptr, outlier_count_ptr,
    stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk, stride_wn, stride_wk,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, OUTLIER_W_FROM_CB: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Stores a tile's exact int32 sums ``acc``, or (``EPILOGUE``) the LLM.int8() output from them."""
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    if EPILOGUE:
        sca = tl.load(sca_ptr + rm, mask=row_ok, other=0.0)
        scb = tl.load(scb_ptr + rn, mask=col_ok, other=0.0)
        y = dequantize_accumulator(acc, sca, scb)
        if HAS_OUTLIERS:
            scb_step = tl.math.div_rn(scb, INT8_MAX)
            count = tl.load(outlier_count_ptr)
            for j0 in range(0, count, BLOCK_O):
                j = j0 + tl.arange(0, BLOCK_O)
                j_ok = j < count
                cols = tl.load(outlier_index_ptr + j, mask=j_ok, other=0)
                x_tile = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :] * stride_xk,
                                 mask=row_ok[:, None] & j_ok[None, :], other=0.0)
                w_tile = outlier_weight_tile(b_ptr, w_ptr, scb_step, rn, cols, j_ok[:, None] & col_ok[None, :],
                                             stride_bn, stride_bk, stride_wn, stride_wk, OUTLIER_W_FROM_CB)
                y = outlier_dot(x_tile, w_tile, y)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, round_to(y, out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


# The key holds the specializations besides the sizes: a tile tuned without the outlier epilogue
# may not fit in shared memory with it (seen on an H200 with the GEMV kernel).
@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "EPILOGUE", "HAS_OUTLIERS", "OUTLIER_W_FROM_CB"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["workspace_ptr"],  # split-K adds into it: every timing run starts from zeros
)
@triton.jit
def _int8_gemm_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, sca_ptr, scb_ptr, bias_ptr, x_ptr, w_ptr, outlier_index_ptr, outlier_count_ptr,
    workspace_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, OUTLIER_W_FROM_CB: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    tile = tl.program_id(0) // SPLIT_K
    pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # This program's K range: whole BLOCK_K steps, the last range shorter (or empty).
    steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = (tl.program_id(0) % SPLIT_K) * steps_per_split * BLOCK_K
    k_end = min(K, k_begin + steps_per_split * BLOCK_K)
    # Rows and columns past the edge wrap around instead of being masked: the loads stay in
    # bounds without an M/N mask in the main loop, and those results are never stored.
    a_ptrs = a_ptr + (rm % M)[:, None] * stride_am + (k_begin + rk)[None, :] * stride_ak
    b_ptrs = b_ptr + (rn % N)[None, :] * stride_bn + (k_begin + rk)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = rk < k_end - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6 needs it named for an int32 acc
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    row_ok = rm < M
    col_ok = rn < N
    out_mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        _finish_tile(
            acc, rm, rn, row_ok, col_ok, out_mask,
            b_ptr, out_ptr, sca_ptr, scb_ptr, bias_ptr, x_ptr, w_ptr, outlier_index_ptr, outlier_count_ptr,
            stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk, stride_wn, stride_wk,
            EPILOGUE, HAS_BIAS, HAS_OUTLIERS, OUTLIER_W_FROM_CB, BLOCK_O,
        )
    else:
        # Workspace: the int32 sums [M, N], then one arrival counter per tile.
        sum_ptrs = workspace_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(sum_ptrs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are in before the tile's arrival is counted
        arrived = tl.atomic_add(workspace_ptr + M * N + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last of the tile's programs: all partial sums are in
            total = tl.load(sum_ptrs, mask=out_mask, other=0, cache_modifier=".cg")
            _finish_tile(
                total, rm, rn, row_ok, col_ok, out_mask,
                b_ptr, out_ptr, sca_ptr, scb_ptr, bias_ptr, x_ptr, w_ptr, outlier_index_ptr, outlier_count_ptr,
                stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk, stride_wn, stride_wk,
                EPILOGUE, HAS_BIAS, HAS_OUTLIERS, OUTLIER_W_FROM_CB, BLOCK_O,
            )


# ---------------------------------------------------------------- host entry

def _launch(CA: Tensor, CB: Tensor, out: Tensor, *, epilogue: bool, SCA=None, SCB=None, bias=None,
            x2d=None, outliers: Optional[OutlierColumns] = None, weight=None) -> Tensor:
    (M, K), N = CA.shape, CB.shape[0]
    if M == 0 or N == 0:
        return out
    x_strides = (0, 0) if x2d is None else x2d.stride()
    w_strides = (0, 0) if weight is None else weight.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    _int8_gemm_kernel[grid](
        CA, CB, out, SCA, SCB, bias, x2d, weight,
        None if outliers is None else outliers.index,
        None if outliers is None else outliers.count,
        split_k_workspace(M, N, CA.device),
        M, N, K, m_bucket(M),
        *CA.stride(), *CB.stride(), *out.stride(), *x_strides, *w_strides,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, HAS_OUTLIERS=outliers is not None,
        OUTLIER_W_FROM_CB=weight is None, BLOCK_O=BLOCK_O,
    )
    return out


def split_k_workspace(M: int, N: int, device: torch.device) -> Tensor:
    """Split-K's int32 workspace, zeroed: the sums ``[M, N]``, then one arrival counter per tile.

    A fresh one per call (one memset), at the sizes that may split: a buffer kept across calls
    would have to live outside the memory pools of CUDA-graph capture and warm-up. Larger M gets
    one uninitialized int32 (split-K is pruned there; the autotuner zeroes the argument between
    timing runs, so it cannot be None)."""
    if M > SPLIT_K_MAX_M:
        return torch.empty(1, dtype=torch.int32, device=device)
    tiles = triton.cdiv(M, SPLIT_K_MIN_BLOCK_M) * triton.cdiv(N, SPLIT_K_MIN_BLOCK_N)
    return torch.zeros(M * N + tiles, dtype=torch.int32, device=device)


def int8_matmul(CA: Tensor, CB: Tensor) -> Tensor:
    """Exact ``CA @ CB.T`` in int32 (the kernel without its epilogue: for tests and debugging)."""
    out = torch.empty((CA.shape[0], CB.shape[0]), dtype=torch.int32, device=CA.device)
    return _launch(CA, CB, out, epilogue=False)


def int8_gemm(
    CA: Tensor, SCA: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor],
    x2d: Tensor, outliers: Optional[OutlierColumns], weight: Optional[Tensor],
) -> Tensor:
    """LLM.int8() output ``[M, N]`` in ``x2d``'s dtype from quantized activations.

    ``outliers`` (from ``quantize_activation``) selects the columns of ``x2d`` multiplied in
    floating point with ``weight`` when given, else with the dequantized ``CB``.
    """
    out = torch.empty((CA.shape[0], CB.shape[0]), dtype=x2d.dtype, device=CA.device)
    return _launch(CA, CB, out, epilogue=True, SCA=SCA, SCB=SCB, bias=bias,
                   x2d=x2d, outliers=outliers, weight=weight)
