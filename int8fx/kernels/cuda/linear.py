"""CUDA LLM.int8() linear: the host side that picks the Triton kernels.

* ``M <= 16`` (decode): ``int8_gemv``, one launch that quantizes, multiplies and
  finishes the output while streaming the int8 weight once.
* larger ``M``: ``quantize_activation`` (row stats + quantize, outlier columns
  compacted on device) then ``int8_gemm`` (int8 MMA with the dequant, outlier and
  bias epilogue fused).

Nothing syncs with the host, so the path is safe under CUDA graphs. Called by the "cuda"
kernel of ``int8fx::int8_linear`` (``int8fx/ops.py``), which checks the arguments.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from int8fx.kernels.cuda import int8_gemm, int8_gemv, quantize_activation


def linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    bias: Optional[Tensor],
    threshold: float,
    weight: Optional[Tensor],
) -> Tensor:
    """``x [..., K]`` times ``CB [N, K]`` int8 with row scales ``SCB [N]``; see ``reference.int8_linear``."""
    N, K = CB.shape
    x2d = x.reshape(-1, K)
    if x2d.shape[0] <= int8_gemv.MAX_M:
        out = int8_gemv.int8_linear_small_m(x2d, CB, SCB, bias, threshold, weight)
    else:
        CA, SCA, outliers = quantize_activation.quantize_activation(x2d, threshold)
        out = int8_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x2d, outliers, weight)
    return out.reshape(*x.shape[:-1], N)
