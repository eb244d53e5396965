"""What the ``int8lt`` backend did, per graph and per linear, and its human-readable forms.

* ``GraphReport`` / ``LayerReport``: written by the backend for every graph it compiles
  (``Int8LtBackend.reports``), one ``LayerReport`` per linear it saw, replaced or not.
* ``format_layer_table(reports)``: one row per linear of every compiled graph: module path,
  weight shape, int8 or kept in floating point (and why), weight-quantization SQNR, and
  optionally the outlier columns the layer's input had.
* ``count_outlier_columns(model, run, threshold)``: runs the *eager* model once with
  forward pre-hooks on its ``nn.Linear`` modules and counts, per module, the input columns
  that hold an element ``|x| >= threshold`` (the columns LLM.int8() multiplies in fp).
* ``write_graph_dump(directory, report)``: per compiled graph, the ATen graph before and
  after the rewrite and the per-layer table, as files a person can diff.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

# ---------------------------------------------------------------- what the backend did


@dataclass
class LayerReport:
    """What the backend did with one linear."""

    module_path: str
    weight: str  # the parameter's name, e.g. "model.embed_tokens.weight" for a tied lm_head
    shape: tuple[int, int]  # (out_features, in_features); MoE experts: each expert's
    action: str  # "int8" or "fp"
    reason: str = ""
    weight_sqnr_db: float = float("nan")
    # int8 layers: the input's outlier columns and largest |x| on the graph's first call
    # (``Int8LtConfig.report_outliers``); None until that call, or when not recorded.
    outliers: Optional["OutlierStat"] = None
    experts: Optional[int] = None  # MoE experts stored as one [experts, out, in] parameter: how many


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


class OutlierStat(NamedTuple):
    """What one linear's input looked like over a run."""

    columns: int  # input columns with at least one |x| >= threshold
    in_features: int
    max_abs: float  # largest |x| seen


OutlierStats = Mapping[str, OutlierStat]  # keyed by module path, e.g. "model.layers.0.mlp.down_proj"


# ---------------------------------------------------------------- outliers


def count_outlier_columns(model: torch.nn.Module, run: Callable[[], Any], threshold: float) -> dict[str, OutlierStat]:
    """Calls ``run()`` (which should call the eager ``model``) and counts outlier columns per ``nn.Linear``.

    A column counts once however many calls or rows hit it, as in the backend: the
    decomposition is decided over the whole batch of one call, and a layer whose columns
    differ between calls still only ever has these columns in fp. ``threshold <= 0``
    counts nothing (the decomposition is off), but ``max_abs`` is still recorded.
    """
    seen: dict[str, torch.Tensor] = {}
    max_abs: dict[str, float] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            magnitude = x.reshape(-1, x.shape[-1]).abs().float()
            columns = (magnitude >= threshold).any(dim=0) if threshold > 0 else torch.zeros_like(magnitude[0], dtype=torch.bool)
            seen[name] = seen[name] | columns if name in seen else columns
            max_abs[name] = max(max_abs.get(name, 0.0), float(magnitude.max()) if magnitude.numel() else 0.0)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: OutlierStat(int(mask.sum()), mask.numel(), max_abs[name]) for name, mask in seen.items()}


# ---------------------------------------------------------------- per-layer table

_COLUMNS = ("module path", "weight", "shape (out x in)", "action", "weight SQNR (dB)", "outlier cols", "reason")


def layer_rows(report: GraphReport, outliers: Optional[OutlierStats] = None) -> list[dict[str, Any]]:
    """One plain dict per linear of ``report`` (the JSON form of the table)."""
    rows = []
    for layer in report.layers:
        stat = outliers.get(layer.module_path) if outliers is not None else layer.outliers
        rows.append(
            {
                "graph": report.index,
                "module_path": layer.module_path,
                "weight": layer.weight,
                "out_features": layer.shape[0] or None,
                "in_features": layer.shape[1] or None,  # the backend does not record it for fp layers
                "experts": layer.experts,
                "action": layer.action,
                "reason": layer.reason,
                "weight_sqnr_db": None if math.isnan(layer.weight_sqnr_db) else layer.weight_sqnr_db,
                "outlier_columns": None if stat is None else stat.columns,
                "max_abs_input": None if stat is None else stat.max_abs,
            }
        )
    return rows


def _shape_text(layer: LayerReport) -> str:
    text = " x ".join(str(d) if d else "?" for d in layer.shape)
    return text if layer.experts is None else f"{layer.experts} experts x {text}"


def _sqnr_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _outlier_text(stat: Optional[OutlierStat]) -> str:
    return "-" if stat is None else f"{stat.columns}/{stat.in_features}"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_layer_table(reports: Sequence[GraphReport], outliers: Optional[OutlierStats] = None) -> str:
    """The per-layer table of every graph in ``reports``, with a one-line summary per graph.

    ``outliers`` (from ``count_outlier_columns``) gives how many input columns of each layer
    were outliers; without it, what the backend recorded on each graph's first call (``-``
    where nothing was recorded).
    """
    blocks = []
    for report in reports:
        title = f"graph {report.index}: {len(report.replaced)} linears to int8, {len(report.skipped)} kept in floating point"
        if report.error:
            title += f"; rewrite failed, whole graph left in floating point: {report.error}"
        rows = [
            (
                layer.module_path or "<root>",
                layer.weight,
                _shape_text(layer),
                "int8" if layer.action == "int8" else "fp (skipped)",
                _sqnr_text(layer.weight_sqnr_db),
                _outlier_text(outliers.get(layer.module_path) if outliers is not None else layer.outliers),
                layer.reason,
            )
            for layer in report.layers
        ]
        blocks.append(title if not rows else f"{title}\n{_table(rows, _COLUMNS)}")
    return "\n\n".join(blocks) if blocks else "no graph was compiled"


def outlier_summary(outliers: OutlierStats) -> str:
    """``"412 columns in 45 of 211 layers (most: model.layers.3.mlp.down_proj, 37)"``."""
    hit = {name: stat for name, stat in outliers.items() if stat.columns}
    if not hit:
        return f"0 columns in 0 of {len(outliers)} layers"
    worst = max(hit, key=lambda name: hit[name].columns)
    total = sum(stat.columns for stat in hit.values())
    return f"{total} columns in {len(hit)} of {len(outliers)} layers (most: {worst}, {hit[worst].columns})"


# ---------------------------------------------------------------- graph dumps


def write_graph_dump(directory: str | Path, report: GraphReport, outliers: Optional[OutlierStats] = None) -> list[Path]:
    """Writes ``graph_<i>_before.txt``, ``graph_<i>_after.txt``, ``graph_<i>_layers.txt`` and ``.json``.

    ``<i>`` is ``report.index``. A graph that was not rewritten (no linear accepted, or
    the rewrite failed) gets an ``after`` file that says so instead of a graph. Returns
    the paths written; ``directory`` is created if needed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"graph_{report.index}"
    not_rewritten = f"# graph {report.index} was not rewritten: " + (report.error or "no linear was replaced")
    contents = {
        f"{stem}_before.txt": report.before
        or f"# graph {report.index}: no ATen trace ({report.error or 'no weight matrix among the inputs'})",
        f"{stem}_after.txt": report.after if report.replaced and not report.error else not_rewritten,
        f"{stem}_layers.txt": format_layer_table([report], outliers),
        f"{stem}_layers.json": json.dumps(layer_rows(report, outliers), indent=1),
    }
    paths = []
    for name, text in contents.items():
        path = directory / name
        path.write_text(text + "\n", encoding="utf-8")
        paths.append(path)
    return paths
