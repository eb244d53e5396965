"""``Int8LtBackend``: the backend's steps, each handing a typed result to the next.

1. ``trace.trace_to_aten`` -> ``TracedGraph``;
2. ``passes.find_linears`` + ``policy.fp_reason`` -> ``LinearPlan`` (which linears become
   int8; every other one is recorded in the report with its reason);
3. ``passes.rewrite_to_int8`` + ``weights.STORE``, then ``passes.group_siblings`` ->
   ``RewrittenGraph`` (the graph with ``int8fx::int8_linear`` nodes, those of one input
   grouped, and ``CB``/``SCB`` inputs, and the quantized weights);
4. the inner compiler (inductor) compiles the rewritten graph;
5. ``runtime.Int8Runtime`` runs it.

Anything that goes wrong in 1-4 leaves the graph in floating point with a logged reason (the
report lists its linears in fp): compilation never fails because of int8fx.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

import int8fx.ops  # noqa: F401  (registers torch.ops.int8fx)
from int8fx import passes
from int8fx.backend.module_paths import PATHS
from int8fx.backend.policy import fp_reason
from int8fx.backend.probe import OutlierProbe, side_effect
from int8fx.backend.runtime import Int8Runtime, SharedGraphSkips
from int8fx.backend.trace import TracedGraph, has_tensor_subclass_inputs, keep_dynamo_input_metadata, trace_through_aot, trace_to_aten
from int8fx.config import Int8LtConfig
from int8fx.report import GraphReport, LayerReport, write_graph_dump
from int8fx.weights import RELEASE_HINT, STORE, QuantizedWeight, ReleasedWeightError, is_released

log = logging.getLogger("int8fx")

# Every parameter any graph read as an embedding table. A tied head is often compiled in a later
# graph than its embedding (after a graph break): the tensor, not the graph, says it is tied.
_EMBEDDING_TABLES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ALREADY_INT8 = "already int8 (int8fx.nn.Linear8bitLt or Int8Experts, or loaded with int8fx.Int8fxConfig)"
# AOTAutograd traced this graph with a backward: its forward's saved tensors are fixed by then.
_TRAINING_GRAPH = "tensor-parallel graph traced for training (with a backward): int8 replaces linears in inference graphs only"


@dataclass
class LinearPlan:
    """Step 2's result: the linears of ``traced`` that become int8."""

    traced: TracedGraph
    accepted: list[passes.LinearMatch]
    frame_paths: dict[int, tuple[str, str]]  # weight input position -> dynamo's call-site path and weight name, in the frame
    # Positions of weights the skip list keeps in fp, rewritten anyway because the graph was
    # compiled in an inner frame and may serve other modules too: their calls run in fp.
    guarded: set[int] = dataclasses.field(default_factory=set)


@dataclass
class RewrittenGraph:
    """Step 3's result: the graph to compile and what its runtime needs."""

    gm: fx.GraphModule
    quantized_inputs: list[passes.QuantizedInput]  # in the order of the appended CB/SCB inputs
    weights: list[QuantizedWeight]  # one per quantized input
    release_positions: list[int]  # inputs whose fp data the graph no longer reads (release_weights)
    example_inputs: list  # the inner compiler's, the CB/SCB inputs included
    frame_paths: dict[int, tuple[str, str]]  # LinearPlan's
    guarded: set[int]  # LinearPlan's


