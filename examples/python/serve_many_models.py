"""Many models on Ray Serve, loaded on demand: model multiplexing over sealed
weights. Each model is sealed once; a replica loads a model the first time a
request names it (``serve_multiplexed_model_id``), in milliseconds and
zero-copy, and Serve evicts the least recently used one past
``max_num_models_per_replica``. Every replica of a node that loads a model
maps the same sealed copy, so K models on R replicas cost about K models of
memory, not K x R; an evicted model only unmaps that replica's view.

Run: python examples/python/serve_many_models.py [--models 3] [--replicas 2] [--port 8000]
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


def make_model(seed: int, dim: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 10)).eval()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ManyModels:
    """One replica: ``wrappers`` maps a model id to its sealed weights (the
    wrappers are small: a reference and a skeleton each)."""

    def __init__(self, wrappers: dict):
        self.wrappers = wrappers
        self.pid = os.getpid()
        self.loads = []  # (model id, milliseconds) of every load, evictions show as reloads
        self.anon_before = pss_breakdown()["anon"]

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        started = time.perf_counter()
        model = self.wrappers[model_id].load()  # zero-copy: milliseconds
        self.loads.append((model_id, (time.perf_counter() - started) * 1e3))
        return model

    async def __call__(self, request: Request):
        if request.method == "GET":  # what this replica did
            anon = pss_breakdown()["anon"] - self.anon_before
            return {"pid": self.pid, "loads": self.loads, "private_mib": anon / 2**20}
        model = await self.get_model(serve.get_multiplexed_model_id())
        with torch.no_grad():
            scores = model(torch.tensor((await request.json())["inputs"]))
        return {"scores": scores.tolist(), "pid": self.pid}


def build_app(wrappers: dict, replicas: int):
    return ManyModels.options(num_replicas=replicas).bind(wrappers)


def ask(port: int, model_id: str | None, inputs=None) -> dict:
    """POSTs ``inputs`` to the model ``model_id``; GET (a replica's record)
    without inputs."""
    data = json.dumps({"inputs": inputs}).encode() if inputs is not None else None
    headers = {"Content-Type": "application/json"}
    if model_id is not None:
        headers["serve_multiplexed_model_id"] = model_id
    req = urllib.request.Request(f"http://127.0.0.1:{port}/models", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    models = {f"model-{i}": make_model(i) for i in range(args.models)}
    wrappers = {model_id: ActorWrapper(m) for model_id, m in models.items()}  # each sealed once
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(wrappers, args.replicas), route_prefix="/models")
    x = torch.randn(2, 256)
    for round_ in range(3):
        for model_id, m in models.items():
            with torch.no_grad():
                expected = m(x).tolist()
            answer = ask(args.port, model_id, x.tolist())
            assert answer["scores"] == expected, model_id  # the same weights: the same numbers
            print(f"round {round_}: {model_id} answered by replica {answer['pid']}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
