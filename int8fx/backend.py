"""The ``int8lt`` dynamo backend: trace to ATen, rewrite the linears to int8, hand over to inductor.

Flow for every graph dynamo captures:

1. ``_trace_to_aten``: re-trace dynamo's torch-level graph with ``make_fx`` under
   dynamo's fake mode, keeping each node's ``nn_module_stack`` (the calling module).
2. ``passes.find_linears`` / ``passes.rewrite_to_int8``: replace every matmul on a
   parameter weight with ``int8fx::int8_linear``, unless a policy keeps it in fp.
3. ``weights.STORE``: quantize each weight once; ``CB``/``SCB`` become extra graph inputs.
4. ``compile_fx``: inductor compiles the rewritten graph, fusing everything else as usual.
5. ``_Int8Runtime``: on each call, appends the current quantized weights to the inputs,
   requantizing any weight that was changed in place.

Anything that goes wrong in 1-3 leaves the graph in floating point with a logged reason:
compilation never fails because of int8fx.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx)
from int8fx import passes
from int8fx.config import Int8LtConfig
from int8fx.passes.match_linear import normalize_source_path
from int8fx.weights import RELEASE_HINT, STORE, QuantizedWeight, ReleasedWeightError, is_released, release_fp_weight

log = logging.getLogger("int8fx")


# ---------------------------------------------------------------- reports

@dataclass
class LayerReport:
    """What the backend did with one linear."""

    module_path: str
    weight: str  # the parameter's name, e.g. "model.embed_tokens.weight" for a tied lm_head
    shape: tuple[int, int]  # (out_features, in_features)
    action: str  # "int8" or "fp"
    reason: str = ""
    weight_sqnr_db: float = float("nan")


@dataclass
class GraphReport:
    """One compiled graph: its linears and the graph before and after the rewrite."""

    index: int
    layers: list[LayerReport] = field(default_factory=list)
    before: str = ""
    after: str = ""
    error: str = ""

    @property
    def replaced(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action == "int8"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action == "fp"]


# ---------------------------------------------------------------- tracing

def _source_name(node: fx.Node) -> str:
    """Dynamo's name for where a graph input came from, e.g. ``L['self']._modules['fc']._parameters['weight']``."""
    source = getattr(node, "_dynamo_source", None) or getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    name = source.name
    return name if isinstance(name, str) else name()


def _parameter_name(node: fx.Node) -> str:
    return normalize_source_path(_source_name(node)) or node.name


def _trace_to_aten(gm: fx.GraphModule) -> tuple[fx.GraphModule, Any]:
    """ATen-level copy of dynamo's graph (dynamo's own graph is left untouched)."""
    fakes = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
    fake_mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))
    # The Python dispatcher makes C++ composites such as aten.linear on a 3-D input read
    # symbolic sizes: without it torch 2.11 turns each dynamic size into an equality guard.
    with fx_traceback.preserve_node_meta(), fake_mode, enable_python_dispatcher():
        aten_gm = make_fx(fx.Interpreter(gm).run)(*fakes)
    _name_inputs_after_sources(aten_gm, gm)
    return aten_gm, fake_mode


def _name_inputs_after_sources(aten_gm: fx.GraphModule, dynamo_gm: fx.GraphModule) -> None:
    """``arg0_1`` -> ``fc_weight``: readable graph dumps (make_fx keeps the input order)."""
    dynamo_inputs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    aten_inputs = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    for aten_node, dynamo_node in zip(aten_inputs, dynamo_inputs):
        source = _source_name(dynamo_node)
        name = dynamo_node.name
        if "_parameters[" in source or "_buffers[" in source:
            name = re.sub(r"\W", "_", normalize_source_path(source))
        aten_node._rename(name)
    aten_gm.recompile()


def _linear_shape(node: fx.Node) -> tuple[int, int]:
    """``(out_features, in_features)`` of a matmul node, from its fake values."""
    x = passes.match_linear.linear_operands(node)[0]
    out_val, x_val = node.meta.get("val"), getattr(x, "meta", {}).get("val")
    if isinstance(out_val, torch.Tensor) and isinstance(x_val, torch.Tensor):
        return (int(out_val.shape[-1]), int(x_val.shape[-1]))
    return (0, 0)


def _check_no_released_reads(placeholders: list[fx.Node], example_inputs: list, names: dict) -> None:
    for node, value in zip(placeholders, example_inputs):
        if is_released(value) and node.users:
            raise ReleasedWeightError(f"this graph reads {names[node]} outside the int8 linears, but {RELEASE_HINT}")


# ---------------------------------------------------------------- the backend

