"""Step 1 of the backend: dynamo's torch-level graph traced to ATen, with what the later
steps need to know about its inputs.

Two tracers, one result (``TracedGraph``):

* ``trace_to_aten``: plain tensors. ``make_fx`` re-traces dynamo's graph under its fake mode;
  the backend then compiles the ATen graph itself.
* ``trace_through_aot``: tensor subclasses among the inputs (tensor parallelism's DTensor
  parameters). ``make_fx`` cannot see through them: DTensor's dispatch turns each shard into a
  baked constant. AOTAutograd desugars them instead: its forward graph takes every DTensor as
  its inner values (the local shard, and on torch >= 2.13 the device mesh as an opaque object),
  runs the matmuls on the local shards, and holds DTensor's collectives as
  ``_c10d_functional`` ops. The backend's steps 2-4 run there, as AOTAutograd's compiler, and
  quantize each rank's own shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from int8fx.paths import normalize_source_path


@dataclass
class TracedGraph:
    """An ATen-level copy of dynamo's graph (dynamo's own graph is left untouched)."""

    gm: fx.GraphModule
    fake_mode: Any
    inputs: list  # the example inputs, real tensors, in placeholder order (a DTensor's local shard)
    placeholders: list[fx.Node]
    names: dict[fx.Node, str]  # placeholder -> the parameter's name, e.g. "model.layers.0.mlp.up_proj.weight"
    # The model-level input each input belongs to: the DTensor parameter whose local shard it is
    # (through AOTAutograd), else the input itself.
    owners: Optional[list] = None
    # What the inner compiler gets as example inputs: ``inputs``, or AOTAutograd's fake ones.
    example_inputs: Optional[list] = None
    _positions: dict[fx.Node, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._positions = {node: i for i, node in enumerate(self.placeholders)}
        self.owners = self.inputs if self.owners is None else self.owners
        self.example_inputs = self.inputs if self.example_inputs is None else self.example_inputs

    def position(self, node: fx.Node) -> int:
        return self._positions[node]

    def input_of(self, node: fx.Node) -> Any:
        return self.inputs[self.position(node)]

    def owner_of(self, node: fx.Node) -> Any:
        return self.owners[self.position(node)]

    def subclass_owner(self, position: int) -> Any:
        """The tensor subclass (DTensor) whose inner tensor input ``position`` is, else None."""
        owner = self.owners[position]
        return None if owner is self.inputs[position] else owner

    def is_parameter(self, node: fx.Node) -> bool:
        return isinstance(self.input_of(node), torch.Tensor) and isinstance(self.owner_of(node), torch.nn.Parameter)

    def compile_inputs(self, appended: list[torch.Tensor]) -> list:
        """The inner compiler's example inputs, with the tensors for the appended placeholders."""
        if self.example_inputs is self.inputs:
            return self.inputs + appended
        return self.example_inputs + [self.fake_mode.from_tensor(t) for t in appended]


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


# What dynamo tags a tensor with when its address is fixed (parameters, marked caches); AOTAutograd
# reads it from a placeholder's ``tensor_dict`` to tell inductor which inputs are static.
_STATIC_INPUT = {"_dynamo_static_input_type": "unguarded"}


def keep_dynamo_input_metadata(dynamo_gm: fx.GraphModule, aten_gm: fx.GraphModule) -> None:
    """Gives ``aten_gm`` (the re-traced, rewritten graph) the input metadata of the dynamo graph it
    came from, so that inductor knows its static inputs: the parameters, the caches a model
    marked static, and the appended ``CB`` / ``SCB`` (quantized once, never moved).

    Without it AOTAutograd sees a graph not captured by dynamo and treats every input as
    dynamic: on an H200, ``mode="reduce-overhead"`` then skipped CUDA graphs for every int8lt
    graph ("mutated inputs": a KV cache's in-place update), and a CUDA graph would have copied
    every weight on each replay. A no-op for graphs that are not dynamo's (the AOTAutograd path).
    """
    dynamo_inputs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    aten_inputs = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    is_dynamo_graph = "dynamo_compile_id" in dynamo_gm.meta and hasattr(dynamo_gm, "_param_name_to_source")
    owns_tensors = any(True for _ in aten_gm.named_parameters()) or any(True for _ in aten_gm.named_buffers())
    if not is_dynamo_graph or owns_tensors or len(aten_inputs) < len(dynamo_inputs):
        return
    for node, original in zip(aten_inputs, dynamo_inputs):  # make_fx keeps the input order
        node._dynamo_source = getattr(original, "_dynamo_source", None)
        if "tensor_dict" in original.meta:
            node.meta["tensor_dict"] = original.meta["tensor_dict"]
    for node in aten_inputs[len(dynamo_inputs) :]:  # the appended CB / SCB
        node._dynamo_source = None
        node.meta["tensor_dict"] = dict(_STATIC_INPUT)
    aten_gm.meta["dynamo_compile_id"] = dynamo_gm.meta["dynamo_compile_id"]
    aten_gm._param_name_to_source = {}  # it owns no parameters: they are all inputs


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
        if _is_weight_source(source):
            name = re.sub(r"\W", "_", normalize_source_path(source))
        aten_node._rename(name)
    aten_gm.recompile()


