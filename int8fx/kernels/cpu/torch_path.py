"""The CPU linear in torch ops, where int8fx's C++ library cannot be built or loaded: the
reference's own steps, with ``torch._int_mm`` (oneDNN) as the int8 GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from int8fx import reference


def int8_mm(CA: Tensor, CB: Tensor) -> Tensor:
    """Exact ``CA [M, K] @ CB [N, K].T`` in int32 by ``torch._int_mm``.

    ``torch._int_mm`` on CPU returns wrong values when K = 1 and N > 1 (torch 2.13 with
    oneDNN, seen on AVX-512 VNNI and AMX machines); K = 1 is padded with a zero column,
    which changes no dot product. It also returns garbage, without an error, for a ``CA``
    whose rows are not K apart (seen on an AMX machine: a one-row view with row stride 0, as
    inductor passes it, leaves ``out`` untouched; torch counts such a view as contiguous):
    ``CA`` is copied to rows K apart first.
    """
    if CA.shape[1] == 1:
        CA, CB = torch.nn.functional.pad(CA, (0, 1)), torch.nn.functional.pad(CB, (0, 1))
    if CA.stride() != (CA.shape[1], 1):
        CA = torch.empty_like(CA, memory_format=torch.contiguous_format).copy_(CA)
    return torch._int_mm(CA, CB.t())


def int8_linear_torch(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """``reference.int8_linear`` for ``x [..., K]`` with ``torch._int_mm`` as its int8 product."""
    return reference.int8_linear(x, CB, SCB, bias, threshold, weight, matmul=int8_mm)
