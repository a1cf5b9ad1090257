"""A transformer-like torch model for benchmarks and the demo: an embedding,
``layers`` pre-norm blocks (attention + MLP, 12 tensors each) and a final
norm. Sizes are chosen to hit a target number of bytes in about 300 tensors."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.heads = max(1, d // 64)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, s, self.heads, d // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TransformerLike(nn.Module):
    def __init__(self, d: int, layers: int, vocab: int = 8192, classes: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x).mean(1))


def build(target_mb: float, layers: int = 24, seed: int = 0) -> TransformerLike:
    """A model of about ``target_mb`` MiB of fp32 weights in 12 * layers + 5 tensors."""
    torch.manual_seed(seed)
    vocab = 8192
    # bytes ~= 4 * (layers * 12 d^2 + vocab * d)
    per = target_mb * 2**20 / 4
    d = (-vocab + math.sqrt(vocab * vocab + 48 * layers * per)) / (24 * layers)
    d = max(64, int(round(d / 64)) * 64)
    with torch.no_grad():
        return TransformerLike(d, layers, vocab).eval()


def nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
