"""LLM.int8() MoE experts for transformers 5.x experts modules: ``convert_experts_``.

transformers 5.x stores a layer's experts as 3-D parameters (``gate_up_proj [E, 2I, H]`` or
``up_proj [E, I, H]``, and ``down_proj [E, H, I]``) in one module whose class is decorated with
``use_experts_implementation``: its forward takes ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])`` and the decorator picks the implementation (``eager``, ``grouped_mm``,
``batched_mm``) from the config. All of them compute the same thing, so an int8 forward that
computes it with ``int8fx::int8_grouped_linear`` replaces any of them.

:func:`convert_experts_` turns such a module into int8 experts in place:

* each 3-D weight becomes an int8 parameter of the same name and shape (``CB``, one row per
  output feature of each expert), and its fp32 row scales a buffer beside it, ``<name>_SCB``
  ``[E, N]``: the format ``torch.compile(backend="int8lt")`` quantizes experts into;
* the module's class becomes a subclass of its own class and of :class:`Int8Experts` (as
  ``torch.nn.utils.parametrize`` does), so that everything model-specific stays: the activation,
  ``_apply_gate`` (clamped or interleaved gates), biases, the post-expert norm. Only ``forward``
  changes, and it keeps the experts signature.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx.*)

__all__ = ["Int8Experts", "SCALE_SUFFIX", "convert_experts_", "experts_problem", "expert_weight_names"]

SCALE_SUFFIX = "_SCB"  # ``gate_up_proj`` int8 [E, N, K] -> ``gate_up_proj_SCB`` fp32 [E, N]


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The two 3-D weights of a transformers experts module: the first product's and ``down_proj``."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")


def experts_problem(module: nn.Module) -> Optional[str]:
    """None when :func:`convert_experts_` can convert ``module``, else why not (for the load report)."""
    name = type(module).__name__
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")):
        # Without transformers' experts interface the forward is the model's own: not ours to replace.
        return f"{name} has 3-D parameters but not transformers' experts interface (use_experts_implementation)"
    if module.is_transposed:
        # Stored [E, in, out]: one scale per output row would need the weight transposed at load.
        return f"MoE experts ({name}) stored transposed [E, in, out]: not supported yet"
    if getattr(module, "_is_expert_parallel", False):
        return f"MoE experts ({name}) sharded by expert parallelism: not supported"
    for weight_name in expert_weight_names(module):
        weight = getattr(module, weight_name, None)
        if not isinstance(weight, Tensor) or weight.dim() != 3:
            return f"MoE experts ({name}) with no 3-D {weight_name!r}: a layout int8fx does not know"
    return None


class Int8Experts(nn.Module):
    """The int8 forward that :func:`convert_experts_` gives an experts module (never built directly).

    Each row routed to expert ``e`` goes through ``int8_linear`` of ``W[e]`` (LLM.int8(): row-wise
    int8, outlier columns found among that expert's rows and multiplied in fp with the dequantized
    int8 columns, as ``Linear8bitLt`` does), which is what ``int8fx::int8_grouped_linear`` computes
    for the whole batch at once. ``threshold`` is the outlier threshold (``0``: none).
    """

    threshold: float
    fp_class: type  # the model's own experts class, which this one extends

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        first, down = expert_weight_names(self)
        top_k = top_k_index.shape[-1]
        # One row per (token, slot), token-major: row s is token s // top_k, routed to top_k_index.flatten()[s].
        rows = hidden_states.repeat_interleave(top_k, dim=0)
        expert_ids = top_k_index.reshape(-1)
        projected = self._int8_experts_linear(rows, first, expert_ids)
        projected = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
        out = self._int8_experts_linear(projected, down, expert_ids)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
        # Summed over the slots of each token, as transformers' grouped_mm / batched_mm forwards do.
        return out.view(-1, top_k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype)

    def _int8_experts_linear(self, x: Tensor, name: str, expert_ids: Tensor) -> Tensor:
        bias = getattr(self, f"{name}_bias", None) if self.has_bias else None
        CB, SCB = getattr(self, name), getattr(self, name + SCALE_SUFFIX)
        return torch.ops.int8fx.int8_grouped_linear(x, CB, SCB, expert_ids, bias, self.threshold, None)

    def extra_repr(self) -> str:
        first, down = expert_weight_names(self)
        E, N, K = getattr(self, first).shape
        return f"experts={E}, {first}=int8[{N}, {K}], {down}=int8{list(getattr(self, down).shape[1:])}, threshold={self.threshold}"

    def _apply(self, fn: Callable, recurse: bool = True):
        # model.to(torch.bfloat16) casts every floating buffer: the row scales must stay fp32 (the
        # op checks it, and a bf16 absmax would lose bits). Device moves still apply.
        scales = {id(getattr(self, name + SCALE_SUFFIX)) for name in expert_weight_names(self)}

        def keep_scales_fp32(t: Tensor) -> Tensor:
            applied = fn(t)
            if id(t) in scales and applied.dtype != t.dtype:
                return t.to(device=applied.device)
            return applied

        return super()._apply(keep_scales_fp32, recurse)

    def __reduce_ex__(self, protocol):
        # Int8<Class> is made at run time, so pickle (torch.save of a whole model, deepcopy)
        # cannot find it by name: it is rebuilt from the model's own class, which it can.
        return (_new_int8_experts, (self.fp_class,), self.__getstate__())


def _new_int8_experts(experts_class: type) -> Int8Experts:
    """An empty ``Int8<Name>`` for pickle to fill with the saved state."""
    return object.__new__(_int8_class(experts_class))


@functools.lru_cache(maxsize=None)
def _int8_class(experts_class: type) -> type:
    """``Int8<Name>``: the experts class with :class:`Int8Experts`' forward first in its MRO."""
    return type(f"Int8{experts_class.__name__}", (Int8Experts, experts_class), {"__module__": __name__, "fp_class": experts_class})


def convert_experts_(module: nn.Module, threshold: float) -> nn.Module:
    """Turn a transformers experts module into LLM.int8() experts, in place; returns it.

    fp weights are quantized (per expert and output row, as ``reference.quantize_experts``); weights
    on the meta device become int8 meta tensors for a loader to fill (``from_pretrained``).
    Raises ``ValueError`` when :func:`experts_problem` names a reason not to convert it.
    """
    problem = experts_problem(module)
    if problem is not None:
        raise ValueError(problem)
    for name in expert_weight_names(module):
        weight = getattr(module, name)
        if weight.is_meta:
            CB = torch.empty(weight.shape, dtype=torch.int8, device="meta")
            SCB = torch.empty(weight.shape[:2], dtype=torch.float32, device="meta")
        else:
            CB, SCB = quantize_experts(weight.detach())
        # Registered again (not assigned into the old Parameter): the int8 tensor replaces the fp one.
        module._parameters[name] = nn.Parameter(CB, requires_grad=False)
        module.register_buffer(name + SCALE_SUFFIX, SCB)
    module.__class__ = _int8_class(type(module))
    module.threshold = float(threshold)
    return module


def quantize_experts(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``int8fx::quantize_weight`` on every expert's rows: ``CB int8 [E, N, K]``, ``SCB fp32 [E, N]``."""
    E, N, K = weight.shape
    CB, SCB = torch.ops.int8fx.quantize_weight(weight.reshape(E * N, K))
    return CB.view(E, N, K), SCB.view(E, N)
