"""Where LLM.int8()'s perplexity gap on SmolLM2-135M comes from: an error budget.

Each provider applies only part of LLM.int8() (threshold 6, outlier columns with the fp
weight, ``lm_head`` in fp as int8lt's default) to the fp32 model, through a module swap
built on ``int8fx.reference``: weights only, activations only, one layer type only, or all
of it with the first position of every sequence (the BOS token, which most attention heads
use as a sink) kept in fp. The products run in fp64 on the dequantized values, so the only
errors are the quantization's. Same chunks and table as ``bench_accuracy.py``; the s.e.
column is the standard error of each change over the chunks.

    python benchmarks/accuracy_budget.py [--chunks 16] [--providers TEXT ...] [--out DIR] [--smoke]
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from bench_accuracy import load_model_and_chunks, measure_providers, parse_args, report
from torch import nn

from int8fx import reference

THRESHOLD = 6.0
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PartialInt8Linear(nn.Module):
    """A linear layer with the chosen parts of LLM.int8() applied, in the reference's numerics."""

    def __init__(self, linear: nn.Linear, weights: bool, activations: bool, fp_first_position: bool):
        super().__init__()
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        CB, SCB = reference.quantize_weight(self.weight)
        self.int8_weight = reference.dequantize_rows(CB, SCB).double() if weights else self.weight.double()
        self.activations = activations
        self.fp_first_position = fp_first_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        if self.activations:
            x2d = x.reshape(-1, x.shape[-1]).float()
            (CA, SCA), columns = reference.quantize_activation(x2d, THRESHOLD)
            int8_part = reference.dequantize_rows(CA, SCA).double() @ self.int8_weight.t()
            # Outlier columns (zeroed in CA) with the fp weight, as int8lt's default.
            y = int8_part + (x2d[:, columns].double() @ self.weight[:, columns].double().t())
            y = y.reshape(*x.shape[:-1], -1)
            if self.fp_first_position:
                y[..., 0, :] = x64[..., 0, :] @ self.weight.double().t()
        else:
            y = x64 @ self.int8_weight.t()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.to(x.dtype)


def partial_int8(
    model: nn.Module,
    weights: bool = True,
    activations: bool = True,
    fp_first_position: bool = False,
    only: Optional[tuple[str, ...]] = None,
) -> nn.Module:
    """A copy of ``model`` whose linears (but ``lm_head``, and only the ``only`` types if given) are swapped."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head" and (only is None or name in only):
                setattr(module, name, PartialInt8Linear(child, weights, activations, fp_first_position))
    return model


def providers(model: nn.Module) -> dict[str, Callable[[], nn.Module]]:
    table = {
        "fp32 eager": lambda: model,
        "LLM.int8() t=6, all of it": lambda: partial_int8(model),
        "weights in int8 only (activations fp32)": lambda: partial_int8(model, activations=False),
        "activations in int8 only (weights fp32)": lambda: partial_int8(model, weights=False),
        "all of it, first position (BOS) in fp32": lambda: partial_int8(model, fp_first_position=True),
    }
    for layer_type in LAYER_TYPES:
        table[f"only {layer_type} in int8"] = lambda layer_type=layer_type: partial_int8(model, only=(layer_type,))
    return table


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    model, chunks = load_model_and_chunks(args)
    with torch.no_grad():
        rows = measure_providers(providers(model), chunks, args.providers)
    report(
        rows,
        f"SmolLM2-135M, BBC News, {args.chunks} chunks x {args.chunk_tokens} tokens; LLM.int8() threshold {THRESHOLD:g}",
        args.out,
        "accuracy_budget.csv",
    )


if __name__ == "__main__":
    main()
