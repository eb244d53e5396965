"""Find the linears of an ATen graph: matmuls whose weight operand is a model parameter.

``make_fx`` decomposes every spelling of a linear into a few ATen patterns:

* ``nn.Linear`` / ``F.linear`` / ``x @ W.T (+ b)``: ``mm(x2d, t(W))`` or ``addmm(b, x2d, t(W))``
  (the transpose may also be ``permute(W, [1, 0])`` or ``transpose(W, 0, 1)``), with
  ``view``s around 3-D and 4-D inputs;
* ``torch.addmm(b, x, W)`` / ``x @ W`` with ``W`` stored ``[in, out]`` (GPT-2's ``Conv1D``):
  the parameter is used untransposed;
* ``aten.linear`` where the graph was traced above autograd (pre-dispatch);
* under autocast the weight is first cast (``_to_copy(W, dtype=...)``);
* a 3-D input that cannot be flattened without a copy (e.g. a transposed attention output
  at decode, seq = 1) becomes ``bmm(x3d, view(expand(t(W), [B, K, N])))``.

Matmuls of two activations (attention's ``Q @ K^T``, ``P @ V``) never name a parameter
and are not candidates. Every candidate comes back either as a ``LinearMatch`` or as a
``SkippedLinear`` with its reason, and so does every other matmul (or library op, such as
transformers' ``grouped_mm_fallback``) that a 2-D or larger parameter reaches through views,
indexing or casts: MoE experts stored as one 3-D parameter, used through ``bmm`` on
``W[expert_ids]``, ``grouped_mm`` or ``F.linear(x, W[e])``, are reported, not silently left out.

A match whose output picks experts through ``top-k`` (an MoE router, possibly after a softmax
or sigmoid) is marked ``feeds_top_k``: the backend's policy keeps routers in fp by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import fx

from int8fx.paths import WeightLayout, normalize_source_path

aten = torch.ops.aten

_LINEAR_OPS = (aten.mm.default, aten.addmm.default, aten.linear.default, aten.bmm.default)
_BROADCAST_OPS = (aten.expand.default, aten.view.default, aten._unsafe_view.default)
# Other products a weight may reach, which the rewrite does not handle (yet): reported.
_OTHER_MATMUL_OPS = frozenset(
    {aten.baddbmm.default, aten.matmul.default} | ({aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set())
)
# Ops a weight may pass through on its way to a product: views, indexing, casts.
_WEIGHT_PATH_OPS = frozenset(
    {
        aten.select.int,
        aten.index.Tensor,
        aten.index_select.default,
        aten.slice.Tensor,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.expand.default,
        aten.t.default,
        aten.transpose.int,
        aten.permute.default,
        aten._to_copy.default,
        aten.clone.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.alias.default,
        torch.ops.prims.convert_element_type.default,
    }
)
# Ops a router's logits may pass through on their way to top-k.
_ROUTER_PATH_OPS = frozenset(
    {
        aten._softmax.default,
        aten.softmax.int,
        aten.sigmoid.default,
        aten._to_copy.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.add.Tensor,
        aten.mul.Tensor,
        torch.ops.prims.convert_element_type.default,
    }
)


@dataclass
class LinearMatch:
    """One linear the rewrite will replace."""

    node: fx.Node  # the mm / addmm / linear node
    x: fx.Node  # the activation operand
    weight: fx.Node  # the parameter placeholder
    layout: WeightLayout  # "out_in": stored [N, K] like nn.Linear; "in_out": stored [K, N] like Conv1D
    bias: Optional[fx.Node]
    module_path: str
    feeds_top_k: bool = False  # an MoE router: its output picks experts


@dataclass
class SkippedLinear:
    """A linear on a parameter that stays in floating point, and why."""

    node: fx.Node
    weight: Optional[fx.Node]
    module_path: str
    reason: str
    shape: Optional[tuple[int, int]] = None  # (out, in) when the node's own shapes do not say it


@dataclass
class Int8Linear:
    """An ``int8fx::int8_linear`` already in the graph: a layer that was int8 before the backend
    saw it (an ``int8fx.nn.Linear8bitLt``, a model loaded with ``int8fx.Int8fxConfig``)."""

    node: fx.Node
    weight: fx.Node  # the int8 parameter (CB)
    module_path: str
    shape: tuple[int, int]  # (out_features, in_features)


def find_int8_linears(graph: fx.Graph, is_parameter: Callable[[fx.Node], bool]) -> list[Int8Linear]:
    """The int8 linears a graph already holds, for the report: nothing to rewrite there."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or str(node.target) != "int8fx.int8_linear.default":
            continue
        weight, _ = _parameter_behind(node.args[1], is_parameter)
        value = weight.meta.get("val") if weight is not None else None
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            found.append(Int8Linear(node, weight, module_path_of(node), (int(value.shape[0]), int(value.shape[1]))))
    return found


