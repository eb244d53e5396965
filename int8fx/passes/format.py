"""A compact, stable text form of an FX graph, for tests, dumps and logs."""

from __future__ import annotations

import torch
from torch import fx


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        name = target._schema.name.split("::")[1]
        return f"{namespace}.{name}"
    return getattr(target, "__name__", str(target))


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    return repr(a)


def format_graph(graph: fx.Graph) -> str:
    """One line per node: ``name = op(args)``; placeholders listed once at the top."""
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    lines = [f"inputs: {', '.join(inputs)}"]
    for node in graph.nodes:
        if node.op == "call_function":
            args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{node.name} = {_target_name(node.target)}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
    return "\n".join(lines)
