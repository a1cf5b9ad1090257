"""A long-running inference service on Ray Serve: several replicas of one
deployment, each loading the model zero-copy from ONE sealed copy in the
object store (the replicas of a node hold the weights once between them).

Run: python examples/python/serve_deployment.py [--replicas 2] [--port 8000]
It starts Serve on localhost, answers a few requests, prints them and stops.
"""

import argparse
import json
import os
import time
import urllib.request

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from ray import serve
from ray_zerocopy import ActorWrapper
from ray_zerocopy.diagnostics import pss_breakdown
from starlette.requests import Request
from torch import nn


class Classifier(nn.Module):
    def __init__(self, dim=256, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.LayerNorm(4 * dim), nn.Linear(4 * dim, classes))

    def forward(self, x):
        return self.net(x)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class ClassifierService:
    """One replica: loads the model once, zero-copy, then answers requests."""

    def __init__(self, actor_wrapper):
        before = pss_breakdown()
        started = time.perf_counter()
        self.model = actor_wrapper.load()
        after = pss_breakdown()
        self.stats = {
            "pid": os.getpid(),
            "load_ms": (time.perf_counter() - started) * 1e3,
            # Private memory this replica added by loading: the weights are
            # not among it, they stay in the shared object store.
            "private_mib": (after["anon"] - before["anon"]) / 2**20,
        }

    async def __call__(self, request: Request):
        if request.method == "GET":  # what this replica holds
            return self.stats
        body = await request.json()
        with torch.no_grad():
            scores = self.model(torch.tensor(body["inputs"], dtype=torch.float32))
        return {"labels": scores.argmax(-1).tolist(), "pid": os.getpid()}


def build_app(actor_wrapper, replicas: int):
    """The Serve application: ``replicas`` replicas sharing one sealed model."""
    return ClassifierService.options(num_replicas=replicas).bind(actor_wrapper)


def ask(port: int, inputs=None) -> dict:
    """POSTs ``inputs`` to the service (GET, a replica's stats, without)."""
    data = json.dumps({"inputs": inputs}).encode() if inputs is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/classify", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    torch.manual_seed(0)
    model = Classifier().eval()
    actor_wrapper = ActorWrapper(model, device="cpu")  # sealed once
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(actor_wrapper, args.replicas), route_prefix="/classify")
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = model(x).argmax(-1).tolist()
    for _ in range(4):
        answer = ask(args.port, x.tolist())
        assert answer["labels"] == expected, answer
        print(f"replica {answer['pid']}: {answer['labels']}")
    print("a replica's load:", ask(args.port))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
