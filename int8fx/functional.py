"""bitsandbytes-style functional LLM.int8(): ``matmul(A, B, state=..., threshold=..., bias=...)``.

``B`` is the weight as a linear layer stores it, ``[out_features, in_features]``, either in
floating point (quantized here, once or per call) or already int8 with its row scales
``SCB`` in ``state`` (or on an :class:`int8fx.nn.Int8Params`). The work is done by the
``torch.ops.int8fx.int8_linear`` op, so everything here traces under ``torch.compile``
with ``fullgraph=True``; only the eager bookkeeping (``state.idx``) is skipped there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx.*)
from int8fx import reference

__all__ = ["MatmulLtState", "int8_linear_trainable", "int8_vectorwise_quant", "matmul", "outlier_column_indices"]


@dataclass(eq=False)  # __eq__ below: dataclass equality would compare tensor fields elementwise
class MatmulLtState:
    """What one LLM.int8() linear keeps between calls (bitsandbytes' ``MatmulLtState`` fields).

    Attributes:
        CB: int8 weight ``[out, in]``, or None before the weight is quantized.
        SCB: fp32 absmax of each weight row ``[out]`` (not divided by 127).
        threshold: ``|x| >= threshold`` marks an outlier column; 0 disables the decomposition.
        has_fp16_weights: the floating-point weight is kept and trained; it is quantized
            again on every call instead of once.
        idx: int64 indices of the outlier columns of the last eager call (empty when it had
            none; None while ``threshold`` is 0). Not updated inside ``torch.compile``:
            finding them there would need a data-dependent shape.
        is_training: mirrors ``module.training`` (kept for bitsandbytes compatibility).
    """

    CB: Optional[Tensor] = None
    SCB: Optional[Tensor] = None
    threshold: float = 0.0
    has_fp16_weights: bool = True
    idx: Optional[Tensor] = None
    is_training: bool = False

    def __eq__(self, other: object) -> bool:
        """Field by field, as bitsandbytes' dataclass compares; tensors by identity or equal values."""
        if not isinstance(other, MatmulLtState):
            return NotImplemented
        return all(_same(getattr(self, name), getattr(other, name)) for name in self.__dataclass_fields__)

    __hash__ = None  # mutable, compared by value: not hashable (as a dataclass with eq)


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b or (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b))
    return a == b


def int8_vectorwise_quant(A: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """bitsandbytes' ``functional.int8_vectorwise_quant``: row-wise int8 quantization of ``A [..., K]``.

    Returns ``(CA, SCA, outlier_cols)``: ``CA`` int8 with ``A``'s shape, ``SCA`` fp32 (each row's
    absmax over its non-outlier elements, not divided by 127) and the int64 indices of the
    columns holding any ``|A| >= threshold`` (their ``CA`` entries are 0), empty when there are
    none and None when ``threshold`` is 0. Unlike bitsandbytes, ``A`` may be any floating dtype
    (it is not cast to fp16 first) and is never modified, not even temporarily.
    """
    x2d = A.detach().reshape(-1, A.shape[-1])
    (CA, SCA), columns = reference.quantize_activation(x2d, threshold)
    outlier_cols = columns.nonzero().flatten() if threshold > 0 else None
    return CA.reshape(A.shape), SCA, outlier_cols


def outlier_column_indices(x: Tensor, threshold: float) -> Tensor:
    """Indices of the columns of ``x [..., K]`` holding any ``|x| >= threshold`` (the op's rule)."""
    columns = reference.outlier_columns(x.detach().reshape(-1, x.shape[-1]), threshold)
    return columns.nonzero().flatten()


class _Int8LinearTrainableWeight(torch.autograd.Function):
    """The int8 op forward, with a gradient for the floating-point weight it was quantized from.

    The op's own autograd gives the input and bias gradients only (a quantized weight is
    frozen). With ``has_fp16_weights=True`` the fp weight is the trained parameter, so its
    gradient is the plain linear one, ``dW = dY^T X`` (straight through the quantization,
    as bitsandbytes does).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], CB: Tensor, SCB: Tensor, threshold: float) -> Tensor:
        ctx.save_for_backward(x, CB, SCB)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, CB, SCB = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, CB.shape[0])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = reference.int8_linear_input_grad(grad_2d, CB, SCB).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)
            grad_weight = (grad_2d.t() @ x_2d).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


def int8_linear_trainable(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x @ W.T + b`` with ``W`` quantized for this call; returns ``(y, CB, SCB)``.

    The outlier columns use the fp weight (more accurate than its int8 copy). ``W`` gets a
    gradient when it requires one; otherwise this is just the two int8fx ops.
    """
    CB, SCB = torch.ops.int8fx.quantize_weight(weight.detach())
    if weight.requires_grad and torch.is_grad_enabled():
        y = _Int8LinearTrainableWeight.apply(x, weight, bias, CB, SCB, threshold)
    else:
        y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, weight.detach())
    return y, CB, SCB


