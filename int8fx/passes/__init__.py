"""FX passes of the ``int8lt`` backend: find the linears, rewrite them to int8, group the int8
linears that share an input."""

from int8fx.passes.format import format_graph
from int8fx.passes.group_siblings import group_siblings
from int8fx.passes.match_linear import Int8Linear, LinearMatch, SkippedLinear, embedding_tables, find_int8_linears, find_linears
from int8fx.passes.rewrite_int8 import QuantizedInput, appended_inputs, rewrite_to_int8

__all__ = [
    "Int8Linear",
    "LinearMatch",
    "QuantizedInput",
    "SkippedLinear",
    "appended_inputs",
    "embedding_tables",
    "find_int8_linears",
    "find_linears",
    "format_graph",
    "group_siblings",
    "rewrite_to_int8",
]
