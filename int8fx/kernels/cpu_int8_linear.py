"""CPU LLM.int8() linear: row-wise activation quantization, int8 GEMM, fp outlier part.

Two implementations with the numerics of ``int8fx.reference`` (``CA``, ``SCA``, ``C32``
and the dequantization bit-exact):

* the C++ kernel of ``cpu_int8_linear_op.cpp`` (AVX2 CPUs without VNNI/AMX, where
  ``torch._int_mm`` is a slow generic loop), which ``cpu_int8_gemm.is_available()``
  registers as the op's CPU kernel: after the first call, calls skip this module;
* ``_int8_linear_torch``: the reference's torch ops with ``torch._int_mm`` as the GEMM
  (oneDNN's VNNI/AMX kernels where the CPU has them, or when the C++ kernels cannot be
  built).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from int8fx import reference
from int8fx.kernels import cpu_int8_gemm


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
    """The reference's steps with ``torch._int_mm`` as the int8 GEMM; fp32 ``[M, N]``."""
    (CA, SCA), columns = reference.quantize_activation(x2d, threshold)
    out = reference.dequantize_output(torch._int_mm(CA, CB.t()), SCA, SCB)
    if bool(columns.any()):
        source = weight if weight is not None else reference.dequantize_rows(CB, SCB)
        out += reference.outlier_part(x2d, source, columns).float()
    if bias is not None:
        out += bias.float()
    return out
