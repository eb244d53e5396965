"""Small models for the tests: each spells its linears a different way."""

from __future__ import annotations

import copy
import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from examples.toy_models import MLP, LlamaConfig, TinyLlama, TransformerBlock  # noqa: F401  (re-exported for the tests)
from int8fx import reference
from int8fx.paths import matches_skip


class TiedLM(nn.Module):
    """Embedding -> proj -> lm_head, with ``lm_head.weight`` tied to the embedding's."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        return self.lm_head(self.proj(self.embed_tokens(tokens)))


class Conv1D(nn.Module):
    """GPT-2's linear: weight stored ``[in, out]``, applied with ``torch.addmm``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.size(-1),)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Spellings(nn.Module):
    """The same kind of linear written four ways."""

    def __init__(self, dim=16):
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.w = nn.Parameter(torch.randn(dim, dim) / 4)
        self.b = nn.Parameter(torch.randn(dim) / 4)
        self.w_in_out = nn.Parameter(torch.randn(dim, dim) / 4)

    def forward(self, x):
        x = F.linear(x, self.a.weight, self.a.bias)
        x = x @ self.w.T + self.b
        x = torch.matmul(x, self.w_in_out)
        return self.a(x)


class ReferenceLinear(nn.Module):
    """An ``nn.Linear`` computed by ``int8fx.reference`` (the oracle for whole models)."""

    def __init__(self, linear: nn.Linear, threshold: float):
        super().__init__()
        self.weight, self.bias, self.threshold = linear.weight, linear.bias, threshold
        self.CB, self.SCB = reference.quantize_weight(linear.weight.detach())

    def forward(self, x):
        return _ReferenceInt8Linear.apply(x, self.CB, self.SCB, self.bias, self.threshold, self.weight)


class _ReferenceInt8Linear(torch.autograd.Function):
    """The reference forward with SPEC's backward (``dX = dY @ dequant(W)``; rounding has no gradient)."""

    @staticmethod
    def forward(ctx, x, CB, SCB, bias, threshold, weight):
        ctx.save_for_backward(CB, SCB)
        return reference.int8_linear(x, CB, SCB, bias, threshold, weight)

    @staticmethod
    def backward(ctx, grad):
        CB, SCB = ctx.saved_tensors
        return reference.int8_linear_input_grad(grad, CB, SCB), None, None, None, None, None


def reference_int8(model: nn.Module, threshold: float, skip=("lm_head",)) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear``s (outside ``skip``) run the reference LLM.int8()."""
    model = copy.deepcopy(model)
    if isinstance(model, nn.Linear):
        return ReferenceLinear(model, threshold)
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if isinstance(child, nn.Linear) and not matches_skip(full, tuple(skip)):
                setattr(module, name, ReferenceLinear(child, threshold))
    return model


# ---------------------------------------------------------------- MoE references


def experts_forward(linear):
    """A transformers 5.x experts ``forward(hidden_states, top_k_index, top_k_weights)`` computing
    each expert's two products with ``linear(x, w)`` on the tokens routed to it: the per-expert
    ``nn.Linear`` equivalent that int8 experts are tested against."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            gate, up = linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    return forward


def with_reference_linears(model, linear):
    """``model`` with every ``nn.Linear`` but ``lm_head`` and every experts module computed by
    ``linear(x, w)`` (routers and ``lm_head`` stay fp)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            module.forward = functools.partial(linear, w=module.weight)
        if name.endswith("mlp.experts"):
            module.forward = types.MethodType(experts_forward(linear), module)
    return model
