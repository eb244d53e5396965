"""Step 2 of the backend: which matched linears stay in floating point, and why."""

from __future__ import annotations

from typing import Optional

import torch

from int8fx.config import Int8LtConfig
from int8fx.passes import LinearMatch
from int8fx.paths import matches_skip


def fp_reason(
    match: LinearMatch, param: torch.Tensor, config: Int8LtConfig, owner: Optional[torch.Tensor] = None, tied_to_embedding: bool = False
) -> str:
    """Why a matched linear must stay in floating point ("" when it can be quantized).

    ``param`` is the tensor that would be quantized (under tensor parallelism, the local shard);
    ``owner`` the model's parameter it belongs to (the DTensor), ``param`` itself by default.
    ``tied_to_embedding``: the weight is also read as an embedding table (a tied output head).
    """
    owner = param if owner is None else owner
    entry = matches_skip(match.module_path, config.skip)
    if entry:
        return f"module path matches skip entry {entry!r}"
    if match.feeds_top_k and not config.quantize_routers:
        # Top-k is discontinuous: int8 noise that flips an expert choice changes that token's
        # whole MoE output, and a router's few FLOPs are not worth the risk.
        return "MoE router: its output picks experts through top-k (quantize_routers=True quantizes it)"
    if match.is_experts and not config.quantize_experts:
        return "MoE experts: quantize_experts=False"
    if tied_to_embedding and not config.quantize_tied_heads:
        # The embedding keeps reading the fp weight, so an int8 copy only adds memory; and the
        # output head is where int8 error reaches the logits directly.
        return "tied output head: its weight is also the input embedding's (quantize_tied_heads=True quantizes it)"
    if param.device.type == "meta":
        return "weight is on the meta device (no data to quantize)"
    if not param.is_floating_point():
        return f"weight dtype {param.dtype} is not floating point"
    if min(param.shape[-2:]) < config.min_features:  # MoE experts [E, N, K]: each expert's N and K
        return f"smaller than min_features={config.min_features}"
    if owner.requires_grad and torch.is_grad_enabled() and config.trainable_weights == "keep_fp":
        return "weight requires grad while grad is enabled (use torch.no_grad() or trainable_weights='freeze')"
    return ""
