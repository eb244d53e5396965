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
from typing import Optional

import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.utils.weak import WeakIdKeyDictionary

from int8fx import reference
from int8fx.passes.match_linear import WeightLayout


def version_of(tensor: Tensor) -> Optional[int]:
    """The in-place version counter, or None for inference-mode tensors (which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _as_out_in(param: Tensor, layout: WeightLayout) -> Tensor:
    weight = param.detach()
    return weight if layout == "out_in" else weight.t()


@dataclass
class QuantizedWeight:
    CB: Tensor  # int8 [N, K]
    SCB: Tensor  # fp32 [N]
    version: Optional[int]
    param_ref: weakref.ref
    layout: WeightLayout

    def is_current_for(self, param: Tensor) -> bool:
        return self.param_ref() is param and (self.version is None or self.version == version_of(param))

    def weight_sqnr_db(self) -> float:
        """How well ``CB * SCB / 127`` reproduces the fp weight (dB); needs the fp weight alive."""
        param = self.param_ref()
        if param is None or param.untyped_storage().size() == 0:
            return float("nan")
        return reference.sqnr_db(_as_out_in(param, self.layout), reference.dequantize_rows(self.CB, self.SCB))


class QuantizedWeightStore:
    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, param: Tensor, layout: WeightLayout) -> QuantizedWeight:
        """The current quantized form of ``param``: quantized on first use, requantized after an in-place change."""
        per_layout = self._entries.setdefault(param, {})
        entry = per_layout.get(layout)
        if entry is None:
            entry = self._quantize(param, layout)
            per_layout[layout] = entry
            counters["int8fx"]["weights_quantized"] += 1
        elif not entry.is_current_for(param):
            self._requantize(entry, param)
            counters["int8fx"]["weights_requantized"] += 1
        return entry

    @staticmethod
    def _quantize(param: Tensor, layout: WeightLayout) -> QuantizedWeight:
        with torch.no_grad():
            CB, SCB = torch.ops.int8fx.quantize_weight(_as_out_in(param, layout))
        return QuantizedWeight(CB, SCB, version_of(param), weakref.ref(param), layout)

    @staticmethod
    def _requantize(entry: QuantizedWeight, param: Tensor) -> None:
        # In place: compiled graphs (and CUDA graphs) keep reading the same tensors.
        with torch.no_grad():
            CB, SCB = torch.ops.int8fx.quantize_weight(_as_out_in(param, entry.layout))
            entry.CB.copy_(CB)
            entry.SCB.copy_(SCB)
        entry.version = version_of(param)


STORE = QuantizedWeightStore()
