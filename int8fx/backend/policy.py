"""Step 2 of the backend: which matched linears stay in floating point, and why."""

from __future__ import annotations

import torch

from int8fx.config import Int8LtConfig
from int8fx.passes import LinearMatch
from int8fx.paths import matches_skip


def fp_reason(match: LinearMatch, param: torch.Tensor, config: Int8LtConfig) -> str:
    """Why a matched linear must stay in floating point ("" when it can be quantized)."""
    entry = matches_skip(match.module_path, config.skip)
    if entry:
        return f"module path matches skip entry {entry!r}"
    if match.feeds_top_k and not config.quantize_routers:
        # Top-k is discontinuous: int8 noise that flips an expert choice changes that token's
        # whole MoE output, and a router's few FLOPs are not worth the risk.
        return "MoE router: its output picks experts through top-k (quantize_routers=True quantizes it)"
    if param.device.type == "meta":
        return "weight is on the meta device (no data to quantize)"
    if not param.is_floating_point():
        return f"weight dtype {param.dtype} is not floating point"
    if min(param.shape) < config.min_features:
        return f"smaller than min_features={config.min_features}"
    if param.requires_grad and torch.is_grad_enabled() and config.trainable_weights == "keep_fp":
        return "weight requires grad while grad is enabled (use torch.no_grad() or trainable_weights='freeze')"
    return ""
