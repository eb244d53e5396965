"""Replace matched linears with ``int8fx::int8_linear``, quantized weights as new graph inputs.

Each distinct (parameter, layout) gets two new placeholders, ``CB`` (int8 ``[N, K]``) and
``SCB`` (fp32 ``[N]``), appended after the existing inputs in the order of the returned
``QuantizedInput`` list; ``appended_inputs`` gives the tensors for them in that order, and
the backend's runtime passes them on every call. Keeping them as inputs rather than baked
constants is what lets a weight be quantized once per process, shared by every graph and
recompile, and requantized after an in-place update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import fx

from int8fx.passes.match_linear import LinearMatch, linear_operands
from int8fx.paths import WeightLayout

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantizedInput:
    """A pair of placeholders the rewrite added: which parameter input to quantize, and how."""

    weight_input_index: int  # position of the parameter among the graph's original inputs
    layout: WeightLayout


def appended_inputs(quantized: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The tensors for the placeholders ``rewrite_to_int8`` appended: ``(CB, SCB)`` of each of
    its ``QuantizedInput``s, flattened in the same order."""
    return [tensor for CB, SCB in quantized for tensor in (CB, SCB)]


def _set_val(node: fx.Node, fake_mode, fn, *args) -> None:
    """Fills ``node.meta['val']`` by running ``fn`` on the fake values of ``args``."""

    def fake(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    with fake_mode:
        node.meta["val"] = fn(*[fake(a) for a in args])


def _add_placeholder(graph: fx.Graph, after: fx.Node, name: str, fake_value: torch.Tensor) -> fx.Node:
    with graph.inserting_after(after):
        node = graph.placeholder(name)
    node.meta["val"] = fake_value
    node._dynamo_source = None  # not a user input: dynamo must not try to guard on it
    return node


def rewrite_to_int8(
    gm: fx.GraphModule,
    matches: list[LinearMatch],
    *,
    threshold: float,
    fp_outliers: Callable[[fx.Node], bool],
    fake_mode,
) -> list[QuantizedInput]:
    """Rewrites ``gm`` in place; returns the new inputs in the order they were appended.

    ``fp_outliers(weight_placeholder)`` says whether the outlier columns may use that
    weight's fp data (else the dequantized int8 columns are used and the fp weight is
    no longer read by the graph).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index_of = {node: i for i, node in enumerate(placeholders)}
    last = placeholders[-1]
    added: dict[tuple[fx.Node, WeightLayout], tuple[fx.Node, fx.Node]] = {}
    new_inputs: list[QuantizedInput] = []

    for match in matches:
        key = (match.weight, match.layout)
        if key not in added:
            stored = match.weight.meta["val"]
            n_out, n_in = stored.shape if match.layout == "out_in" else stored.shape[::-1]
            with fake_mode:
                fake_cb = torch.empty((n_out, n_in), dtype=torch.int8, device=stored.device)
                fake_scb = torch.empty((n_out,), dtype=torch.float32, device=stored.device)
            base = match.weight.name
            cb = _add_placeholder(graph, last, f"{base}_CB", fake_cb)
            scb = _add_placeholder(graph, cb, f"{base}_SCB", fake_scb)
            last = scb
            added[key] = (cb, scb)
            new_inputs.append(QuantizedInput(index_of[match.weight], match.layout))
        cb, scb = added[key]
        _replace_one(graph, match, cb, scb, threshold, fp_outliers(match.weight), fake_mode)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return new_inputs


def _replace_one(
    graph: fx.Graph,
    match: LinearMatch,
    cb: fx.Node,
    scb: fx.Node,
    threshold: float,
    fp_outlier_weights: bool,
    fake_mode,
) -> None:
    node = match.node
    # Re-read the operands: an earlier replacement may have become this node's input.
    x, _weight_operand, bias, _how = linear_operands(node)
    with graph.inserting_before(node):
        outlier_weight: Optional[fx.Node] = None
        if fp_outlier_weights:
            outlier_weight = match.weight
            if match.layout == "in_out":
                outlier_weight = graph.call_function(aten.t.default, (match.weight,))
                _set_val(outlier_weight, fake_mode, aten.t.default, match.weight)
        args = (x, cb, scb, bias, threshold, outlier_weight)
        replacement = graph.call_function(torch.ops.int8fx.int8_linear.default, args)
    _set_val(replacement, fake_mode, torch.ops.int8fx.int8_linear.default, *args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in node.meta:
            replacement.meta[key] = node.meta[key]
    replacement.meta["int8fx_module_path"] = match.module_path
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)
