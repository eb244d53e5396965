"""CUDA LLM.int8() linear: the host side that picks the Triton kernels.

Every M takes ``quantize_activation`` (row stats, then the quantized rows, outlier columns
compacted on device) then ``int8_gemm`` (int8 MMA with the dequant, outlier and bias epilogue
fused). ``int8_gemv``, the fused small-M kernel that quantizes inside its K loop, is not used:
on an H200 it took 46 µs at M = 16 (4096x4096, threshold 6) where quantize + GEMM took 20 µs at
M = 64, its K loop bound by latency rather than by the weight's bytes. ``bench_linear``'s
``int8fx fused gemv`` provider keeps measuring it, for the day a GEMV beats the GEMM path.

Nothing syncs with the host, so the path is safe under CUDA graphs. Called by the "cuda"
kernels of ``int8fx::int8_linear`` and ``int8fx::int8_linear_siblings`` (``int8fx/ops.py``),
which check the arguments.
"""

from __future__ import annotations

from typing import Optional, Sequence

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
    return linears(x, [CB], [SCB], [bias], threshold, [weight])[0]


def linears(
    x: Tensor,
    CB: Sequence[Tensor],
    SCB: Sequence[Tensor],
    bias: Sequence[Optional[Tensor]],
    threshold: float,
    weight: Sequence[Optional[Tensor]],
) -> list[Tensor]:
    """``linear`` for each ``(CB, SCB, bias, weight)``, ``x`` quantized once: the siblings of one
    input (``int8fx::int8_linear_siblings``) launch one quantization instead of one each."""
    K = CB[0].shape[1]
    x2d = x.reshape(-1, K)
    CA, SCA, outliers = quantize_activation.quantize_activation(x2d, threshold)
    outputs = []
    for cb, scb, b, w in zip(CB, SCB, bias, weight):
        out = int8_gemm.int8_gemm(CA, SCA, cb, scb, b, x2d, outliers, w)
        outputs.append(out.reshape(*x.shape[:-1], cb.shape[0]))
    return outputs
