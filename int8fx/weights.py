"""Quantize once: a process-wide cache of quantized weights, keyed on the parameter object.

Every compiled graph (graph breaks, recompiles for new shapes, two models sharing a
layer) reads the same ``CB``/``SCB`` tensors for a parameter. A parameter updated in
place (``W.mul_(2)``, an optimizer step) bumps its version counter and is requantized
into the same tensors, so compiled graphs never see stale weights. Entries die with
their parameter.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.utils.weak import WeakIdKeyDictionary

from int8fx import reference
from int8fx.paths import WeightLayout


def version_of(tensor: Tensor, owner: Optional[Tensor] = None) -> Optional[tuple]:
    """What changes when a parameter's values may have: its in-place version counter and its
    storage (``module.half()``, ``.to(device)`` and ``param.data = ...`` swap the storage
    without bumping the counter). None for inference-mode tensors, which have no counter.

    ``owner``: the tensor subclass ``tensor`` is the inner data of (a DTensor parameter and its
    local shard). An in-place op on a DTensor bumps the DTensor's counter, not its shard's: the
    shard's own op runs below autograd's version-counting layer.
    """
    try:
        version = (tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device)
        return version if owner is None else (*version, owner._version)
    except RuntimeError:
        return None


def _as_out_in(param: Tensor, layout: WeightLayout) -> Tensor:
    """``[..., N, K]``: a linear's weight, or MoE experts' ``[E, N, K]``."""
    weight = param.detach()
    return weight if layout == "out_in" else weight.transpose(-2, -1)


def _quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_weight`` of a ``[N, K]`` weight, or of each expert of a ``[E, N, K]`` stack:
    rows are quantized one by one, so the experts' rows are quantized as one ``[E * N, K]`` matrix."""
    *leading, K = weight.shape
    CB, SCB = torch.ops.int8fx.quantize_weight(weight.reshape(-1, K))
    return CB.reshape(*leading, K), SCB.reshape(leading)


@dataclass
class QuantizedWeight:
    CB: Tensor  # int8 [N, K] (MoE experts: [E, N, K])
    SCB: Tensor  # fp32 [N] (MoE experts: [E, N])
    version: Optional[tuple]
    param_ref: weakref.ref
    layout: WeightLayout
    owner_ref: Optional[weakref.ref] = None  # the DTensor parameter whose local shard ``param`` is

    def current_version(self, param: Tensor) -> Optional[tuple]:
        return version_of(param, self.owner_ref() if self.owner_ref is not None else None)

    def is_current_for(self, param: Tensor) -> bool:
        if self.param_ref() is not param:
            return False
        # A released weight has no fp data left to requantize from: its int8 form is final.
        return self.version is None or is_released(param) or self.version == self.current_version(param)

    def weight_sqnr_db(self) -> float:
        """How well ``CB * SCB / 127`` reproduces the fp weight (dB); needs the fp weight alive."""
        param = self.param_ref()
        if param is None or is_released(param):
            return float("nan")
        K = self.CB.shape[-1]
        dequantized = reference.dequantize_rows(self.CB.reshape(-1, K), self.SCB.reshape(-1))
        return reference.sqnr_db(_as_out_in(param, self.layout).reshape(-1, K), dequantized)


class QuantizedWeightStore:
    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, param: Tensor, layout: WeightLayout, owner: Optional[Tensor] = None) -> QuantizedWeight:
        """The current quantized form of ``param``: quantized on first use, requantized after an in-place change.

        ``owner``: the DTensor parameter whose local shard ``param`` is (its version counter is
        the one an in-place update bumps); given on first use, remembered after.
        """
        per_layout = self._entries.setdefault(param, {})
        entry = per_layout.get(layout)
        if entry is None:
            entry = self._quantize(param, layout, owner)
            per_layout[layout] = entry
            counters["int8fx"]["weights_quantized"] += 1
        elif not entry.is_current_for(param):
            self._requantize(entry, param)
            counters["int8fx"]["weights_requantized"] += 1
        return entry

    @staticmethod
    def _quantize(param: Tensor, layout: WeightLayout, owner: Optional[Tensor]) -> QuantizedWeight:
        with torch.no_grad():
            CB, SCB = _quantize_rows(_as_out_in(param, layout))
        if CB.is_cuda:
            # CUDA graphs (mode="reduce-overhead") may then read them in place, like parameters;
            # requantization writes into the same memory.
            torch._dynamo.mark_static_address(CB, guard=False)
            torch._dynamo.mark_static_address(SCB, guard=False)
        return QuantizedWeight(
            CB, SCB, version_of(param, owner), weakref.ref(param), layout, weakref.ref(owner) if owner is not None else None
        )

    @staticmethod
    def _requantize(entry: QuantizedWeight, param: Tensor) -> None:
        with torch.no_grad():
            CB, SCB = _quantize_rows(_as_out_in(param, entry.layout))
            if CB.device == entry.CB.device:
                # In place: compiled graphs (and CUDA graphs) keep reading the same tensors.
                entry.CB.copy_(CB)
                entry.SCB.copy_(SCB)
            else:  # the module moved to another device
                entry.CB, entry.SCB = CB, SCB
        entry.version = entry.current_version(param)


