"""The ``int8fx`` custom ops: schemas, fake implementations, autograd, device dispatch.

* ``int8fx::quantize_weight(weight) -> (CB, SCB)``: row-wise int8 weight quantization.
* ``int8fx::int8_linear(x, CB, SCB, bias, threshold, weight) -> y``: the LLM.int8()
  mixed-precision linear. ``weight`` is the optional fp weight ``[N, K]`` used for the
  outlier columns (more accurate than the dequantized int8 columns bitsandbytes uses).
* ``int8fx::int8_linear_siblings(x, CB[], SCB[], bias[], threshold, weight[]) -> y[]``: the
  linears of one input (q/k/v), its quantization shared.
* ``int8fx::int8_grouped_linear(x, CB, SCB, expert_ids, bias, threshold, weight) -> y``: MoE
  experts, ``CB [E, N, K]``: each row of ``x`` through its expert's ``int8_linear``, with the
  outlier columns found among the rows routed to that expert.

This module holds the contracts: schemas, argument checks, fake kernels, autograd and
the pure-torch default (``reference``, any device). The device kernels live in
``kernels/<device>/``:

* CUDA: ``kernels.cuda.int8_linear_triton`` and ``int8_linear_siblings_triton`` (Triton), which
  ``kernels.cuda.register`` binds below;
* CPU: a C++ library that registers itself at the CPU key when ``kernels.cpu.load()``
  loads it. The default kernel's first CPU call triggers that load and hands the call
  over; where the library cannot be built, ``kernels.cpu.torch_path`` serves CPU calls.

The outlier count is data dependent but never reaches an output shape, so the fake
implementations are exact and the ops trace under ``fullgraph=True`` and dynamic shapes.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from int8fx import reference
from int8fx.kernels import cpu as cpu_kernels
from int8fx.kernels import cuda as cuda_kernels


def _raise_unless(condition: bool, message: Callable[[], str]) -> None:
    """``torch._check`` for real tensors without its symbolic-shape machinery, which costs
    more than a small layer's int8 GEMM at decode; fake tensors keep ``torch._check``."""
    if not condition:
        raise RuntimeError(message())


def _check_int8_linear_args(
    x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], weight: Optional[Tensor], check: Callable = torch._check
) -> None:
    check(CB.dim() == 2 and CB.dtype == torch.int8, lambda: f"CB must be a 2-D int8 tensor, got {CB.dtype} {tuple(CB.shape)}")
    N, K = CB.shape
    check(x.is_floating_point(), lambda: f"int8_linear expects a floating-point input, got {x.dtype}")
    check(x.dim() >= 1 and x.shape[-1] == K, lambda: f"input's last dimension {tuple(x.shape)} does not match CB's in_features {K}")
    check(SCB.shape == (N,) and SCB.dtype == torch.float32, lambda: f"SCB must be fp32 [{N}], got {SCB.dtype} {tuple(SCB.shape)}")
    if bias is not None:
        check(bias.shape == (N,), lambda: f"bias must be [{N}], got {tuple(bias.shape)}")
    if weight is not None:
        check(weight.shape == (N, K), lambda: f"weight must be [{N}, {K}], got {tuple(weight.shape)}")


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
#
# Defined with the lower-level ``torch.library.Library`` API rather than ``custom_op``:
# a compiled decode step calls this op ~200 times, and ``custom_op``'s Python wrappers
# around each call cost about as much as the M = 1 int8 GEMM of a small layer (measured
# ~20 us of ~70 us per call, SmolLM2 shapes). The op behaves the same for torch.compile:
# a schema, device kernels, a fake kernel and an autograd kernel.

_LIBRARY = torch.library.Library("int8fx", "FRAGMENT")
_LIBRARY.define("int8_linear(Tensor x, Tensor CB, Tensor SCB, Tensor? bias, float threshold, Tensor? weight=None) -> Tensor")
int8_linear = torch.ops.int8fx.int8_linear.default
int8_linear.__doc__ = """LLM.int8() ``x @ W.T + bias``; output in ``x``'s dtype and shape ``[..., N]``.

``CB`` holds values in ``[-127, 127]`` as ``quantize_weight`` (and bitsandbytes) produce
them; the CPU kernels rely on it (-128 is never a quantized weight). ``weight`` is the
optional fp weight ``[N, K]`` for the outlier columns.
"""