class Int8LtBackend:
    """``torch.compile(model, backend=Int8LtBackend(config))``; ``int8fx.int8lt(...)`` builds one.

    ``reports`` holds one ``GraphReport`` per graph this backend compiled; ``unseen_weights(model)``
    lists the linears of ``model`` that no graph brought to the backend (they ran eagerly).
    """

    def __init__(self, config: Optional[Int8LtConfig] = None) -> None:
        self.config = config or Int8LtConfig()
        self.reports: list[GraphReport] = []
        self._graph_parameters = WeakIdKeyDictionary()  # every parameter some graph took as an input

    def __repr__(self) -> str:
        return f"Int8LtBackend({self.config})"

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None, options: Optional[dict] = None
    ) -> Callable:
        """Compiles one graph. ``torch.compile(model, backend=this, mode=..., options=...)`` passes
        ``mode`` and ``options`` here: they override this backend's config for the call."""
        if mode is not None or options:
            variant = self._variant(dataclasses.replace(self.config, **(options or {}), mode=mode or self.config.mode))
            return variant(gm, example_inputs)
        report = GraphReport(index=len(self.reports))
        self.reports.append(report)
        inputs = list(example_inputs)
        for value in inputs:
            if isinstance(value, torch.nn.Parameter):
                self._graph_parameters[value] = True
        if not any(isinstance(x, torch.nn.Parameter) and x.dim() >= 2 for x in inputs):
            self._dump(report)  # no weight matrix (nor stack of them, as MoE experts): nothing to rewrite or report
            return self._inner_compile(gm, inputs)
        if has_tensor_subclass_inputs(inputs):
            # Tensor parallelism (DTensor parameters): AOTAutograd traces down to the local
            # shards and calls back with its forward graph.
            def compile_aten(make_traced: Callable[[], TracedGraph], aten_gm: fx.GraphModule, aten_inputs: list, inference: bool):
                return self._compile(make_traced, aten_gm, aten_inputs, report, "" if inference else _TRAINING_GRAPH)

            return trace_through_aot(gm, inputs, compile_aten, self._inner_compile)
        return self._compile(lambda: trace_to_aten(gm, inputs), gm, inputs, report)

    def _compile(
        self, make_traced: Callable[[], TracedGraph], gm: fx.GraphModule, inputs: list, report: GraphReport, fp_for_all: str = ""
    ) -> Callable:
        """Steps 1-5 for one graph; ``gm`` compiled unchanged when nothing is rewritten.
        ``fp_for_all``: a reason that keeps every linear of this graph in floating point."""
        try:
            rewritten = self._rewrite(make_traced(), report, fp_for_all)
        except ReleasedWeightError:
            raise  # the graph would read freed weights: no floating-point fallback exists
        except Exception as error:  # never fail the user's compile because of int8fx
            self._leave_in_fp(report, f"{type(error).__name__}: {error}")
            rewritten = None
        self._dump(report)
        if rewritten is None:
            return self._inner_compile(gm, inputs)
        probe = self._outlier_probe(rewritten.gm, report)  # before inductor sees the graph
        keep_dynamo_input_metadata(gm, rewritten.gm)
        try:
            compiled = self._inner_compile(rewritten.gm, rewritten.example_inputs)
        except Exception as error:  # the inner compiler rejects the int8 graph: compile the user's
            self._leave_in_fp(report, f"the inner compiler failed on the int8 graph: {type(error).__name__}: {error}")
            self._dump(report)
            return self._inner_compile(gm, inputs)
        shared = SharedGraphSkips(rewritten.frame_paths, self.config.skip, functools.partial(self._record_shared_module, report))
        shared.keep_in_fp(rewritten.example_inputs[index] for index in rewritten.guarded)
        return Int8Runtime(
            compiled,
            rewritten.quantized_inputs,
            rewritten.weights,
            rewritten.release_positions,
            probe,
            shared,
            compile_fp=lambda args: self._inner_compile(gm, args),
        )

    # ---------------------------------------------------------------- steps 1-3

    def _rewrite(self, traced: TracedGraph, report: GraphReport, fp_for_all: str = "") -> Optional[RewrittenGraph]:
        """Steps 2-3 on a traced graph; None when nothing is to be rewritten (the graph then compiles unchanged)."""
        plan = self._plan(traced, report, fp_for_all)
        traced = plan.traced
        report.before = passes.format_graph(traced.gm.graph)
        rewritten = self._rewrite_to_int8(plan, report) if plan.accepted else None
        # Siblings group the int8 linears just written and those already in the graph (a model
        # loaded in int8): a graph of the latter alone is rewritten for its groups.
        grouped = self.config.group_siblings and passes.group_siblings(traced.gm, traced.fake_mode)
        if rewritten is None and grouped:
            rewritten = RewrittenGraph(traced.gm, [], [], [], traced.compile_inputs([]), plan.frame_paths, plan.guarded)
        self._check_no_released_reads(traced)
        report.after = passes.format_graph(traced.gm.graph) if rewritten is not None else report.before
        self._log_summary(report)
        return rewritten

    def _plan(self, traced: TracedGraph, report: GraphReport, fp_for_all: str = "") -> LinearPlan:
        """Step 2: every linear the passes find is either accepted or reported in fp with its reason."""
        matches, skipped = passes.find_linears(traced.gm.graph, traced.is_parameter)
        for layer in passes.find_int8_linears(traced.gm.graph, traced.is_parameter):
            path = PATHS.call_site(traced.owner_of(layer.weight), layer.module_path, traced.names.get(layer.weight, ""))
            name, experts = traced.names.get(layer.weight, "?"), _experts_in(traced.input_of(layer.weight))
            report.layers.append(LayerReport(path, name, layer.shape, "int8", _ALREADY_INT8, experts=experts))
            counters["int8fx"]["linears_already_int8"] += 1
        for skip in skipped:
            path = skip.module_path
            experts = None
            if skip.weight is not None:
                path = PATHS.call_site(traced.owner_of(skip.weight), skip.module_path, traced.names.get(skip.weight, ""))
                experts = _experts_in(traced.input_of(skip.weight))
            shape = skip.shape or _linear_shape(skip.node)
            self._record_fp(report, path, traced.names.get(skip.weight, "?"), shape, skip.reason, experts=experts)
        for node in passes.embedding_tables(traced.gm.graph, traced.is_parameter):
            _EMBEDDING_TABLES[traced.input_of(node)] = True
        accepted, frame_paths, guarded = [], {}, set()
        for match in matches:
            param, owner, position = traced.input_of(match.weight), traced.owner_of(match.weight), traced.position(match.weight)
            frame_paths[position] = (match.module_path, traced.names[match.weight])
            # The path in the whole model: after a graph break dynamo's is relative to an inner frame.
            full_path = PATHS.call_site(owner, match.module_path, traced.names[match.weight])
            inner_frame = full_path != match.module_path
            match = dataclasses.replace(match, module_path=full_path)
            tied = param in _EMBEDDING_TABLES
            reason = fp_reason(match, param, self.config, owner=owner, tied_to_embedding=tied) or fp_for_all
            if reason:
                name, shape = traced.names[match.weight], _match_shape(match)
                self._record_fp(report, match.module_path, name, shape, reason, experts=_experts_in(param))
            if not reason:
                accepted.append(match)
            elif inner_frame and not fp_for_all and not self._fp_reason_but_skip(match, param, owner, tied):
                # Only the skip list keeps it in fp, and this graph may serve other modules (every
                # layer of a class): rewrite it anyway; its own calls run the graph in fp.
                accepted.append(match)
                guarded.add(position)
        return LinearPlan(traced, accepted, frame_paths, guarded)

    def _fp_reason_but_skip(self, match: passes.LinearMatch, param: Any, owner: Any, tied: bool) -> str:
        return fp_reason(match, param, dataclasses.replace(self.config, skip=()), owner=owner, tied_to_embedding=tied)

    def _rewrite_to_int8(self, plan: LinearPlan, report: GraphReport) -> RewrittenGraph:
        """Step 3: the graph rewritten, its weights quantized (once per process), the report written."""
        traced = plan.traced

        def fp_outliers(weight: fx.Node) -> bool:
            released_or_will_be = self.config.release_weights or is_released(traced.input_of(weight))
            return self.config.outlier_weights == "fp" and not released_or_will_be

        quantized_inputs = passes.rewrite_to_int8(
            traced.gm, plan.accepted, threshold=self.config.threshold, fp_outliers=fp_outliers, fake_mode=traced.fake_mode
        )
        # Real tensors: AOTAutograd calls its compiler with its fake mode still active.
        with unset_fake_temporarily():
            weights = [
                STORE.get(traced.inputs[q.weight_input_index], q.layout, traced.subclass_owner(q.weight_input_index))
                for q in quantized_inputs
            ]
            sqnr = {(q.weight_input_index, q.layout): w.weight_sqnr_db() for q, w in zip(quantized_inputs, weights)}
        for match in plan.accepted:
            index = traced.position(match.weight)
            if index in plan.guarded:
                continue  # reported in fp by the plan
            report.layers.append(
                LayerReport(
                    match.module_path,
                    traced.names[match.weight],
                    _match_shape(match),
                    "int8",
                    weight_sqnr_db=sqnr[(index, match.layout)],
                    experts=_experts_in(traced.inputs[index]),
                )
            )
            counters["int8fx"]["linears_replaced"] += 1
        release = self._unread_weights(traced, quantized_inputs) if self.config.release_weights else []
        release = [index for index in release if index not in plan.guarded]  # their fp calls read them
        example_inputs = traced.compile_inputs(passes.appended_inputs((w.CB, w.SCB) for w in weights))
        return RewrittenGraph(traced.gm, quantized_inputs, weights, release, example_inputs, plan.frame_paths, plan.guarded)

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _leave_in_fp(report: GraphReport, error: str) -> None:
        """The whole graph runs in floating point: logged, counted, and every layer the report
        had as int8 says so, with the reason."""
        report.error = error
        for layer in report.replaced:
            layer.action, layer.reason = "fp", f"its graph was left in floating point: {error}"
        log.warning("int8lt: graph %d left in floating point: %s", report.index, error, exc_info=log.isEnabledFor(logging.DEBUG))
        counters["int8fx"]["graphs_failed"] += 1

    def _outlier_probe(self, gm: fx.GraphModule, report: GraphReport) -> Optional[OutlierProbe]:
        if not self.config.report_outliers:
            return None
        reason = side_effect(gm.graph)
        if reason:
            log.info("int8lt: graph %d's outlier columns are not recorded: %s", report.index, reason)
            return None
        return OutlierProbe(gm, report.replaced)

    @staticmethod
    def _unread_weights(traced: TracedGraph, quantized_inputs: list[passes.QuantizedInput]) -> list[int]:
        """Input positions of the quantized weights that the rewritten graph no longer reads."""
        unread = []
        for q in quantized_inputs:
            node = traced.placeholders[q.weight_input_index]
            if node.users:
                log.info("int8lt: keeping the fp data of %s: the graph still reads it", traced.names[node])
            else:
                unread.append(q.weight_input_index)
        return unread

    @staticmethod
    def _check_no_released_reads(traced: TracedGraph) -> None:
        for node, value in zip(traced.placeholders, traced.inputs):
            if is_released(value) and node.users:
                raise ReleasedWeightError(f"this graph reads {traced.names[node]} outside the int8 linears, but {RELEASE_HINT}")

    def _record_shared_module(self, report: GraphReport, path: str, entry: Optional[str], shape: tuple) -> None:
        """Another module this graph serves (after a graph break, every layer of a class): int8,
        or fp for the calls of a module the skip list names."""
        shape = shape if len(shape) == 2 else (0, 0)
        if entry is None:
            report.layers.append(LayerReport(path, f"{path}.weight", shape, "int8", "served by a graph shared with other modules"))
            return
        reason = f"module path matches skip entry {entry!r}: the graph it shares with other modules runs in fp for it"
        self._record_fp(report, path, f"{path}.weight", shape, reason)

    def _record_fp(
        self, report: GraphReport, path: str, weight: str, shape: tuple[int, int], reason: str, experts: Optional[int] = None
    ) -> None:
        report.layers.append(LayerReport(path, weight, shape, "fp", reason, experts=experts))
        counters["int8fx"]["linears_skipped"] += 1
        log.info("int8lt: kept %s (%s) in floating point: %s", path or "<root>", weight, reason)

    def _dump(self, report: GraphReport) -> None:
        """Writes the graphs and the layer table when ``dump_dir`` or ``INT8FX_DUMP`` names a folder."""
        directory = self.config.dump_dir or os.environ.get("INT8FX_DUMP")
        if not directory:
            return
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

    def unseen_weights(self, model: torch.nn.Module) -> list[LayerReport]:
        """The floating-point linear weights of ``model`` (``nn.Linear`` weights and MoE expert stacks)
        that no graph compiled by this backend took as an input, each as an fp ``LayerReport``.

        Dynamo runs a frame it cannot compile eagerly (a loop over ``nonzero()``'s result, as
        transformers' ``eager`` MoE experts; a ``torch.compiler.disable``'d function), so no
        backend ever sees those linears: without this list they would stay in fp unreported.
        Call it after the model has run (``model``: the compiled module or the original)."""
        model = getattr(model, "_orig_mod", model)
        unseen = []
        for path, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if _is_linear_weight(module, name, param) and param not in self._graph_parameters:
                    experts = int(param.shape[0]) if param.dim() == 3 else None
                    shape = tuple(int(d) for d in param.shape[-2:])
                    full_name = f"{path}.{name}" if path else name
                    unseen.append(LayerReport(path, full_name, shape, "fp", _NEVER_IN_A_GRAPH, experts=experts))
        return unseen

    def _variant(self, config: Int8LtConfig) -> "Int8LtBackend":
        """A backend with ``config`` that writes its reports into this one's ``reports``."""
        variant = Int8LtBackend(config)
        variant.reports = self.reports
        variant._graph_parameters = self._graph_parameters
        return variant

    def _inner_compile(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if self.config.inner == "eager":
            return gm.forward
        import torch._inductor
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(self.config.mode) if self.config.mode else {}
        if patches.get("cpp_wrapper", torch._inductor.config.cpp_wrapper):
            _hide_placeholder_values(gm)
        return compile_fx(gm, example_inputs, config_patches=patches)


def _hide_placeholder_values(gm: fx.GraphModule) -> None:
    """Makes a traced graph look like dynamo's own to inductor's ``cpp_wrapper`` mode.

    With ``cpp_wrapper``, inductor (torch 2.11-2.13, ``compile_fx``) takes a graph whose
    placeholders carry ``meta["val"]`` for an exported one and compiles it with those values as
    inputs, its SymInts replaced by None; a graph traced with dynamic sizes, as int8lt's are,
    then fails inside AOTAutograd. Without the values, inductor uses the example inputs."""
    for node in gm.graph.find_nodes(op="placeholder"):
        node.meta.pop("val", None)


_NEVER_IN_A_GRAPH = (
    "never reached the backend: its module ran eagerly (dynamo fell back to eager for a frame it "
    "could not compile, e.g. a loop over data-dependent indices, or a disabled function)"
)


def _is_linear_weight(module: torch.nn.Module, name: str, param: torch.Tensor) -> bool:
    """An fp ``nn.Linear`` weight, or an fp MoE expert stack (a 3-D parameter of an experts module)."""
    if not param.is_floating_point():
        return False  # already int8 (bitsandbytes-style modules)
    if isinstance(module, torch.nn.Linear):
        return name == "weight"
    return param.dim() == 3 and "expert" in type(module).__name__.lower()


def _match_shape(match: passes.LinearMatch) -> tuple[int, int]:
    """``(out_features, in_features)`` of a matched linear (MoE experts: of each expert)."""
    if match.is_experts:
        return passes.match_linear.expert_shape(match)
    stored = tuple(int(d) for d in match.weight.meta["val"].shape)
    return stored if match.layout == "out_in" else stored[::-1]


def _experts_in(param: Any) -> Optional[int]:
    """How many experts a 3-D MoE weight ``[E, N, K]`` holds; None for any other weight."""
    return int(param.shape[0]) if isinstance(param, torch.Tensor) and param.dim() == 3 else None


def _linear_shape(node: fx.Node) -> tuple[int, int]:
    """``(out_features, in_features)`` of a matmul node, from its fake values."""
    x = passes.match_linear.linear_operands(node)[0]
    out_val, x_val = node.meta.get("val"), getattr(x, "meta", {}).get("val")
    if isinstance(out_val, torch.Tensor) and isinstance(x_val, torch.Tensor):
        return (int(out_val.shape[-1]), int(x_val.shape[-1]))
    return (0, 0)


# ---------------------------------------------------------------- entry points

_default_backend: Optional[Int8LtBackend] = None


def default_backend() -> Int8LtBackend:
    """The backend instance behind ``backend="int8lt"`` (its ``reports`` cover every such compile)."""
    global _default_backend
    if _default_backend is None:
        _default_backend = Int8LtBackend()
    return _default_backend


def int8lt_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None, options: Optional[dict] = None
) -> Callable:
    """The backend behind ``torch.compile(model, backend="int8lt")``.

    ``torch.compile(model, backend="int8lt", options={"threshold": 6.0})`` passes
    ``Int8LtConfig`` fields through ``options``, and ``mode="reduce-overhead"`` (or another of
    torch.compile's modes) is handed to inductor for the rewritten graph.
    """
    return default_backend()(gm, example_inputs, mode=mode, options=options)


def int8lt(config: Optional[Int8LtConfig] = None, **options: Any) -> Int8LtBackend:
    """A configured backend: ``torch.compile(model, backend=int8fx.int8lt(threshold=6.0, skip=["lm_head"]))``."""
    if config is not None and options:
        raise TypeError("pass either an Int8LtConfig or keyword options, not both")
    return Int8LtBackend(config or Int8LtConfig(**options))
