"""Small real models used by the tests (importable by Ray workers: the test
directory is on their path through the runtime environment)."""

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.norm = nn.BatchNorm1d(dim)  # running stats: persistent buffers
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, ids):
        h = self.block(self.emb(ids)).mean(1)
        return self.norm(h) * self.scale


class Decoder(nn.Module):
    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.proj = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False)
        self.proj.weight = emb.weight  # tied to the encoder's embedding

    def forward(self, h):
        return self.proj(h)


class Pipeline:
    """Encoder + decoder held by a plain object, with pre/post-processing
    state that is not a module."""

    def __init__(self):
        torch.manual_seed(0)
        self.encoder = Encoder()
        self.decoder = Decoder(self.encoder.emb)
        self.heads = {"extra": [nn.Linear(32, 4)]}
        self.config = {"top_k": 3, "labels": ["a", "b"]}
        self.encoder.eval()

    def whoami(self):
        """(process id, object id): tells which loaded copy served a call."""
        import os

        return os.getpid(), id(self)

    def encode(self, ids):
        return self.encoder(ids)

    def __call__(self, ids):
        h = self.encoder(ids)
        return self.decoder(h) + self.heads["extra"][0](h).sum(-1, keepdim=True)


def ids(n=8, seq=5, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)
