"""CPU LLM.int8() linear: row-wise activation quantization, int8 GEMM, fp outlier part.

The bulk runs as a real int8 GEMM with int32 accumulation (``int8_matmul``: the AVX2
kernel of ``cpu_int8_gemm`` on CPUs without VNNI, else ``torch._int_mm``); only the few
outlier columns are multiplied in the input's floating dtype. Numerics follow
``int8fx.reference`` exactly for ``CA``, ``SCA`` and ``C32``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from int8fx.kernels import cpu_int8_gemm

INT8_MAX = 127


def int8_matmul(CA: Tensor, CB: Tensor) -> Tensor:
    """Exact int32 ``CA [M, K] @ CB [N, K].T``; ``CB`` in [-127, 127] (see ``cpu_int8_gemm``)."""
    if cpu_int8_gemm.is_available():
        return cpu_int8_gemm.int8_gemm(CA, CB)
    return torch._int_mm(CA, CB.t())


def quantize_activation(x2d: Tensor, threshold: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Returns ``CA`` int8 ``[M, K]``, ``SCA`` fp32 ``[M]``, and the outlier column indices or None."""
    if cpu_int8_gemm.is_available():
        # One C++ call instead of the ~15 ops below (and their host sync): at M = 1 these
        # ops cost several times the int8 GEMM itself.
        return cpu_int8_gemm.quantize_rows(x2d, threshold)
    x32 = x2d.float()
    magnitude = x32.abs()
    outlier_index = None
    if threshold > 0:
        is_outlier = magnitude >= threshold
        columns = is_outlier.any(dim=0)
        if bool(columns.any()):
            outlier_index = columns.nonzero().flatten()
            # Outlier elements must not set the row scale.
            magnitude = magnitude.masked_fill(is_outlier, 0.0)
    if x2d.shape[1] == 0:
        row_absmax = x32.new_zeros(x2d.shape[0])
    else:
        row_absmax = magnitude.amax(dim=1)
    inverse_scale = torch.where(row_absmax > 0, INT8_MAX / row_absmax, torch.zeros_like(row_absmax))
    CA = torch.round(x32 * inverse_scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    if outlier_index is not None:
        CA.index_fill_(1, outlier_index, 0)
    return CA, row_absmax, outlier_index


def int8_linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    bias: Optional[Tensor],
    threshold: float,
    weight: Optional[Tensor],
) -> Tensor:
    """``x [..., K]`` times ``CB [N, K]`` int8 with row scales ``SCB [N]``; see ``reference.int8_linear``."""
    K, N = x.shape[-1], CB.shape[0]
    x2d = x.reshape(-1, K)
    CA, SCA, outlier_index = quantize_activation(x2d, threshold)
    C32 = int8_matmul(CA, CB)
    if cpu_int8_gemm.is_available():
        # The bias is fused only when no outlier part comes between: the sum order stays
        # (Y8 + Y16) + b, as in the reference.
        fused_bias = bias if outlier_index is None else None
        out = cpu_int8_gemm.dequantize(C32, SCA, SCB.float(), fused_bias)
        if fused_bias is not None:
            bias = None
    else:
        out = C32.float() * (SCA[:, None] * SCB[None, :]) / (INT8_MAX * INT8_MAX)
    if outlier_index is not None:
        if weight is not None:
            w_o = weight.index_select(1, outlier_index).to(x.dtype)
        else:
            w_o = CB.index_select(1, outlier_index).float() * (SCB / INT8_MAX)[:, None]
            w_o = w_o.to(x.dtype)
        out += (x2d.index_select(1, outlier_index) @ w_o.t()).float()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
