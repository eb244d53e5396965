"""Output shared by the benchmark scripts: a markdown table on stdout, a CSV file, a plot."""

from __future__ import annotations

import csv
from typing import Any, Optional, Sequence


def format_cell(value: Any, spec: str = "") -> str:
    """``format(value, spec)``, with "" for a missing value (a ratio whose baseline did not run)."""
    return "" if value == "" else format(value, spec)


def print_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def write_csv(rows: Sequence[dict], path: str, columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def pyplot_or_none() -> Optional[Any]:
    """``matplotlib.pyplot`` with a file-only backend, or None (and a message) when matplotlib is
    not installed: the plots are optional, the tables and CSVs are the results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt
