"""The ``int8fx`` custom ops: schemas, fake implementations, autograd, device dispatch.

* ``int8fx::quantize_weight(weight) -> (CB, SCB)``: row-wise int8 weight quantization.
* ``int8fx::int8_linear(x, CB, SCB, bias, threshold, weight) -> y``: the LLM.int8()
  mixed-precision linear. ``weight`` is the optional fp weight ``[N, K]`` used for the
  outlier columns (more accurate than the dequantized int8 columns bitsandbytes uses).

The default implementation of each op is the pure-torch reference (any device); CPU
gets the int8 GEMM path of ``kernels.cpu_int8_linear``. The outlier count is data
dependent but never reaches an output shape, so the fake implementations are exact
and the ops trace under ``fullgraph=True`` and dynamic shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from int8fx import reference
from int8fx.kernels import cpu_int8_linear


def _check_int8_linear_args(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], weight: Optional[Tensor]) -> None:
    torch._check(CB.dim() == 2 and CB.dtype == torch.int8, lambda: f"CB must be a 2-D int8 tensor, got {CB.dtype} {tuple(CB.shape)}")
    N, K = CB.shape
    torch._check(x.is_floating_point(), lambda: f"int8_linear expects a floating-point input, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"input's last dimension {tuple(x.shape)} does not match CB's in_features {K}")
    torch._check(SCB.shape == (N,) and SCB.dtype == torch.float32, lambda: f"SCB must be fp32 [{N}], got {SCB.dtype} {tuple(SCB.shape)}")
    if bias is not None:
        torch._check(bias.shape == (N,), lambda: f"bias must be [{N}], got {tuple(bias.shape)}")
    if weight is not None:
        torch._check(weight.shape == (N, K), lambda: f"weight must be [{N}, {K}], got {tuple(weight.shape)}")


# ---------------------------------------------------------------- quantize_weight

@torch.library.custom_op("int8fx::quantize_weight", mutates_args=())
def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise int8 quantization of ``weight [N, K]``: ``(CB int8 [N, K], SCB fp32 [N])``."""
    CB, SCB = reference.quantize_weight(weight)
    return CB, SCB


@quantize_weight.register_fake
def _(weight: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {tuple(weight.shape)}")
    CB = weight.new_empty(weight.shape, dtype=torch.int8)
    SCB = weight.new_empty(weight.shape[:1], dtype=torch.float32)
    return CB, SCB


# ---------------------------------------------------------------- int8_linear

@torch.library.custom_op("int8fx::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    bias: Optional[Tensor],
    threshold: float,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """LLM.int8() ``x @ W.T + bias``; output in ``x``'s dtype and shape ``[..., N]``.

    ``CB`` holds values in ``[-127, 127]`` as ``quantize_weight`` (and bitsandbytes) produce
    them; the CPU kernels rely on it (-128 is never a quantized weight).
    """
    _check_int8_linear_args(x, CB, SCB, bias, weight)
    return reference.int8_linear(x, CB, SCB, bias, threshold, weight)


@int8_linear.register_kernel("cpu")
def _(x, CB, SCB, bias, threshold, weight=None):
    _check_int8_linear_args(x, CB, SCB, bias, weight)
    return cpu_int8_linear.int8_linear(x, CB, SCB, bias, threshold, weight)


@int8_linear.register_fake
def _(x, CB, SCB, bias, threshold, weight=None):
    _check_int8_linear_args(x, CB, SCB, bias, weight)
    return x.new_empty((*x.shape[:-1], CB.shape[0]))


def _int8_linear_setup_context(ctx, inputs, output) -> None:
    x, CB, SCB, bias, _threshold, _weight = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.input_shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_linear_backward(ctx, grad_output: Tensor):
    # Only the input and the bias get gradients: quantized weights are frozen.
    CB, SCB = ctx.saved_tensors
    grad_2d = grad_output.reshape(-1, CB.shape[0])
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = reference.int8_linear_input_grad(grad_2d, CB, SCB).reshape(ctx.input_shape)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_2d.sum(dim=0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None


int8_linear.register_autograd(_int8_linear_backward, setup_context=_int8_linear_setup_context)


@int8_linear.register_kernel("cuda")
def _(x, CB, SCB, bias, threshold, weight=None):
    # Imported on first use: Triton is only needed when a CUDA tensor arrives.
    from int8fx.kernels import triton_int8_linear

    _check_int8_linear_args(x, CB, SCB, bias, weight)
    return triton_int8_linear.int8_linear(x, CB, SCB, bias, threshold, weight)