class Int8LtBackend:
    """``torch.compile(model, backend=Int8LtBackend(config))``; ``int8fx.int8lt(...)`` builds one.

    ``reports`` holds one ``GraphReport`` per graph this backend compiled.
    """

    def __init__(self, config: Optional[Int8LtConfig] = None) -> None:
        self.config = config or Int8LtConfig()
        self.reports: list[GraphReport] = []

    def __repr__(self) -> str:
        return f"Int8LtBackend({self.config})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        report = GraphReport(index=len(self.reports))
        self.reports.append(report)
        try:
            rewritten = self._rewrite(gm, list(example_inputs), report)
        except ReleasedWeightError:
            raise  # the graph would read freed weights: no floating-point fallback exists
        except Exception as error:  # never fail the user's compile because of int8fx
            report.error = f"{type(error).__name__}: {error}"
            log.warning("int8lt: graph %d left in floating point: %s", report.index, report.error, exc_info=log.isEnabledFor(logging.DEBUG))
            counters["int8fx"]["graphs_failed"] += 1
            rewritten = None
        self._dump(report)
        if rewritten is None:
            return self._inner_compile(gm, list(example_inputs))
        aten_gm, quantized_inputs, weights, to_release = rewritten
        extras = [tensor for w in weights for tensor in (w.CB, w.SCB)]
        compiled = self._inner_compile(aten_gm, list(example_inputs) + extras)
        return _Int8Runtime(compiled, quantized_inputs, weights, to_release)

    # -- steps

    def _rewrite(self, gm: fx.GraphModule, example_inputs: list, report: GraphReport):
        if not any(isinstance(x, torch.nn.Parameter) and x.dim() == 2 for x in example_inputs):
            return None  # no weight matrix: nothing to rewrite
        aten_gm, fake_mode = _trace_to_aten(gm)
        placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
        dynamo_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        position = {node: i for i, node in enumerate(placeholders)}
        names = {node: _parameter_name(dyn) for node, dyn in zip(placeholders, dynamo_placeholders)}

        def is_parameter(node: fx.Node) -> bool:
            return isinstance(example_inputs[position[node]], torch.nn.Parameter)

        matches, skipped = passes.find_linears(aten_gm.graph, is_parameter)
        for skip in skipped:
            self._record_fp(report, skip.module_path, names.get(skip.weight, "?"), skip.node, skip.reason)
        accepted = []
        for match in matches:
            param = example_inputs[position[match.weight]]
            reason = self._policy_reason(match, param)
            if reason:
                self._record_fp(report, match.module_path, names[match.weight], match.node, reason)
            else:
                accepted.append(match)
        report.before = passes.format_graph(aten_gm.graph)
        if not accepted:
            _check_no_released_reads(placeholders, example_inputs, names)
            report.after = report.before
            self._log_summary(report)
            return None

        def fp_outliers(weight: fx.Node) -> bool:
            released_or_will_be = self.config.release_weights or is_released(example_inputs[position[weight]])
            return self.config.outlier_weights == "fp" and not released_or_will_be

        quantized_inputs = passes.rewrite_to_int8(
            aten_gm, accepted, threshold=self.config.threshold, fp_outliers=fp_outliers, fake_mode=fake_mode
        )
        weights = [STORE.get(example_inputs[q.weight_input_index], q.layout) for q in quantized_inputs]
        sqnr = {(q.weight_input_index, q.layout): w.weight_sqnr_db() for q, w in zip(quantized_inputs, weights)}
        for match in accepted:
            index = position[match.weight]
            shape = tuple(example_inputs[index].shape)
            report.layers.append(
                LayerReport(match.module_path, names[match.weight], shape if match.layout == "out_in" else shape[::-1], "int8",
                            weight_sqnr_db=sqnr[(index, match.layout)])
            )
            counters["int8fx"]["linears_replaced"] += 1
        to_release = self._unread_weights(placeholders, quantized_inputs, names) if self.config.release_weights else []
        _check_no_released_reads(placeholders, example_inputs, names)
        report.after = passes.format_graph(aten_gm.graph)
        self._log_summary(report)
        return aten_gm, quantized_inputs, weights, to_release

    @staticmethod
    def _unread_weights(placeholders, quantized_inputs, names) -> list[int]:
        """Input positions of the quantized weights that the rewritten graph no longer reads."""
        unread = []
        for q in quantized_inputs:
            node = placeholders[q.weight_input_index]
            if node.users:
                log.info("int8lt: keeping the fp data of %s: the graph still reads it", names[node])
            else:
                unread.append(q.weight_input_index)
        return unread

    def _policy_reason(self, match: passes.LinearMatch, param: torch.Tensor) -> str:
        """Why a matched linear must stay in floating point ("" when it can be quantized)."""
        config = self.config
        entry = passes.matches_skip(match.module_path, config.skip)
        if entry:
            return f"module path matches skip entry {entry!r}"
        if param.device.type == "meta":
            return "weight is on the meta device (no data to quantize)"
        if not param.is_floating_point():
            return f"weight dtype {param.dtype} is not floating point"
        if min(param.shape) < config.min_features:
            return f"smaller than min_features={config.min_features}"
        if param.requires_grad and torch.is_grad_enabled() and config.trainable_weights == "keep_fp":
            return "weight requires grad while grad is enabled (use torch.no_grad() or trainable_weights='freeze')"
        return ""

    def _record_fp(self, report: GraphReport, path: str, weight: str, node: fx.Node, reason: str) -> None:
        shape = _linear_shape(node)
        report.layers.append(LayerReport(path, weight, shape, "fp", reason))
        counters["int8fx"]["linears_skipped"] += 1
        log.info("int8lt: kept %s (%s) in floating point: %s", path or "<root>", weight, reason)

    def _dump(self, report: GraphReport) -> None:
        """Writes the graphs and the layer table when ``dump_dir`` or ``INT8FX_DUMP`` names a folder."""
        directory = self.config.dump_dir or os.environ.get("INT8FX_DUMP")
        if not directory:
            return
        from int8fx.report import write_graph_dump

        try:
            paths = write_graph_dump(directory, report)
            log.info("int8lt: graph %d dumped to %s", report.index, ", ".join(map(str, paths)))
        except OSError as error:
            log.warning("int8lt: could not write the graph dump to %s: %s", directory, error)

    def _log_summary(self, report: GraphReport) -> None:
        trainable = [layer.module_path or layer.weight for layer in report.skipped if "requires grad" in layer.reason]
        if trainable:  # one warning per graph: a model can have hundreds of such layers
            warnings.warn(
                f"int8lt: {len(trainable)} linear(s) (e.g. {trainable[0]}) stay in floating point because their "
                "weights require grad while grad is enabled; run inference under torch.no_grad()/"
                "torch.inference_mode(), call model.requires_grad_(False), or pass trainable_weights='freeze'.",
                stacklevel=2,
            )
        log.info("int8lt: graph %d: %d linears to int8, %d kept in floating point", report.index, len(report.replaced), len(report.skipped))

    def _inner_compile(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if self.config.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


class _Int8Runtime:
    """Calls the compiled graph with the current quantized weights appended to its inputs."""

    def __init__(self, compiled: Callable, quantized_inputs: list, weights: list[QuantizedWeight], to_release: list[int]) -> None:
        self.compiled = compiled
        # Released on the first call, not at compile time: dynamo re-checks its guards
        # (shapes and strides of every input) right after compiling.
        self.to_release = to_release
        self.indices = [q.weight_input_index for q in quantized_inputs]
        self.layouts = [q.layout for q in quantized_inputs]
        self.weights = weights

    def __call__(self, *args: Any) -> Any:
        if self.to_release:
            freed = sum(release_fp_weight(args[i]) for i in self.to_release)
            log.info("int8lt: released %.1f MiB of floating-point weights", freed / 2**20)
            self.to_release = []
        extras = []
        for slot, (index, weight) in enumerate(zip(self.indices, self.weights)):
            param = args[index]
            if not weight.is_current_for(param):
                weight = self.weights[slot] = STORE.get(param, self.layouts[slot])
            extras.append(weight.CB)
            extras.append(weight.SCB)
        return self.compiled(*args, *extras)


_default_backend: Optional[Int8LtBackend] = None


def default_backend() -> Int8LtBackend:
    """The backend instance behind ``backend="int8lt"`` (its ``reports`` cover every such compile)."""
    global _default_backend
    if _default_backend is None:
        _default_backend = Int8LtBackend()
    return _default_backend


def int8lt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None) -> Callable:
    """The backend behind ``torch.compile(model, backend="int8lt")``.

    ``torch.compile(model, backend="int8lt", options={"threshold": 6.0})`` passes
    ``Int8LtConfig`` fields through ``options``.
    """
    if options:
        return int8lt(**options)(gm, example_inputs)
    return default_backend()(gm, example_inputs)


def int8lt(config: Optional[Int8LtConfig] = None, **options: Any) -> Int8LtBackend:
    """A configured backend: ``torch.compile(model, backend=int8fx.int8lt(threshold=6.0, skip=["lm_head"]))``."""
    if config is not None and options:
        raise TypeError("pass either an Int8LtConfig or keyword options, not both")
    return Int8LtBackend(config or Int8LtConfig(**options))
