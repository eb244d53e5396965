"""Small models built from a config, for the examples and the tests.

``TinyLlama`` is Llama-shaped (RMSNorm, attention with explicit ``Q @ K^T`` and ``P @ V``,
SwiGLU MLP, tied ``lm_head``) with random weights and optional planted outlier features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=32, d_hidden=64, d_out=16):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``Q @ K^T`` and ``P @ V`` matmuls."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        head_dim = d // self.heads

        def split(y):
            # -1 heads, not self.heads: under tensor parallelism a rank holds only its heads.
            return y.view(b, t, -1, head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim=32, heads=4, hidden=64):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 64
    heads: int = 4
    hidden: int = 128
    layers: int = 2
    tie_embeddings: bool = True
    outlier_dims: tuple[int, ...] = ()  # hidden dims whose norm weights are planted large
    outlier_scale: float = 30.0


class TinyLlama(nn.Module):
    """A Llama-shaped causal LM built from a config, with optional planted outlier features."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config.dim, config.heads, config.hidden) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._plant_outliers()

    def _plant_outliers(self):
        # As in large LLMs, a few hidden dimensions carry large magnitudes into every
        # projection: the norm weights of those dims scale them up (|x| ~ 20-60 and more).
        with torch.no_grad():
            for layer in self.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[list(self.config.outlier_dims)] = self.config.outlier_scale

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
