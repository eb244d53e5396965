"""Module swap: turn every ``nn.Linear`` of a model into an int8 :class:`Linear8bitLt`, in place.

The eager counterpart of the ``int8lt`` backend (and of transformers' ``load_in_8bit`` /
the ``make_llm_int8_linear`` utility): the fp weights are dropped as each linear is
converted, so the memory saving comes before anything is compiled.
"""

from __future__ import annotations

import logging
from typing import Iterable, Union

from torch import nn

from int8fx.config import DEFAULT_SKIP, DEFAULT_THRESHOLD, Int8LtConfig
from int8fx.nn.modules import Int8Params, Linear8bitLt
from int8fx.paths import matches_skip  # the backend's rule, so both skip alike

__all__ = ["replace_linear"]

log = logging.getLogger(__name__)


def replace_linear(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    skip: Union[str, Iterable[str], None] = DEFAULT_SKIP,
    has_fp16_weights: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`Linear8bitLt` and return ``model``.

    Args:
        threshold: outlier threshold of the new modules (6 is LLM.int8()'s; 0 disables it).
        skip: module paths kept in floating point, matched on whole path components:
            ``"lm_head"`` matches ``lm_head`` and ``model.lm_head`` (and anything inside them),
            never ``my_lm_head``; ``"layers.0"`` matches ``model.layers.0.mlp.up``.
        has_fp16_weights: keep trainable fp weights instead of int8 ones (no memory saving).

    Each weight is quantized where it lives (CPU -> CPU included) and the converted module
    keeps no reference to it, so it is freed unless something else holds it (a tied
    embedding, for instance, keeps its own). Only exact ``nn.Linear`` instances are
    converted: subclasses such as ``MultiheadAttention.out_proj`` are read as plain weights
    by their owners. A linear shared by several parents stays shared. If ``model`` itself is
    an ``nn.Linear``, the converted module is returned instead.
    """
    config = Int8LtConfig(threshold=threshold, skip=skip)  # the backend's validation and defaults
    converted: dict[int, Linear8bitLt] = {}
    if type(model) is nn.Linear:
        return _convert(model, config.threshold, has_fp16_weights)
    for parent_path, parent in list(model.named_modules()):
        # _modules, not named_children(): that one hides a child seen twice under one parent.
        for name, child in list(parent._modules.items()):
            path = f"{parent_path}.{name}" if parent_path else name
            if type(child) is not nn.Linear:
                continue
            if matches_skip(path, config.skip) is not None:
                log.debug("int8fx.replace_linear: %s kept in floating point (skip=%s)", path, config.skip)
                continue
            if id(child) not in converted:
                converted[id(child)] = _convert(child, config.threshold, has_fp16_weights)
            setattr(parent, name, converted[id(child)])
    log.info("int8fx.replace_linear: %d linear layers converted to Linear8bitLt", len(converted))
    return model


def _convert(linear: nn.Linear, threshold: float, has_fp16_weights: bool) -> Linear8bitLt:
    weight = linear.weight
    # Built on the meta device: no throwaway fp weight is allocated for the new module.
    int8_linear = Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=False,
        has_fp16_weights=has_fp16_weights,
        threshold=threshold,
        device="meta",
    )
    int8_weight = Int8Params(weight.data, requires_grad=has_fp16_weights and weight.requires_grad, has_fp16_weights=has_fp16_weights)
    if not has_fp16_weights and weight.device.type != "meta":
        int8_weight = int8_weight.to(weight.device)  # quantizes, in place
    int8_linear.weight = int8_weight
    # The bias parameter is reused as it is (no copy; it stays trainable if it was).
    int8_linear.bias = linear.bias
    int8_linear.train(linear.training)
    int8_linear._sync_state()
    return int8_linear
