"""Replace matched linears with ``int8fx::int8_linear`` (MoE experts with
``int8fx::int8_grouped_linear``), quantized weights as new graph inputs.

Each distinct (parameter, layout) gets two new placeholders, ``CB`` (int8 ``[N, K]``; experts
``[E, N, K]``) and ``SCB`` (fp32 ``[N]``; experts ``[E, N]``), appended after the existing
inputs in the order of the returned ``QuantizedInput`` list; ``appended_inputs`` gives the tensors for them in that order, and
the backend's runtime passes them on every call. Keeping them as inputs rather than baked
constants is what lets a weight be quantized once per process, shared by every graph and
recompile, and requantized after an in-place update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import fx

from int8fx.passes.match_linear import LinearMatch, experts_input, linear_operands
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


def _call(graph: fx.Graph, fake_mode, target, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """A new ``call_function`` node (at the graph's insertion point) with its fake ``meta['val']``."""
    node = graph.call_function(target, args, kwargs or {})

    def fake(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    with fake_mode:
        node.meta["val"] = target(*[fake(a) for a in args], **{k: fake(v) for k, v in (kwargs or {}).items()})
    return node


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
            *experts, a, b = stored.shape  # experts: [E] for MoE experts' 3-D weights, else []
            n_out, n_in = (a, b) if match.layout == "out_in" else (b, a)
            with fake_mode:
                fake_cb = torch.empty((*experts, n_out, n_in), dtype=torch.int8, device=stored.device)
                fake_scb = torch.empty((*experts, n_out), dtype=torch.float32, device=stored.device)
            base = match.weight.name
            cb = _add_placeholder(graph, last, f"{base}_CB", fake_cb)
            scb = _add_placeholder(graph, cb, f"{base}_SCB", fake_scb)
            last = scb
            added[key] = (cb, scb)
            new_inputs.append(QuantizedInput(index_of[match.weight], match.layout))
        cb, scb = added[key]
        replace = _replace_experts if match.is_experts else _replace_one
        replace(graph, match, cb, scb, threshold, fp_outliers(match.weight), fake_mode)

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
        outlier_weight = _outlier_weight(graph, match, fp_outlier_weights, fake_mode)
        args = (x, cb, scb, bias, threshold, outlier_weight)
        replacement = _call(graph, fake_mode, torch.ops.int8fx.int8_linear.default, args)
    _take_place_of(graph, node, replacement, replacement, match.module_path)


def _outlier_weight(graph: fx.Graph, match: LinearMatch, fp_outlier_weights: bool, fake_mode) -> Optional[fx.Node]:
    """The fp weight for the outlier columns, ``[..., N, K]`` (transposed when stored ``[..., K, N]``);
    None where the op dequantizes ``CB``'s columns instead."""
    if not fp_outlier_weights:
        return None
    if match.layout == "out_in":
        return match.weight
    if match.is_experts:
        return _call(graph, fake_mode, aten.transpose.int, (match.weight, -2, -1))
    return _call(graph, fake_mode, aten.t.default, (match.weight,))


def _take_place_of(graph: fx.Graph, node: fx.Node, replacement: fx.Node, op_node: fx.Node, module_path: str) -> None:
    """``replacement`` takes ``node``'s uses; ``op_node`` (the int8 op) its provenance."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in node.meta:
            op_node.meta[key] = node.meta[key]
    op_node.meta["int8fx_module_path"] = module_path
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def _replace_experts(
    graph: fx.Graph,
    match: LinearMatch,
    cb: fx.Node,
    scb: fx.Node,
    threshold: float,
    fp_outlier_weights: bool,
    fake_mode,
) -> None:
    """``grouped_mm`` / ``bmm(W[ids], ...)`` -> ``int8fx::int8_grouped_linear(x, CB, SCB, expert_ids, ...)``."""
    node, routing = match.node, match.routing
    x = experts_input(node)
    with graph.inserting_before(node):
        outlier_weight = _outlier_weight(graph, match, fp_outlier_weights, fake_mode)
        expert_ids = routing.node if routing.kind == "expert_ids" else _expert_of_each_row(graph, x, routing.node, fake_mode)
        args = (x, cb, scb, expert_ids, None, threshold, outlier_weight)
        op_node = _call(graph, fake_mode, torch.ops.int8fx.int8_grouped_linear.default, args)
        replacement = op_node
        if routing.unsqueeze_dim is not None:  # bmm's [rows, N, 1] / [rows, 1, N]
            replacement = _call(graph, fake_mode, aten.unsqueeze.default, (op_node, routing.unsqueeze_dim))
    _take_place_of(graph, node, replacement, op_node, match.module_path)


def _expert_of_each_row(graph: fx.Graph, x: fx.Node, offsets: fx.Node, fake_mode) -> fx.Node:
    """grouped_mm's offsets (expert ``e`` has rows ``offsets[e-1]:offsets[e]``) as one expert id
    per row: the number of offsets <= the row's index. Rows past ``offsets[-1]`` get ``E``: no expert."""
    rows = x.meta["val"].shape[0]
    if isinstance(rows, torch.SymInt):  # dynamic shapes: read the size from the graph
        rows = _call(graph, fake_mode, aten.sym_size.int, (x, 0))
    offsets_val = offsets.meta["val"]
    positions = _call(graph, fake_mode, aten.arange.start, (0, rows), {"dtype": offsets_val.dtype, "device": offsets_val.device})
    return _call(graph, fake_mode, aten.searchsorted.Tensor, (offsets, positions), {"right": True})