def _int8_linear_default(x, CB, SCB, bias, threshold, weight=None):
    """Devices without a kernel of their own: the pure-torch path. On CPU, the first call
    loads the C++ library (which takes over the CPU key) and hands the call to it."""
    _check_int8_linear_args(x, CB, SCB, bias, weight, check=_raise_unless)
    if x.device.type == "cpu":
        if cpu_kernels.load():
            return int8_linear.redispatch(_CPU_KEYSET, x, CB, SCB, bias, threshold, weight)
        return cpu_kernels.torch_path.int8_linear_torch(x, CB, SCB, bias, threshold, weight)
    return reference.int8_linear(x, CB, SCB, bias, threshold, weight)


_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_LIBRARY.impl("int8_linear", _int8_linear_default, "CompositeExplicitAutograd")
# What a device kernel checks before it runs (eagerly: real tensors, no symbolic shapes).
check_int8_linear_call = functools.partial(_check_int8_linear_args, check=_raise_unless)


@torch.library.register_fake("int8fx::int8_linear", lib=_LIBRARY)
def _(x, CB, SCB, bias, threshold, weight=None):
    _check_int8_linear_args(x, CB, SCB, bias, weight)
    return x.new_empty((*x.shape[:-1], CB.shape[0]))


class _Int8LinearFunction(torch.autograd.Function):
    """Gradients for the input and the bias only: quantized weights are frozen."""

    @staticmethod
    def forward(ctx, x, CB, SCB, bias, threshold, weight):
        ctx.save_for_backward(CB, SCB)
        ctx.input_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return int8_linear(x, CB, SCB, bias, threshold, weight)  # grad is off in here: the device kernel

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        CB, SCB = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, CB.shape[0])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = reference.int8_linear_input_grad(grad_2d, CB, SCB).reshape(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None, None


def _needs_grad(x: Tensor, bias) -> bool:
    biases = bias if isinstance(bias, (list, tuple)) else [bias]
    return torch.is_grad_enabled() and (x.requires_grad or any(b is not None and b.requires_grad for b in biases))


def _int8_linear_autograd(keyset, x, CB, SCB, bias, threshold, weight=None):
    if _needs_grad(x, bias):
        return _Int8LinearFunction.apply(x, CB, SCB, bias, threshold, weight)
    # Inference: straight to the device kernel, no autograd.Function bookkeeping.
    return int8_linear.redispatch(keyset & torch._C._after_autograd_keyset, x, CB, SCB, bias, threshold, weight)


# The C++ library's autograd kernels (CPU, where a Python one would cost a decode step's small
# layer a third of its time) take the same no-grad shortcut themselves, and call this op when a
# gradient is wanted.
_LIBRARY.define("_int8_linear_with_grad(Tensor x, Tensor CB, Tensor SCB, Tensor? bias, float threshold, Tensor? weight) -> Tensor")
_LIBRARY.impl("_int8_linear_with_grad", _Int8LinearFunction.apply, "CompositeImplicitAutograd")
_LIBRARY.impl("int8_linear", _int8_linear_autograd, "Autograd", with_keyset=True)


# ---------------------------------------------------------------- int8_linear_siblings
#
# Sibling linears read the same input (attention's q/k/v, a gated MLP's gate/up): one call
# quantizes it, and finds its outlier columns, once for all of them. The backend groups them
# (passes.group_siblings) on devices with a kernel of their own for it (the CPU library, the
# Triton path); on any other device the default below is one int8_linear per sibling. Either way each output
# is exactly that sibling's int8_linear: the quantized input and outlier columns are the same.

_LIBRARY.define("int8_linear_siblings(Tensor x, Tensor[] CB, Tensor[] SCB, Tensor?[] bias, float threshold, Tensor?[] weight) -> Tensor[]")
int8_linear_siblings = torch.ops.int8fx.int8_linear_siblings.default
int8_linear_siblings.__doc__ = """``[int8_linear(x, CB[i], SCB[i], bias[i], threshold, weight[i]) for each i]``, with
``x`` quantized once. The lists have one entry per sibling (``None`` for a missing bias or
fp weight), at least one."""


def _check_int8_linear_siblings_args(x, CB, SCB, bias, weight, check: Callable = torch._check) -> None:
    counts = (len(CB), len(SCB), len(bias), len(weight))
    check(
        counts[0] >= 1 and len(set(counts)) == 1,
        lambda: f"int8_linear_siblings needs as many CB, SCB, bias and weight entries, at least one; got {', '.join(map(str, counts))}",
    )
    for entries in zip(CB, SCB, bias, weight):
        _check_int8_linear_args(x, *entries[:3], entries[3], check=check)


def _each_sibling(x, CB, SCB, bias, threshold, weight) -> list[Tensor]:
    """One ``int8_linear`` per sibling: devices without a siblings kernel, and training (each
    call then tracks its own gradients)."""
    return [int8_linear(x, cb, scb, b, threshold, w) for cb, scb, b, w in zip(CB, SCB, bias, weight)]


def _int8_linear_siblings_default(x, CB, SCB, bias, threshold, weight):
    """Devices without a kernel of their own: one ``int8_linear`` per sibling. On CPU, the first
    call loads the C++ library (which takes over the CPU key) and hands the call to it."""
    _check_int8_linear_siblings_args(x, CB, SCB, bias, weight, check=_raise_unless)
    if x.device.type == "cpu" and cpu_kernels.load():
        return int8_linear_siblings.redispatch(_CPU_KEYSET, x, CB, SCB, bias, threshold, weight)
    return _each_sibling(x, CB, SCB, bias, threshold, weight)


_LIBRARY.impl("int8_linear_siblings", _int8_linear_siblings_default, "CompositeExplicitAutograd")


@torch.library.register_fake("int8fx::int8_linear_siblings", lib=_LIBRARY)
def _(x, CB, SCB, bias, threshold, weight):
    _check_int8_linear_siblings_args(x, CB, SCB, bias, weight)
    return [x.new_empty((*x.shape[:-1], cb.shape[0])) for cb in CB]


def _int8_linear_siblings_autograd(keyset, x, CB, SCB, bias, threshold, weight):
    if _needs_grad(x, bias):
        return _each_sibling(x, CB, SCB, bias, threshold, weight)
    return int8_linear_siblings.redispatch(keyset & torch._C._after_autograd_keyset, x, CB, SCB, bias, threshold, weight)


_LIBRARY.impl("int8_linear_siblings", _int8_linear_siblings_autograd, "Autograd", with_keyset=True)
check_int8_linear_siblings_call = functools.partial(_check_int8_linear_siblings_args, check=_raise_unless)
# Each device's kernels register themselves: the CUDA ones here, the CPU library when it loads.
cuda_kernels.register(_LIBRARY, check_int8_linear_call, check_int8_linear_siblings_call)


# ---------------------------------------------------------------- int8_grouped_linear
#
# MoE experts. No kernel of its own: one ``int8_linear`` call per expert that has rows, on those
# rows, so every device runs its own int8_linear kernel (C++ on CPU, Triton on CUDA) and the
# numerics are exactly those of the per-expert linear. A ``custom_op``: its Python wrapper costs
# little next to a loop over experts.


def _check_int8_grouped_linear_args(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    expert_ids: Tensor,
    bias: Optional[Tensor],
    weight: Optional[Tensor],
    check: Callable = torch._check,
) -> None:
    check(CB.dim() == 3 and CB.dtype == torch.int8, lambda: f"CB must be a 3-D int8 tensor [E, N, K], got {CB.dtype} {tuple(CB.shape)}")
    E, N, K = CB.shape
    check(x.is_floating_point(), lambda: f"int8_grouped_linear expects a floating-point input, got {x.dtype}")
    check(x.dim() == 2 and x.shape[1] == K, lambda: f"input must be 2-D [rows, {K}] (K from CB), got {tuple(x.shape)}")
    check(SCB.shape == (E, N) and SCB.dtype == torch.float32, lambda: f"SCB must be fp32 [{E}, {N}], got {SCB.dtype} {tuple(SCB.shape)}")
    check(
        expert_ids.shape == (x.shape[0],) and expert_ids.dtype in (torch.int32, torch.int64),
        lambda: f"expert_ids must be int32/int64 [{x.shape[0]}] (one per input row), got {expert_ids.dtype} {tuple(expert_ids.shape)}",
    )
    if bias is not None:
        check(bias.shape == (E, N), lambda: f"bias must be [{E}, {N}], got {tuple(bias.shape)}")
    if weight is not None:
        check(weight.shape == (E, N, K), lambda: f"weight must be [{E}, {N}, {K}], got {tuple(weight.shape)}")


check_int8_grouped_linear_call = functools.partial(_check_int8_grouped_linear_args, check=_raise_unless)


def _rows_per_expert(expert_ids: Tensor, num_experts: int) -> list[tuple[int, Tensor]]:
    """``(expert, row indices)`` for every expert with rows; raises on an id outside ``[0, E]``
    (``E``: the row goes to no expert). One host sync for the whole call."""
    # Shifted by one, so that every negative id lands in bin 0 and one bincount counts it all.
    counts = torch.bincount(expert_ids.clamp(min=-1) + 1, minlength=num_experts + 2).tolist()
    _raise_unless(
        counts[0] == 0 and len(counts) == num_experts + 2,
        lambda: (
            f"expert_ids must lie in [0, {num_experts}] ({num_experts}: routed to no expert), "
            f"got values in [{int(expert_ids.min())}, {int(expert_ids.max())}]"
        ),
    )
    order = torch.argsort(expert_ids, stable=True)
    groups, start = [], 0
    for expert, count in enumerate(counts[1 : num_experts + 1]):
        if count:
            groups.append((expert, order[start : start + count]))
        start += count
    return groups


# cudagraph_unsafe: counting each expert's rows syncs with the host, which a CUDA graph cannot
# capture: inductor keeps it out of its CUDA graphs ("reduce-overhead"), in a partition of its own
# or by not graphing that graph.
@torch.library.custom_op("int8fx::int8_grouped_linear", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def int8_grouped_linear(
    x: Tensor,
    CB: Tensor,
    SCB: Tensor,
    expert_ids: Tensor,
    bias: Optional[Tensor],
    threshold: float,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """LLM.int8() MoE experts: row ``m`` of ``x [M, K]`` through ``int8_linear`` with ``CB[e]``,
    ``SCB[e]``, ``bias[e]`` and ``weight[e]`` (the fp expert weights ``[E, N, K]``, for the
    outlier columns), ``e = expert_ids[m]``; the outlier columns of each expert are found among
    its own rows. ``expert_ids[m] == E`` gives a zero row. Output ``[M, N]`` in ``x``'s dtype."""
    check_int8_grouped_linear_call(x, CB, SCB, expert_ids, bias, weight)
    out = x.new_zeros(x.shape[0], CB.shape[1])
    for expert, rows in _rows_per_expert(expert_ids, CB.shape[0]):
        y = int8_linear(
            x.index_select(0, rows),
            CB[expert],
            SCB[expert],
            None if bias is None else bias[expert],
            threshold,
            None if weight is None else weight[expert],
        )
        out.index_copy_(0, rows, y)
    return out


@int8_grouped_linear.register_fake
def _(x, CB, SCB, expert_ids, bias, threshold, weight=None):
    _check_int8_grouped_linear_args(x, CB, SCB, expert_ids, bias, weight)
    return x.new_empty((x.shape[0], CB.shape[1]))


def _grouped_setup_context(ctx, inputs, output) -> None:
    _x, CB, SCB, expert_ids, bias, _threshold, _weight = inputs
    ctx.save_for_backward(CB, SCB, expert_ids)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grouped_backward(ctx, grad_output: Tensor):
    """Gradients for the input and the bias only, as for ``int8_linear``: quantized weights are frozen."""
    CB, SCB, expert_ids = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = reference.int8_grouped_linear_input_grad(grad_output, CB, SCB, expert_ids)
    if ctx.needs_input_grad[4]:
        routed = expert_ids < CB.shape[0]  # rows that went to no expert add to no bias
        grad_bias = grad_output.new_zeros(CB.shape[:2], dtype=torch.float32)
        grad_bias.index_add_(0, expert_ids[routed].long(), grad_output[routed].float())
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None


int8_grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)
