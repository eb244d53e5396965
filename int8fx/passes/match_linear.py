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
indexing or casts: MoE experts used in a form the rewrite does not handle (``F.linear(x, W[e])``
on one expert's slice, say) are reported, not silently left out.

MoE experts stored as one 3-D parameter ``[E, N, K]`` (transformers 5.x) are matched in the two
forms transformers' compiled expert implementations take (``routing`` says how rows find experts):

* ``grouped_mm``: ``aten._grouped_mm(x, transpose(W, -2, -1), offs)`` (bf16) or
  ``transformers.grouped_mm_fallback(x, transpose(W, -2, -1), offs)`` (other dtypes), rows of
  ``x`` sorted by expert and ``offs[e]`` the end of expert ``e``'s rows;
* ``batched_mm``: ``bmm(index(W, [expert_ids]), unsqueeze(x, -1))``, one expert id per row.

Either way the weight may be stored ``[E, K, N]`` (``is_transposed`` experts: no transpose, or the
operands of ``bmm`` swapped). The ``eager`` implementation's per-expert loop never reaches a graph.

A match whose output picks experts through ``top-k`` (an MoE router, possibly after a softmax
or sigmoid) is marked ``feeds_top_k``: the backend's policy keeps routers in fp by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

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


@dataclass(frozen=True)
class ExpertRouting:
    """How the rows of an MoE experts product find their expert."""

    # "offsets": rows grouped by expert, ``node`` holds each expert's end row (grouped_mm);
    # "expert_ids": ``node`` holds one expert id per row (bmm on ``W[expert_ids]``).
    kind: Literal["offsets", "expert_ids"]
    node: fx.Node
    # bmm's output is ``[rows, N, 1]`` (or ``[rows, 1, N]``): where the size-1 dim goes back.
    unsqueeze_dim: Optional[int] = None


@dataclass
class LinearMatch:
    """One linear the rewrite will replace (or MoE experts: one linear per expert)."""

    node: fx.Node  # the mm / addmm / linear node (experts: grouped_mm or bmm)
    x: fx.Node  # the activation operand
    weight: fx.Node  # the parameter placeholder
    # "out_in": stored [N, K] like nn.Linear (experts: [E, N, K]); "in_out": stored [K, N] like Conv1D
    layout: WeightLayout
    bias: Optional[fx.Node]
    module_path: str
    feeds_top_k: bool = False  # an MoE router: its output picks experts
    routing: Optional[ExpertRouting] = None  # MoE experts (a 3-D weight): how rows find experts

    @property
    def is_experts(self) -> bool:
        return self.routing is not None


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
    saw it (an ``int8fx.nn.Linear8bitLt``, a model loaded with ``int8fx.Int8fxConfig``), or an
    ``int8fx::int8_grouped_linear`` on a 3-D int8 parameter (MoE experts loaded in int8)."""

    node: fx.Node
    weight: fx.Node  # the int8 parameter (CB)
    module_path: str
    shape: tuple[int, int]  # (out_features, in_features); experts: of each expert


# The int8 ops a layer that is already int8 calls, and the dimension of its CB (a parameter).
_INT8_OPS = {"int8fx.int8_linear.default": 2, "int8fx.int8_grouped_linear.default": 3}


def find_int8_linears(graph: fx.Graph, is_parameter: Callable[[fx.Node], bool]) -> list[Int8Linear]:
    """The int8 linears (and int8 experts) a graph already holds, for the report: nothing to rewrite there."""
    found = []
    for node in graph.nodes:
        dim = _INT8_OPS.get(str(node.target)) if node.op == "call_function" else None
        if dim is None:
            continue
        weight, _ = _parameter_behind(node.args[1], is_parameter)
        value = weight.meta.get("val") if weight is not None else None
        if isinstance(value, torch.Tensor) and value.dim() == dim:
            found.append(Int8Linear(node, weight, module_path_of(node), (int(value.shape[-2]), int(value.shape[-1]))))
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
    for node in graph.nodes:
        found = None if node in seen else match_experts(node, is_parameter)
        if found is not None:
            seen.add(node)
            (matches if isinstance(found, LinearMatch) else skipped).append(found)
    skipped += _other_weight_products(graph, is_parameter, seen)
    return matches, skipped


# ---------------------------------------------------------------- MoE experts

_TRANSFORMERS_GROUPED_MM = "transformers.grouped_mm_fallback.default"


def _is_grouped_mm(node: fx.Node) -> bool:
    return str(node.target) in ("aten._grouped_mm.default", _TRANSFORMERS_GROUPED_MM)


def _val(node) -> Optional[torch.Tensor]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_last_two_dims_transpose(node: fx.Node) -> bool:
    value = _val(node.args[0])
    if node.target != aten.transpose.int or value is None:
        return False
    return sorted(d % value.dim() for d in node.args[1:3]) == [value.dim() - 2, value.dim() - 1]


def _trace_expert_weight(operand: fx.Node, is_parameter: Callable[[fx.Node], bool]) -> tuple[Optional[fx.Node], bool]:
    """The 3-D parameter behind ``operand`` through dtype casts and a transpose of its last two
    dims, and whether it was transposed; ``(None, False)`` when there is none."""
    node, transposed = operand, False
    while isinstance(node, fx.Node) and node.op == "call_function" and (_is_last_two_dims_transpose(node) or _is_dtype_cast(node)):
        transposed ^= _is_last_two_dims_transpose(node)
        node = node.args[0]
    value = _val(node)
    if isinstance(node, fx.Node) and node.op == "placeholder" and is_parameter(node) and value is not None and value.dim() == 3:
        return node, transposed
    return None, False


def _is_index_vector(value: Optional[torch.Tensor]) -> bool:
    """A 1-D int32/int64 tensor (expert ids or offsets): ``index`` reads bool and uint8 ones as masks."""
    return value is not None and value.dim() == 1 and value.dtype in (torch.int32, torch.int64)


def _argument(node: fx.Node, position: int, name: str):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def experts_input(node: fx.Node) -> fx.Node:
    """The 2-D activation of an experts product matched by ``match_experts`` (read from the node,
    so that it is current after earlier rewrites)."""
    if node.target == aten.bmm.default:
        left, right = node.args[:2]
        unsqueezed = right if left.target == aten.index.Tensor else left
        return unsqueezed.args[0]
    return node.args[0]


def match_experts(node: fx.Node, is_parameter: Callable[[fx.Node], bool]) -> "LinearMatch | SkippedLinear | None":
    """``node`` as MoE experts (a 3-D parameter ``[E, N, K]`` applied per row's expert): a match,
    a skip (mixed dtypes), or None when it is not an experts product the rewrite handles."""
    if node.op != "call_function":
        return None
    if _is_grouped_mm(node):
        match = _match_grouped_mm(node, is_parameter)
        weight_operand = node.args[1]
    elif node.target == aten.bmm.default:
        match = _match_indexed_bmm(node, is_parameter)
        weight_operand = node.args[0] if node.args[0].target == aten.index.Tensor else node.args[1]
    else:
        return None
    if match is None:
        return None
    problem = _dtype_problem(match.x, weight_operand, None)
    if problem:
        return SkippedLinear(node, match.weight, match.module_path, problem, shape=expert_shape(match))
    return match


def _match_grouped_mm(node: fx.Node, is_parameter: Callable[[fx.Node], bool]) -> Optional[LinearMatch]:
    """``grouped_mm(x [M, K], W' [E, K, N], offs [E])``: rows ``offs[e-1]:offs[e]`` through ``W'[e]``."""
    x, weight_operand, offsets = node.args[0], node.args[1], _argument(node, 2, "offs")
    if str(node.target) != _TRANSFORMERS_GROUPED_MM and (
        _argument(node, 3, "bias") is not None or _argument(node, 4, "out_dtype") is not None
    ):
        return None  # a fused bias or another output dtype: not the experts form transformers uses
    x_val, offsets_val = _val(x), _val(offsets)
    if x_val is None or x_val.dim() != 2 or not _is_index_vector(offsets_val):
        return None
    weight, transposed = _trace_expert_weight(weight_operand, is_parameter)
    if weight is None or not statically_known_true(offsets_val.shape[0] == _val(weight).shape[0]):
        return None
    # grouped_mm takes each expert's weight as [K, N]: a transposed parameter is stored [E, N, K].
    layout: WeightLayout = "out_in" if transposed else "in_out"
    return LinearMatch(node, x, weight, layout, None, module_path_of(node), routing=ExpertRouting("offsets", offsets))


def _gathered_expert_weight(operand: fx.Node, is_parameter: Callable[[fx.Node], bool]) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """For ``index(W, [expert_ids])`` (``W`` a 3-D parameter, maybe cast): ``(W, expert_ids)``."""
    if not isinstance(operand, fx.Node) or operand.target != aten.index.Tensor:
        return None, None
    indices = operand.args[1]
    if len(indices) != 1 or not _is_index_vector(_val(indices[0])):
        return None, None  # a boolean mask or several indices: not one expert per row
    weight, transposed = _trace_expert_weight(operand.args[0], is_parameter)
    if weight is None or transposed:
        return None, None
    return weight, indices[0]


def _unsqueezed_2d(operand: fx.Node, dim: int) -> bool:
    """Whether ``operand`` is ``unsqueeze(x2d, dim)`` (``dim`` of the 3-D result)."""
    if not isinstance(operand, fx.Node) or operand.target != aten.unsqueeze.default:
        return False
    x_val = _val(operand.args[0])
    return x_val is not None and x_val.dim() == 2 and operand.args[1] % 3 == dim


def _match_indexed_bmm(node: fx.Node, is_parameter: Callable[[fx.Node], bool]) -> Optional[LinearMatch]:
    """``bmm(W[ids], unsqueeze(x, -1))`` (W stored ``[E, N, K]``) or ``bmm(unsqueeze(x, 1), W[ids])``
    (W stored ``[E, K, N]``): one matrix-vector product per row, with its expert's weight."""
    left, right = node.args[:2]
    weight, expert_ids = _gathered_expert_weight(left, is_parameter)
    if weight is not None and _unsqueezed_2d(right, 2):
        layout: WeightLayout = "out_in"
        x, unsqueeze_dim = right.args[0], 2
    else:
        weight, expert_ids = _gathered_expert_weight(right, is_parameter)
        if weight is None or not _unsqueezed_2d(left, 1):
            return None
        layout, x, unsqueeze_dim = "in_out", left.args[0], 1
    if not statically_known_true(_val(expert_ids).shape[0] == _val(x).shape[0]):
        return None
    routing = ExpertRouting("expert_ids", expert_ids, unsqueeze_dim)
    return LinearMatch(node, x, weight, layout, None, module_path_of(node), routing=routing)


def expert_shape(match: LinearMatch) -> tuple[int, int]:
    """``(out_features, in_features)`` of each expert."""
    a, b = (int(d) for d in match.weight.meta["val"].shape[-2:])
    return (a, b) if match.layout == "out_in" else (b, a)


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
            f"MoE experts: the {value.dim()}-D parameter {list(value.shape)} is used by {op}{route}, not a form the experts "
            "rewrite handles (grouped_mm of 2-D rows with offsets, or bmm of W[expert_ids] and one row per expert)"
        )
    return f"the parameter is used by {op}{route}, a form the rewrite does not handle"