def module_path_of(node: fx.Node) -> str:
    """The calling module's dotted path (``model.layers.0.mlp``), from dynamo's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _module_type = list(stack.values())[-1]
    return normalize_source_path(path)


def _is_transpose_2d(node: fx.Node) -> bool:
    if node.target == aten.t.default:
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _is_dtype_cast(node: fx.Node) -> bool:
    if node.target == aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"}
    return node.target == torch.ops.prims.convert_element_type.default


def trace_weight(operand: fx.Node) -> tuple[fx.Node, bool]:
    """Walks back through transposes and dtype casts; returns ``(source, transposed)``."""
    transposed = False
    node = operand
    while node.op == "call_function" and (_is_transpose_2d(node) or _is_dtype_cast(node)):
        transposed ^= _is_transpose_2d(node)
        node = node.args[0]
    return node, transposed


def _unbroadcast(operand: fx.Node) -> Optional[fx.Node]:
    """For bmm: the 2-D matrix that ``view(expand(w2d, [B, K, N]))`` broadcasts over the batch."""
    node = operand
    while node.op == "call_function" and node.target in _BROADCAST_OPS:
        node = node.args[0]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2:
            return node if tuple(operand.meta["val"].shape[-2:]) == tuple(val.shape) else None
    return None


def linear_operands(node: fx.Node) -> tuple[fx.Node, Optional[fx.Node], Optional[fx.Node], str]:
    """``(x, weight_operand, bias, how)`` where the weight operand is ``[K, N]`` for mm/addmm/bmm.

    For a bmm whose second operand is not a broadcast 2-D matrix, the weight operand is None.
    """
    if node.target == aten.bmm.default:
        return node.args[0], _unbroadcast(node.args[1]), None, "mm"
    if node.target == aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], bias, "linear"
    if node.target == aten.addmm.default:
        return node.args[1], node.args[2], node.args[0], "addmm"
    return node.args[0], node.args[1], None, "mm"


def _dtype_problem(x: fx.Node, weight_operand: fx.Node, bias: Optional[fx.Node]) -> Optional[str]:
    """Eager PyTorch rejects mixed dtypes here; left in fp, the graph raises the same error."""
    dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in (x, weight_operand, bias) if isinstance(n, fx.Node)]
    if not all(dtype is not None and dtype.is_floating_point for dtype in dtypes):
        return "input, weight or bias is not a floating-point tensor"
    if len(set(dtypes)) > 1:
        return f"mixed dtypes {', '.join(str(d) for d in dtypes)} (eager PyTorch rejects them)"
    return None


def _bias_problem(node: fx.Node, bias: Optional[fx.Node], n_features: int) -> Optional[str]:
    if node.target == aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return "addmm with beta/alpha != 1"
    if bias is None:
        return None
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    if not isinstance(val, torch.Tensor) or tuple(val.shape) != (n_features,):
        return f"the added term is not a [{n_features}] bias"
    return None


def find_linears(graph: fx.Graph, is_parameter: Callable[[fx.Node], bool]) -> tuple[list[LinearMatch], list[SkippedLinear]]:
    """All matmuls of ``graph`` with a parameter operand, split into matches and skips."""
    matches: list[LinearMatch] = []
    skipped: list[SkippedLinear] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_OPS:
            continue
        x, weight_operand, bias, how = linear_operands(node)
        if weight_operand is None:
            continue  # a batched matmul of activations (attention)
        weight, transposed = trace_weight(weight_operand)
        x_source, _ = trace_weight(x)
        path = module_path_of(node)
        weight_is_param = weight.op == "placeholder" and is_parameter(weight)
        x_is_param = x_source.op == "placeholder" and is_parameter(x_source)
        if not weight_is_param:
            if x_is_param:
                skipped.append(SkippedLinear(node, x_source, path, "the parameter is the left operand (W @ x), not a linear"))
            continue  # a matmul of activations (attention): not a candidate
        if x_is_param:
            skipped.append(SkippedLinear(node, weight, path, "both operands are parameters"))
            continue
        # mm/addmm take the weight as [K, N]: a transposed parameter is stored [N, K].
        if how == "linear":
            layout: WeightLayout = "in_out" if transposed else "out_in"
        else:
            layout = "out_in" if transposed else "in_out"
        n_features = node.meta["val"].shape[-1] if isinstance(node.meta.get("val"), torch.Tensor) else None
        problem = _dtype_problem(x, weight_operand, bias) or _bias_problem(node, bias, n_features)
        if problem:
            skipped.append(SkippedLinear(node, weight, path, problem))
            continue
        matches.append(LinearMatch(node, x, weight, layout, bias, path, feeds_top_k=_feeds_top_k(node)))
    seen = {item.node for item in matches} | {item.node for item in skipped}
    skipped += _other_weight_products(graph, is_parameter, seen)
    return matches, skipped


def embedding_tables(graph: fx.Graph, is_parameter: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """The parameter placeholders read as embedding tables (``aten.embedding``), through views and casts.

    A linear whose weight is one of these tensors is a tied output head. The backend compares
    tensors, not nodes: dynamo may lift one tied parameter as two graph inputs.
    """
    tables = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default:
            table, _ = _parameter_behind(node.args[0], is_parameter)
            if table is not None:
                tables.append(table)
    return tables


def _feeds_top_k(node: fx.Node, depth: int = 6) -> bool:
    """Whether ``node``'s output reaches ``aten.topk`` through softmax/sigmoid, casts and views."""
    frontier = [node]
    for _ in range(depth):
        users = [user for n in frontier for user in n.users]
        if any(user.target == aten.topk.default for user in users):
            return True
        frontier = [user for user in users if user.target in _ROUTER_PATH_OPS]
    return False


