"""CUDA LLM.int8() linear: the host side that picks the Triton kernels.

Every M takes ``quantize_activation`` (row stats, then the quantized rows, outlier columns
compacted on device) then ``int8_gemm`` (int8 MMA with the dequant, outlier and bias epilogue
fused). ``int8_gemv``, the fused small-M kernel that quantizes inside its K loop, is not used:
on an H200 it took 46 µs at M = 16 (4096x4096, threshold 6) where quantize + GEMM took 20 µs at
M = 64, its K loop bound by latency rather than by the weight's bytes. ``bench_linear``'s
``int8fx fused gemv`` provider keeps measuring it, for the day a GEMV beats the GEMM path.

Nothing syncs with the host, so the path is safe under CUDA graphs. Called by the "cuda"
kernel of ``int8fx::int8_linear`` (``int8fx/ops.py``), which checks the arguments.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from int8fx.kernels.cuda import int8_gemm, quantize_activation


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
    CA, SCA, outliers = quantize_activation.quantize_activation(x2d, threshold)
    out = int8_gemm.int8_gemm(CA, SCA, CB, SCB, bias, x2d, outliers, weight)
    return out.reshape(*x.shape[:-1], N)
