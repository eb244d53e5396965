"""CUDA kernels of the int8fx ops: Triton, one file per kernel.

* ``quantize_activation``: row statistics, outlier columns and int8 rows;
* ``int8_gemm``: int8 tensor-core GEMM with the dequantization, outlier and bias epilogue;
* ``int8_gemv``: small M (decode) with the quantization inside its K loop: measured, not
  dispatched (slower than quantize + GEMM on an H200, see ``linear``);
* ``linear``: the host side that runs them.

Nothing here imports Triton until the first CUDA call (``int8_linear_triton`` and
``int8_linear_siblings_triton`` below); ``register`` binds them to the ops' CUDA key.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def int8_linear_triton(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """``int8fx::int8_linear``'s CUDA kernel (arguments already checked by ``ops``)."""
    from int8fx.kernels.cuda import linear

    return linear.linear(x, CB, SCB, bias, threshold, weight)


def int8_linear_siblings_triton(x: Tensor, CB: list[Tensor], SCB: list[Tensor], bias: list, threshold: float, weight: list) -> list[Tensor]:
    """``int8fx::int8_linear_siblings``' CUDA kernel (arguments already checked by ``ops``)."""
    from int8fx.kernels.cuda import linear

    return linear.linears(x, CB, SCB, bias, threshold, weight)


def register(
    library: torch.library.Library, check_args: Callable[..., None], check_siblings_args: Callable[..., None], dispatch_key: str = "CUDA"
) -> None:
    """Makes the Triton path the ``dispatch_key`` kernel of ``int8fx::int8_linear`` and
    ``int8fx::int8_linear_siblings`` in ``library`` (the ops' fragment, which ``int8fx/ops.py``
    defines), checking the arguments with ``check_args`` / ``check_siblings_args`` first. The GPU
    check's dry run also binds them to the CPU key, to run the GPU code interpreted."""

    def int8_linear_cuda(x, CB, SCB, bias, threshold, weight=None):
        check_args(x, CB, SCB, bias, weight)
        return int8_linear_triton(x, CB, SCB, bias, threshold, weight)

    def int8_linear_siblings_cuda(x, CB, SCB, bias, threshold, weight):
        check_siblings_args(x, CB, SCB, bias, weight)
        return int8_linear_siblings_triton(x, CB, SCB, bias, threshold, weight)

    library.impl("int8_linear", int8_linear_cuda, dispatch_key)
    library.impl("int8_linear_siblings", int8_linear_siblings_cuda, dispatch_key)