def _parameter_behind(operand, is_parameter: Callable[[fx.Node], bool]) -> tuple[Optional[fx.Node], list[str]]:
    """The parameter placeholder ``operand`` is a view, slice or cast of, and the ops on the way."""
    via = []
    node = operand
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _WEIGHT_PATH_OPS:
        via.append(node.target.__name__.split(".")[0])
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "placeholder" and is_parameter(node):
        return node, via[::-1]
    return None, []


def _is_product(node: fx.Node) -> bool:
    if node.target in _LINEAR_OPS or node.target in _OTHER_MATMUL_OPS:
        return True
    # A library's own op (transformers' grouped_mm_fallback, ...): opaque to the rewrite.
    namespace = getattr(node.target, "namespace", None)
    return namespace is not None and namespace not in ("aten", "prims", "int8fx", "higher_order")


def _other_weight_products(graph: fx.Graph, is_parameter: Callable[[fx.Node], bool], seen: set) -> list[SkippedLinear]:
    """Every product that a >= 2-D parameter reaches and that is neither matched nor skipped yet."""
    skipped = []
    for node in graph.nodes:
        if node.op != "call_function" or node in seen or not _is_product(node):
            continue
        operands = [a for arg in node.args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        for operand in operands:
            weight, via = _parameter_behind(operand, is_parameter)
            value = weight.meta.get("val") if weight is not None else None
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                continue
            skipped.append(
                SkippedLinear(
                    node, weight, module_path_of(node), _unhandled_reason(value, node, via), shape=tuple(int(d) for d in value.shape[-2:])
                )
            )
    return skipped


def _unhandled_reason(value: torch.Tensor, node: fx.Node, via: list[str]) -> str:
    op = str(node.target).replace(".default", "")
    route = f" through {', '.join(via)}" if via else ""
    if value.dim() >= 3:
        return (
            f"MoE experts: the {value.dim()}-D parameter {list(value.shape)} is used by {op}{route}; expert weights are not quantized yet"
        )
    return f"the parameter is used by {op}{route}, a form the rewrite does not handle"
