"""CPU LLM.int8() linear: row-wise activation quantization, int8 GEMM, fp outlier part.

Two implementations with the numerics of ``int8fx.reference`` (``CA``, ``SCA``, ``C32``
and the dequantization bit-exact):

* the C++ kernel of ``cpu_int8_linear_op.cpp`` (AVX2 CPUs without VNNI/AMX, where
  ``torch._int_mm`` is a slow generic loop), which ``cpu_int8_gemm.is_available()``
  registers as the op's CPU kernel: after the first call, calls skip this module;
* ``_int8_linear_torch``: torch ops around ``torch._int_mm`` (oneDNN's VNNI/AMX kernels
  where the CPU has them, or when the C++ kernels cannot be built).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from int8fx.kernels import cpu_int8_gemm

INT8_MAX = 127


def quantize_activation(x2d: Tensor, threshold: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Returns ``CA`` int8 ``[M, K]``, ``SCA`` fp32 ``[M]``, and the outlier column indices or None."""
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
    if cpu_int8_gemm.is_available():
        return cpu_int8_gemm.int8_linear(x, CB, SCB, bias, threshold, weight)
    K, N = x.shape[-1], CB.shape[0]
    out = _int8_linear_torch(x.reshape(-1, K), CB, SCB, bias, threshold, weight)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


def _int8_linear_torch(x2d: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """The same in torch ops around ``torch._int_mm`` (CPUs with VNNI/AMX, or no compiler); fp32 ``[M, N]``."""
    CA, SCA, outlier_index = quantize_activation(x2d, threshold)
    out = torch._int_mm(CA, CB.t()).float() * (SCA[:, None] * SCB[None, :]) / (INT8_MAX * INT8_MAX)
    if outlier_index is not None:
        if weight is not None:
            w_o = weight.index_select(1, outlier_index).to(x2d.dtype)
        else:
            w_o = CB.index_select(1, outlier_index).float() * (SCB / INT8_MAX)[:, None]
            w_o = w_o.to(x2d.dtype)
        out += (x2d.index_select(1, outlier_index) @ w_o.t()).float()
    if bias is not None:
        out += bias.float()
    return out