# ---------------------------------------------------------------- through AOTAutograd (tensor subclasses)


def has_tensor_subclass_inputs(example_inputs: list) -> bool:
    """Whether some input is a tensor subclass that AOTAutograd desugars (a DTensor parameter)."""
    return any(is_traceable_wrapper_subclass(x) for x in example_inputs)


def flatten_inputs(example_inputs: list) -> tuple[list, list[int]]:
    """The inputs as AOTAutograd passes them to its compiled graph (each tensor subclass replaced
    by its inner values, recursively), and for each the index of the input it came from."""
    flat: list = []
    owners: list[int] = []
    for index, value in enumerate(example_inputs):
        inner = _inner_values(value)
        flat += inner
        owners += [index] * len(inner)
    return flat, owners


def _inner_values(value: Any) -> list:
    if not is_traceable_wrapper_subclass(value):
        return [value]
    attributes, _context = value.__tensor_flatten__()
    return [inner for attribute in attributes for inner in _inner_values(getattr(value, attribute))]


# compile_graph(make_traced, aten_gm, aten_inputs, inference) -> the compiled callable
AotCompile = Callable[[Callable[[], TracedGraph], fx.GraphModule, list, bool], Callable]


def trace_through_aot(gm: fx.GraphModule, example_inputs: list, compile_graph: AotCompile, compile_plain: Callable) -> Callable:
    """Hands ``gm`` to AOTAutograd; its forward (or inference) graph goes to ``compile_graph``.

    ``compile_graph`` gets a function that builds the ``TracedGraph`` (on a copy of AOTAutograd's
    graph; it raises when the graph's inputs are not the flattened ``example_inputs``), the graph
    itself and AOTAutograd's fake example inputs (to compile unchanged), and whether this is an
    inference graph (no backward: the linears may be rewritten). A backward graph goes to
    ``compile_plain(gm, example_inputs)`` unchanged.
    """
    from torch._dynamo.backends.common import aot_autograd

    flat, owner_index = flatten_inputs(example_inputs)
    owners = [example_inputs[i] for i in owner_index]
    dynamo_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = [dynamo_placeholders[i] for i in owner_index]

    def compiler(inference: bool) -> Callable:
        def compile_aten(aten_gm: fx.GraphModule, aten_inputs: list) -> Callable:
            def make_traced() -> TracedGraph:
                return _traced_from_aot(aten_gm, list(aten_inputs), flat, owners, sources)

            return compile_graph(make_traced, aten_gm, list(aten_inputs), inference)

        return compile_aten

    return aot_autograd(fw_compiler=compiler(False), inference_compiler=compiler(True), bw_compiler=compile_plain)(gm, example_inputs)


def _traced_from_aot(aten_gm: fx.GraphModule, aten_inputs: list, flat: list, owners: list, sources: list[fx.Node]) -> TracedGraph:
    if len(aten_inputs) != len(flat):
        raise RuntimeError(f"AOTAutograd's graph takes {len(aten_inputs)} inputs where the flattened inputs are {len(flat)}")
    for position, (fake, real) in enumerate(zip(aten_inputs, flat)):
        if isinstance(real, torch.Tensor) and not (isinstance(fake, torch.Tensor) and fake.shape == real.shape):
            raise RuntimeError(f"AOTAutograd's input {position} is not the flattened input's shard {tuple(real.shape)}")
    graph = fx.Graph()
    graph.output(graph.graph_copy(aten_gm.graph, {}))
    copy = fx.GraphModule(aten_gm, graph)  # the original stays as AOTAutograd made it: the fallback
    placeholders = [n for n in copy.graph.nodes if n.op == "placeholder"]
    names = {node: normalize_source_path(source_name(src)) or src.name for node, src in zip(placeholders, sources)}
    for node, src, real in zip(placeholders, sources, flat):
        if isinstance(real, torch.Tensor) and _is_weight_source(source_name(src)):
            node._rename(re.sub(r"\W", "_", normalize_source_path(source_name(src))))
    copy.recompile()
    fake_mode = torch._guards.detect_fake_mode(aten_inputs)
    return TracedGraph(copy, fake_mode, list(flat), placeholders, names, owners=owners, example_inputs=aten_inputs)


def _is_weight_source(source: str) -> bool:
    return "_parameters[" in source or "_buffers[" in source
