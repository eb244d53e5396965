"""CUDA kernels of the int8fx ops: Triton, one file per kernel.

* ``quantize_activation``: row statistics, outlier columns and int8 rows (M > 16);
* ``int8_gemm``: int8 tensor-core GEMM with the dequantization, outlier and bias epilogue;
* ``int8_gemv``: small M (decode) in one launch that streams the weight once;
* ``linear``: the host side that picks between them.

Nothing here imports Triton until the first CUDA call (``int8_linear_triton`` below).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def int8_linear_triton(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """``int8fx::int8_linear``'s CUDA kernel (arguments already checked by ``ops``)."""
    from int8fx.kernels.cuda import linear

    return linear.linear(x, CB, SCB, bias, threshold, weight)
