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
from typing import Any, Optional

import torch
from torch import fx

from int8fx import reference
from int8fx.report import LayerReport, OutlierStat

log = logging.getLogger("int8fx")


def side_effect(graph: fx.Graph) -> Optional[str]:
    """Why running ``graph`` one more time would change something (None: it would not).

    A graph that updates its inputs in place (a static KV cache's ``index_copy_``) or draws
    random numbers cannot be run twice for one call: its layers then go unrecorded.
    """
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target._schema.is_mutable:
            return f"it updates tensors in place ({target})"
        if torch.Tag.nondeterministic_seeded in target.tags:
            return f"it draws random numbers ({target})"
    return None


class OutlierProbe:
    """Runs a rewritten graph once and writes each int8 layer's ``LayerReport.outliers``."""

    def __init__(self, gm: fx.GraphModule, layers: list[LayerReport]) -> None:
        self.gm = copy.deepcopy(gm)  # the inner compiler may change the module it is given
        self.layers: dict[str, list[LayerReport]] = {}
        for layer in layers:
            self.layers.setdefault(layer.module_path, []).append(layer)

    def __call__(self, *args: Any) -> None:
        recorder = _Recorder(self.gm)
        try:
            with torch.no_grad():
                recorder.run(*args)
        except Exception as error:  # the report is a courtesy: never fail the user's call
            log.info("int8lt: could not record the outlier columns of this graph: %s", error)
            return
        for path, stat in recorder.stats.items():
            for layer in self.layers.get(path, []):
                layer.outliers = stat


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.stats: dict[str, OutlierStat] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_function" and str(node.target) == "int8fx.int8_linear.default":
            args, _ = self.fetch_args_kwargs_from_env(node)
            self._record(node.meta.get("int8fx_module_path", ""), args[0], float(args[4]))
        return super().run_node(node)

    def _record(self, path: str, x: torch.Tensor, threshold: float) -> None:
        x2d = x.detach().reshape(-1, x.shape[-1])
        columns = int(reference.outlier_columns(x2d, threshold).sum())
        max_abs = float(x2d.abs().max()) if x2d.numel() else 0.0
        seen = self.stats.get(path)
        if seen is not None:  # the same module called twice in one graph: the worse of its calls
            columns, max_abs = max(columns, seen.columns), max(max_abs, seen.max_abs)
        self.stats[path] = OutlierStat(columns, x2d.shape[1], max_abs)
