"""Step 1 of the backend: dynamo's torch-level graph re-traced to ATen, with what the later
steps need to know about its inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx

from int8fx.paths import normalize_source_path


@dataclass
class TracedGraph:
    """An ATen-level copy of dynamo's graph (dynamo's own graph is left untouched)."""

    gm: fx.GraphModule
    fake_mode: Any
    inputs: list  # the example inputs, real tensors, in placeholder order
    placeholders: list[fx.Node]
    names: dict[fx.Node, str]  # placeholder -> the parameter's name, e.g. "model.layers.0.mlp.up_proj.weight"
    _positions: dict[fx.Node, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._positions = {node: i for i, node in enumerate(self.placeholders)}

    def position(self, node: fx.Node) -> int:
        return self._positions[node]

    def input_of(self, node: fx.Node) -> Any:
        return self.inputs[self.position(node)]

    def is_parameter(self, node: fx.Node) -> bool:
        return isinstance(self.input_of(node), torch.nn.Parameter)


def trace_to_aten(gm: fx.GraphModule, example_inputs: list) -> TracedGraph:
    """Re-traces ``gm`` with ``make_fx`` under dynamo's fake mode, keeping each node's
    ``nn_module_stack`` (the calling module) and naming inputs after their sources."""
    fakes = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
    fake_mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))
    # The Python dispatcher makes C++ composites such as aten.linear on a 3-D input read
    # symbolic sizes: without it torch 2.11 turns each dynamic size into an equality guard.
    with fx_traceback.preserve_node_meta(), fake_mode, enable_python_dispatcher():
        aten_gm = make_fx(fx.Interpreter(gm).run)(*fakes)
    dynamo_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]  # make_fx keeps the input order
    names = {node: normalize_source_path(source_name(dyn)) or dyn.name for node, dyn in zip(placeholders, dynamo_placeholders)}
    _name_inputs_after_sources(aten_gm, placeholders, dynamo_placeholders)
    return TracedGraph(aten_gm, fake_mode, list(example_inputs), placeholders, names)


def source_name(node: fx.Node) -> str:
    """Dynamo's name for where a graph input came from, e.g. ``L['self']._modules['fc']._parameters['weight']``."""
    source = getattr(node, "_dynamo_source", None) or getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    name = source.name
    return name if isinstance(name, str) else name()


def _name_inputs_after_sources(aten_gm: fx.GraphModule, placeholders: list[fx.Node], dynamo_placeholders: list[fx.Node]) -> None:
    """``arg0_1`` -> ``fc_weight``: readable graph dumps."""
    for aten_node, dynamo_node in zip(placeholders, dynamo_placeholders):
        source = source_name(dynamo_node)
        name = dynamo_node.name
        if "_parameters[" in source or "_buffers[" in source:
            name = re.sub(r"\W", "_", normalize_source_path(source))
        aten_node._rename(name)
    aten_gm.recompile()
