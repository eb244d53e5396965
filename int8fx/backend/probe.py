"""The first call of a rewritten graph, once more, uncompiled: what each int8 layer's input held.

The report says, per int8 layer, how many input columns had an element ``|x| >= threshold``
on that call (the columns multiplied in floating point) and the largest ``|x|``: a layer whose
every column is an outlier column runs in floating point in all but name, and the report
should show it. The compiled graph cannot say (finding the columns inside it costs a pass over
each activation on every call), so the rewritten graph runs once through an FX interpreter
that looks at the input of each ``int8fx::int8_linear``. That costs one uncompiled forward
per graph, on its first call only (``Int8LtConfig(report_outliers=False)`` turns it off), and
is not done for a graph that mutates its inputs or draws random numbers (see ``side_effect``).
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any, Optional

import torch
from torch import fx

from int8fx import reference
from int8fx.report import LayerReport, OutlierStat

log = logging.getLogger("int8fx")


def side_effect(graph: fx.Graph) -> Optional[str]:
    """Why running ``graph`` one more time would change something (None: it would not).

    A graph that updates its inputs in place (a static KV cache's ``index_copy_``) or draws
    random numbers cannot be run twice for one call: its layers then go unrecorded. An update
    of a tensor the graph itself created (transformers' grouped MoE experts fill their inverse
    permutation with ``index_put_``) changes nothing outside it.
    """
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target._schema.is_mutable and _writes_to_an_input(node):
            return f"it updates tensors in place ({target})"
        if torch.Tag.nondeterministic_seeded in target.tags:
            return f"it draws random numbers ({target})"
    return None


def _writes_to_an_input(node: fx.Node) -> bool:
    schema = node.target._schema
    for position, argument in enumerate(schema.arguments):
        value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
        if argument.alias_info is not None and argument.alias_info.is_write and _may_alias_an_input(value):
            return True
    return False


def _may_alias_an_input(value: Any) -> bool:
    """Whether ``value`` may share memory with a graph input: it is one, or a view of one (through
    ops whose schema says their output aliases their first argument). Unknown ops: assume so."""
    while isinstance(value, fx.Node):
        if value.op == "placeholder":
            return True
        if value.op == "call_function" and value.target is operator.getitem:
            value = value.args[0]  # an element of a multi-output op (split, unbind...)
            continue
        if value.op != "call_function" or not isinstance(value.target, torch._ops.OpOverload):
            return True
        returns = value.target._schema.returns
        if not returns or all(r.alias_info is None for r in returns):
            return False  # a new tensor
        value = value.args[0]
    return isinstance(value, (list, tuple)) and any(_may_alias_an_input(v) for v in value)


class OutlierProbe:
    """Runs a rewritten graph once and writes each int8 layer's ``LayerReport.outliers``."""

    def __init__(self, gm: fx.GraphModule, layers: list[LayerReport]) -> None:
        self.gm = copy.deepcopy(gm)  # the inner compiler may change the module it is given
        # Keyed by module path and (out, in) shape: MoE experts' two weights share their module.
        self.layers: dict[tuple[str, tuple[int, int]], list[LayerReport]] = {}
        for layer in layers:
            self.layers.setdefault((layer.module_path, tuple(layer.shape)), []).append(layer)

    def __call__(self, *args: Any) -> None:
        recorder = _Recorder(self.gm)
        try:
            with torch.no_grad():
                recorder.run(*args)
        except Exception as error:  # the report is a courtesy: never fail the user's call
            log.info("int8lt: could not record the outlier columns of this graph: %s", error)
            return
        for key, stat in recorder.stats.items():
            for layer in self.layers.get(key, []):
                layer.outliers = stat


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.stats: dict[tuple[str, tuple[int, int]], OutlierStat] = {}

    # The int8 ops, and where their threshold argument is. For MoE experts the input holds every
    # expert's rows: the columns recorded are those that are outliers for at least one expert.
    # Siblings (one input, several linears) record the same columns for each of their modules.
    _THRESHOLD_ARGUMENT = {
        "int8fx.int8_linear.default": 4,
        "int8fx.int8_grouped_linear.default": 5,
        "int8fx.int8_linear_siblings.default": 4,
    }

    def run_node(self, node: fx.Node) -> Any:
        position = self._THRESHOLD_ARGUMENT.get(str(node.target)) if node.op == "call_function" else None
        if position is not None:
            args, _ = self.fetch_args_kwargs_from_env(node)
            if isinstance(args[1], (list, tuple)):  # siblings: one CB per module
                modules = zip(node.meta.get("int8fx_module_paths", [""] * len(args[1])), args[1])
            else:
                modules = [(node.meta.get("int8fx_module_path", ""), args[1])]
            for path, CB in modules:
                key = (path, tuple(int(d) for d in CB.shape[-2:]))  # CB: [(E,) N, K]
                self._record(key, args[0], float(args[position]))
        return super().run_node(node)

    def _record(self, key: tuple[str, tuple[int, int]], x: torch.Tensor, threshold: float) -> None:
        x2d = x.detach().reshape(-1, x.shape[-1])
        columns = int(reference.outlier_columns(x2d, threshold).sum())
        max_abs = float(x2d.abs().max()) if x2d.numel() else 0.0
        seen = self.stats.get(key)
        if seen is not None:  # the same module called twice in one graph: the worse of its calls
            columns, max_abs = max(columns, seen.columns), max(max_abs, seen.max_abs)
        self.stats[key] = OutlierStat(columns, x2d.shape[1], max_abs)
