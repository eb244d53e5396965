"""FX passes of the ``int8lt`` backend: find the linears, then rewrite them to int8."""

from int8fx.passes.format import format_graph
from int8fx.passes.match_linear import LinearMatch, SkippedLinear, find_linears, matches_skip
from int8fx.passes.rewrite_int8 import QuantizedInput, rewrite_to_int8

__all__ = [
    "LinearMatch",
    "QuantizedInput",
    "SkippedLinear",
    "find_linears",
    "format_graph",
    "matches_skip",
    "rewrite_to_int8",
]