STORE = QuantizedWeightStore()


# ---------------------------------------------------------------- releasing fp weights

RELEASE_HINT = (
    "its floating-point data was released by int8fx after quantization "
    "(Int8LtConfig(release_weights=True)); only the compiled model can use it. Reload the "
    "weights (e.g. from the checkpoint) to use the module eagerly, or compile without release_weights."
)


# What may touch a released weight outside compiled code: metadata, which never reads the
# data. torch 2.11's dynamo reads a parameter's dtype, shape, numel(), nbytes... while it
# builds guards, outside both ``is_compiling()`` and its tracing context.
_METADATA_METHODS = frozenset({"numel", "size", "dim", "stride", "element_size", "is_contiguous", "storage_offset"})
_DATA_PROPERTIES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})  # views of the data


def _dynamo_is_tracing() -> bool:
    # is_compiling() covers the traced code; dynamo's own inspection of the parameter while
    # it wraps it (untyped_storage, ...) runs inside its tracing context only.
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


def _function_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":  # a property: its getset descriptor carries the name
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _touches_data(func) -> bool:
    name = _function_name(func)
    if getattr(func, "__name__", "") == "__get__":
        return name in _DATA_PROPERTIES
    return name not in _METADATA_METHODS


class ReleasedWeightError(RuntimeError):
    """Eager use of a parameter whose fp storage ``release_weights`` freed."""


class ReleasedParameter(torch.nn.Parameter):
    """A parameter whose storage was freed: same shape, one NaN element, every eager use raises.

    Dynamo traces through the override (``is_compiling``) and metadata reads (shape, dtype,
    numel...) are allowed, so recompiles for new shapes keep working; the rewritten graphs
    never read the data.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if not _dynamo_is_tracing() and _touches_data(func):
            raise ReleasedWeightError(f"{_function_name(func)} on a released weight: {RELEASE_HINT}")
        return super().__torch_function__(func, types, args, kwargs or {})

    def __repr__(self) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return f"ReleasedParameter(shape={tuple(self.shape)}, dtype={self.dtype}: released by int8fx release_weights)"


def is_released(param: Tensor) -> bool:
    return isinstance(param, ReleasedParameter)


def release_fp_weight(param: Tensor) -> int:
    """Frees ``param``'s storage (keeping shape, dtype, device); returns the bytes freed.

    A DTensor's local shard is released the same way, but DTensor runs its shard's ops below
    ``__torch_function__``: ``guard_modules_holding`` makes the modules holding the DTensor raise.
    """
    if is_released(param):
        return 0
    with torch._C.DisableTorchFunctionSubclass():
        freed = param.untyped_storage().nbytes()
        # A single NaN broadcast to the full shape: metadata (and so dynamo's guards on
        # shape) stay valid, nothing can read past a buffer, and any read is NaN.
        placeholder = torch.full((1,) * param.dim(), float("nan"), dtype=param.dtype, device=param.device)
        param.data = placeholder.expand(param.shape)
    param.__class__ = ReleasedParameter
    counters["int8fx"]["weights_released"] += 1
    return freed


def _released_shard_names(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module._parameters.items() if p is not None and is_released(getattr(p, "_local_tensor", p))]


def _refuse_call(module: torch.nn.Module, args: tuple) -> None:
    # Dynamo inlines this hook when it compiles the module again (new shapes) and drops it as
    # a no-op there: the compiled graphs never read the released data.
    if torch.compiler.is_compiling():
        return
    released = _released_shard_names(module)
    if released:
        raise ReleasedWeightError(f"calling {type(module).__name__} with its released {', '.join(released)}: {RELEASE_HINT}")


def _refuse_state_dict(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    released = _released_shard_names(module)
    if released:
        raise ReleasedWeightError(f"state_dict() would hold NaN for {', '.join(prefix + name for name in released)}: {RELEASE_HINT}")


_GUARDED_MODULES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def guard_modules_holding(owners: list[Tensor], modules: Iterable[torch.nn.Module]) -> None:
    """Makes every module of ``modules`` that holds one of ``owners`` (DTensor parameters whose
    local shards were released) raise ``ReleasedWeightError`` when it is called eagerly or saved.

    A DTensor's ops reach its shard below ``__torch_function__``, where ``ReleasedParameter``
    cannot refuse them: they would read the NaN placeholder. The module's hooks refuse its
    call and its ``state_dict()`` instead. Compiled graphs are unaffected: dynamo does not
    guard on hooks added after it compiled, and one it compiles later sees the call hook as a
    no-op. A parameter replaced since (reloaded weights) passes. Other direct reads of such a
    parameter (``weight.sum()``) still see the NaN placeholder.
    """
    wanted = {id(owner) for owner in owners}
    for module in modules:
        if module in _GUARDED_MODULES:
            continue
        if any(id(param) in wanted for param in module._parameters.values() if param is not None):
            module.register_forward_pre_hook(_refuse_call)
            module.register_state_dict_pre_hook(_refuse_state_dict)
            _GUARDED_MODULES[module] = True
