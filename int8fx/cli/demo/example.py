"""A tiny built-in language model for ``python -m int8fx explain``: every case the backend meets, in 2 blocks.

* ``nn.Linear`` with and without bias (``qkv``, ``out``, ``down``): replaced by int8;
* a weight stored ``[in, out]`` and used as ``x @ W`` (GPT-2's ``Conv1D``, here ``up``):
  replaced too;
* attention's ``q @ k^T`` and ``p @ v``: matmuls of activations, not linears;
* an ``lm_head`` tied to the embedding: kept in floating point by the default ``skip``;
* one embedding feature scaled up, so the normalized inputs of the layers have an outlier
  column, as real transformers do.

Weights come from a private generator: building the model does not touch the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
WIDTH = 64
OUTLIER_FEATURE = 7  # this embedding feature is scaled so its |x| passes threshold 6
OUTLIER_SCALE = 40.0


class ExampleBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.up = nn.Parameter(torch.empty(width, 4 * width))  # [in, out], used as x @ up
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        q, k, v = self.qkv(F.rms_norm(x, (width,))).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width), dim=-1)
        x = x + self.out(weights @ v)
        return x + self.down(F.gelu(F.rms_norm(x, (width,)) @ self.up))


class ExampleModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(ExampleBlock(WIDTH) for _ in range(2))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in SmolLM2 and GPT-2
        self._init(seed)

    @torch.no_grad()
    def _init(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            std = 1.0 if name == "embed.weight" else 1 / math.sqrt(WIDTH)
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        self.embed.weight[:, OUTLIER_FEATURE] *= OUTLIER_SCALE

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def example_inputs(seed: int = 0, batch: int = 2, tokens: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))
