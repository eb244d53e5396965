"""The CPU linear in torch ops, where int8fx's C++ library cannot be built or loaded.

The reference's steps (same ``CA``, ``SCA`` and dequantization, bit-exact), with
``torch._int_mm`` as the int8 GEMM (oneDNN) and an outlier part that reads only the
outlier columns of the weight.
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
    which changes no dot product.
    """
    if CA.shape[1] == 1:
        CA, CB = torch.nn.functional.pad(CA, (0, 1)), torch.nn.functional.pad(CB, (0, 1))
    return torch._int_mm(CA, CB.t())


def int8_linear(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float, weight: Optional[Tensor]) -> Tensor:
    """``reference.int8_linear`` for ``x [..., K]``; see there."""
    K, N = x.shape[-1], CB.shape[0]
    x2d = x.reshape(-1, K)
    (CA, SCA), columns = reference.quantize_activation(x2d, threshold)
    out = reference.dequantize_output(int8_mm(CA, CB), SCA, SCB)
    if bool(columns.any()):
        out += reference.outlier_part(x2d, reference.outlier_weight_columns(weight, CB, SCB, columns), columns).float()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
