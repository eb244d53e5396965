"""Pure-torch LLM.int8(): the oracle every op and kernel is tested against.

Numeric conventions (those of bitsandbytes, the reference implementation users compare
against; where a kernel differs, its docstring says how and why):

* scales are the plain absmax in fp32, *not* divided by 127;
* values are quantized as ``round(v * (127 / absmax))`` computed in fp32, rounding
  half to even (``torch.round``); a zero row has scale 0 and quantizes to 0;
* an activation element is an outlier when ``|x| >= threshold``; a column holding one
  is an outlier column; ``threshold <= 0`` disables the decomposition;
* the activation row scale is the absmax over the row's non-outlier elements, and the
  outlier columns of ``CA`` are zeroed;
* ``C32 = CA @ CB.T`` is exact int32; it is dequantized as
  ``C32 * (SCA[:, None] * SCB[None, :]) / 127**2``;
* the outlier part ``X[:, O] @ W[:, O].T`` runs in the input's dtype; the parts and the
  bias are summed in fp32 and cast to the input's dtype once.

Everything here is written for clarity, not speed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from int8fx.config import DEFAULT_THRESHOLD

INT8_MAX = 127


class QuantizedRows(NamedTuple):
    """Row-wise int8 data and its fp32 absmax scales."""

    data: Tensor  # int8 [rows, cols]
    absmax: Tensor  # fp32 [rows]


def _quantize_rows(values: Tensor, absmax: Tensor) -> Tensor:
    """``round(values * 127 / absmax)`` per row, 0 where the row's absmax is 0."""
    inverse_scale = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))
    scaled = values.float() * inverse_scale[:, None]
    return torch.round(scaled).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_weight(weight: Tensor) -> QuantizedRows:
    """Per output row of ``weight [N, K]``: ``SCB = absmax``, ``CB = round(W * 127 / SCB)``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    absmax = weight.float().abs().amax(dim=1)
    return QuantizedRows(_quantize_rows(weight, absmax), absmax)


def dequantize_rows(data: Tensor, absmax: Tensor) -> Tensor:
    """``data * absmax / 127`` per row, in fp32."""
    return data.float() * (absmax.float() / INT8_MAX)[:, None]


def outlier_columns(x2d: Tensor, threshold: float) -> Tensor:
    """Bool mask ``[K]``: columns of ``x2d`` with any ``|x| >= threshold`` (none if threshold <= 0)."""
    if threshold <= 0:
        return torch.zeros(x2d.shape[1], dtype=torch.bool, device=x2d.device)
    # Compared in fp32, like the element mask below: a threshold such as 6.1 is not
    # representable in bf16, and both tests must agree.
    return (x2d.float().abs() >= threshold).any(dim=0)


def quantize_activation(x2d: Tensor, threshold: float) -> tuple[QuantizedRows, Tensor]:
    """Row-wise quantization of ``x2d [M, K]`` around its outliers.

    Returns ``(CA, SCA)`` and the outlier-column mask. ``SCA`` is the absmax over the
    non-outlier *elements* of each row; the outlier *columns* of ``CA`` are zero.
    """
    x32 = x2d.float()
    columns = outlier_columns(x2d, threshold)
    if threshold > 0:
        x32 = x32.masked_fill(x32.abs() >= threshold, 0.0)
    absmax = x32.abs().amax(dim=1) if x2d.shape[1] > 0 else x32.new_zeros(x2d.shape[0])
    data = _quantize_rows(x32, absmax)
    data[:, columns] = 0
    return QuantizedRows(data, absmax), columns


def int8_matmul(CA: Tensor, CB: Tensor) -> Tensor:
    """Exact ``CA @ CB.T`` in int32 (no overflow for K < 2**17).

    The products run in float64, which every device multiplies (CUDA has no int64 matmul) and
    which is exact here: each term is an integer of at most 127**2 and every partial sum stays
    far below 2**53, so no rounding happens in any summation order."""
    return (CA.double() @ CB.double().t()).to(torch.int32)


def dequantize_output(C32: Tensor, SCA: Tensor, SCB: Tensor) -> Tensor:
    """``C32 * SCA[:, None] * SCB[None, :] / 127**2`` in fp32."""
    return C32.float() * (SCA[:, None] * SCB[None, :]) / (INT8_MAX * INT8_MAX)


def outlier_weight_columns(weight: Optional[Tensor], CB: Tensor, SCB: Tensor, columns: Tensor) -> Tensor:
    """``W[:, O]`` ``[N, |O|]``: the outlier columns of the fp ``weight`` when it is given, else
    those of ``CB`` dequantized (as bitsandbytes does). Only those columns are read: O is a
    handful of the K columns, and dequantizing all of ``CB`` per call would cost a full
    pass over the weight."""
    index = columns.nonzero().flatten()
    if weight is not None:
        return weight.index_select(1, index)
    return dequantize_rows(CB.index_select(1, index), SCB)


def outlier_part(x2d: Tensor, weight_columns: Tensor, columns: Tensor) -> Tensor:
    """``X[:, O] @ W[:, O].T`` in the input's dtype, ``weight_columns`` being ``W[:, O]``."""
    x_o = x2d.index_select(1, columns.nonzero().flatten())
    return x_o @ weight_columns.to(x2d.dtype).t()


