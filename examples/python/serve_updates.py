"""A service whose model is updated without restarting it, and whose weights
outlive the script that deployed it.

- The weights are sealed with an ``Owner``: a detached actor owns them, so
  the service keeps its weights after this script exits, and a replica that
  restarts later loads them again.
- Each replica follows the newest version published under a name
  (``Subscription``): ``publish`` of a new version reaches every replica in
  milliseconds, with no failed request and no request that mixes versions.
- A new version made by ``wrapper.update(...)`` stores only the tensors that
  changed; the rest stay in the base version's object.

Run: python examples/python/serve_updates.py [--port 8000]
"""

import argparse
import json
import os
import time
import urllib.request

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import ray_zerocopy as rzc
import torch
from ray import serve
from starlette.requests import Request
from torch import nn


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Service:
    def __init__(self, name: str):
        self.models = rzc.Subscription(name)  # loads the newest version, follows new ones

    async def __call__(self, request: Request):
        v = self.models.current()  # one version for the whole request
        with torch.no_grad():
            y = v.pipeline(torch.tensor((await request.json())["x"]))
        return {"version": v.number, "y": y.tolist()}


def ask(port: int, x) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=json.dumps({"x": x}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 10)).eval()

    owner = rzc.Owner("my-service")                    # owns the sealed weights
    v1 = rzc.ActorWrapper(model, owner=owner)
    rzc.publish("my-model", v1)                        # version 1
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Service.options(num_replicas=2).bind("my-model"), route_prefix="/predict")
    x = torch.randn(2, 256)
    print("before:", ask(args.port, x.tolist())["version"])

    # Fine-tune the last layer; the new version stores only what changed.
    with torch.no_grad():
        model[2].weight.mul_(1.01)
    v2 = v1.update(model)
    print(f"version 2 stores {v2.nbytes / 2**20:.2f} MiB of {v2.total_nbytes / 2**20:.2f} MiB")
    rzc.publish("my-model", v2)
    with torch.no_grad():
        expected = model(x).tolist()
    deadline = time.monotonic() + 60
    while (answer := ask(args.port, x.tolist()))["version"] != 2:
        assert time.monotonic() < deadline, "the replicas did not move to version 2"
        time.sleep(0.05)
    assert answer["y"] == expected
    print("after:", answer["version"])

    serve.shutdown()
    owner.close()                                      # frees the weights
    ray.shutdown()


if __name__ == "__main__":
    main()
