"""TaskWrapper: call a pipeline as if it were local; each call runs in a Ray
task that loads the pipeline zero-copy (a worker reuses what it loaded).

Run: python examples/python/task_wrapper.py
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from ray_zerocopy import TaskWrapper
from torch import nn


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(1000, 32)
        self.head = nn.Linear(32, 2)

    def encode(self, ids):
        return self.emb(ids)

    def forward(self, ids):
        return self.head(self.encode(ids))


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    model = Embedder().eval()
    wrapped = TaskWrapper(model, device="cpu", num_cpus=1)
    ids = torch.randint(0, 1000, (4, 6))
    with torch.no_grad():
        assert torch.equal(wrapped(ids), model(ids))
        assert torch.equal(wrapped.encode(ids), model.encode(ids))
    refs = [wrapped.remote("forward", ids) for _ in range(4)]  # concurrent calls
    print("task results:", [tuple(r.shape) for r in ray.get(refs)])


if __name__ == "__main__":
    main()