def int8_linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    bias: Optional[Tensor] = None,
    threshold: float = DEFAULT_THRESHOLD,
    weight: Optional[Tensor] = None,
    *,
    matmul: Callable[[Tensor, Tensor], Tensor] = int8_matmul,
) -> Tensor:
    """LLM.int8() ``x @ W.T + b`` for ``x [..., K]``, ``CB [N, K]`` int8, ``SCB [N]`` fp32.

    The outlier columns are multiplied with ``weight`` (the original fp weight) when it
    is given, else with the dequantized int8 weight, as bitsandbytes does. ``matmul`` is the
    exact int8 product ``CA @ CB.T`` (``kernels.cpu.torch_path`` passes ``torch._int_mm``'s).
    """
    K, N = x.shape[-1], CB.shape[0]
    x2d = x.reshape(-1, K)
    (CA, SCA), columns = quantize_activation(x2d, threshold)
    out = dequantize_output(matmul(CA, CB), SCA, SCB)
    if bool(columns.any()):
        out = out + outlier_part(x2d, outlier_weight_columns(weight, CB, SCB, columns), columns).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


def int8_linear_input_grad(grad_output: Tensor, CB: Tensor, SCB: Tensor) -> Tensor:
    """``dX = dY @ dequant(W)`` in ``grad_output``'s dtype (quantized weights get no gradient)."""
    weight = dequantize_rows(CB, SCB).to(grad_output.dtype)
    return grad_output @ weight


# ---------------------------------------------------------------- MoE experts
#
# An MoE layer stores its experts' weights as one 3-D tensor ``[E, N, K]`` and sends each token
# (row of ``x``) to a few of them. LLM.int8() of the experts is LLM.int8() of each expert's
# ``nn.Linear`` equivalent ``W[e]``, applied to the rows routed to that expert: scales per output
# row of each expert, and per row of ``x``; outlier columns found among that expert's rows only.


def quantize_experts(weight: Tensor) -> QuantizedRows:
    """Per expert and output row of ``weight [E, N, K]``: ``CB [E, N, K]`` int8, ``SCB [E, N]`` fp32.

    Row-wise quantization treats each row alone, so this is ``quantize_weight`` on the
    ``[E * N, K]`` stack of every expert's rows."""
    if weight.dim() != 3:
        raise ValueError(f"expert weights must be 3-D [experts, out_features, in_features], got {tuple(weight.shape)}")
    E, N, K = weight.shape
    data, absmax = quantize_weight(weight.reshape(E * N, K))
    return QuantizedRows(data.reshape(E, N, K), absmax.reshape(E, N))


def int8_grouped_linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    expert_ids: Tensor,
    bias: Optional[Tensor] = None,
    threshold: float = DEFAULT_THRESHOLD,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """Row ``m`` of ``x [M, K]`` through expert ``expert_ids[m]``'s linear: ``int8_linear`` of
    ``CB[e] [N, K]`` (``SCB[e]``, ``bias[e]``, ``weight[e]``) on the rows routed to ``e``.

    ``expert_ids[m] == E`` routes row ``m`` to no expert: its output row is zero.
    """
    out = x.new_zeros(x.shape[0], CB.shape[1])
    for expert in range(CB.shape[0]):
        rows = (expert_ids == expert).nonzero().flatten()
        if rows.numel() == 0:
            continue
        out[rows] = int8_linear(
            x[rows],
            CB[expert],
            SCB[expert],
            None if bias is None else bias[expert],
            threshold,
            None if weight is None else weight[expert],
        )
    return out


def int8_grouped_linear_input_grad(grad_output: Tensor, CB: Tensor, SCB: Tensor, expert_ids: Tensor) -> Tensor:
    """``dX[m] = dY[m] @ dequant(W[expert_ids[m]])`` (zero for rows routed to no expert)."""
    grad_x = grad_output.new_zeros(grad_output.shape[0], CB.shape[2])
    for expert in range(CB.shape[0]):
        rows = (expert_ids == expert).nonzero().flatten()
        if rows.numel():
            grad_x[rows] = int8_linear_input_grad(grad_output[rows], CB[expert], SCB[expert])
    return grad_x


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    reference = reference.double()
    noise = (reference - approximation.double()).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