def _int8_scales(B: Tensor, state: MatmulLtState) -> Tensor:
    """The row scales that go with an int8 ``B``: the state's, else the ones ``B`` carries."""
    SCB = state.SCB if state.SCB is not None else getattr(B, "SCB", None)
    if SCB is None:
        raise ValueError(
            "matmul got an int8 B but no row scales: set state.SCB (fp32 [out_features]) or pass an int8fx.nn.Int8Params that carries SCB"
        )
    return SCB


def matmul(
    A: Tensor,
    B: Tensor,
    out: Optional[Tensor] = None,
    state: Optional[MatmulLtState] = None,
    threshold: float = 0.0,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """LLM.int8() ``A @ B.T + bias`` for ``A [..., in]`` and ``B [out, in]`` (bitsandbytes' signature).

    * ``threshold > 0`` overrides ``state.threshold`` (as in bitsandbytes); the state's
      threshold is used otherwise.
    * ``B`` in floating point: quantized once and cached in ``state.CB``/``state.SCB``, or on
      every call when ``state.has_fp16_weights`` (then ``B`` gets a gradient if it requires
      one). The outlier columns are multiplied with ``B`` itself.
    * ``B`` int8: used as ``CB`` with ``state.SCB`` (or ``B.SCB``); the outlier columns use the
      dequantized int8 columns, exactly as bitsandbytes does.
    * A state that already holds the int8 weight (``state.CB`` and ``state.SCB``, without
      ``has_fp16_weights``) is used as it is and ``B`` is not read, as in bitsandbytes (whose
      callers pass the int8 weight in any layout there, transposed included).
    * The output has ``A``'s dtype; ``A`` always gets its gradient ``dY @ dequant(B)``.
    * ``out``, when given, receives the result (copied; it is not a faster path).
    """
    state = MatmulLtState() if state is None else state
    if threshold > 0:
        state.threshold = float(threshold)
    filled = not state.has_fp16_weights and state.CB is not None and state.SCB is not None
    if B.dtype == torch.int8 and filled:
        y = torch.ops.int8fx.int8_linear(A, state.CB, state.SCB, bias, state.threshold, None)
    elif B.dtype == torch.int8:
        SCB = _int8_scales(B, state)
        y = torch.ops.int8fx.int8_linear(A, B, SCB, bias, state.threshold, None)
        state.CB, state.SCB = B, SCB
    elif state.has_fp16_weights:
        y, state.CB, state.SCB = int8_linear_trainable(A, B, bias, state.threshold)
    else:
        if not filled:
            state.CB, state.SCB = torch.ops.int8fx.quantize_weight(B.detach())
        # The fp weight's outlier columns are the more accurate ones, when B is that weight.
        weight = B.detach() if B.shape == state.CB.shape else None
        y = torch.ops.int8fx.int8_linear(A, state.CB, state.SCB, bias, state.threshold, weight)
    if not torch.compiler.is_compiling() and state.threshold > 0:
        state.idx = outlier_column_indices(A, state.threshold)
    if out is not None:
        return out.copy_(y)
    return y
