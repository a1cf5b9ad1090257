"""Demo: batch inference with Ray Data on a local Ray cluster, the model
loaded zero-copy by every actor of the pool, compared with the plain way
(the model passed to each actor as an ordinary object).

Each actor reports how long it took to get its model and how much its memory
grew (PSS of anonymous + shared memory, from before loading to its last
batch). Run: `make demo` (or `python examples/python/ray_data_demo.py
--size-mb 256`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The model's module, importable here and (through the environment Ray's
# workers inherit) in every actor.
_models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, _models)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_models, os.environ.get("PYTHONPATH")) if p)

# Imported after the set-up above, which they rely on: the environment Ray
# and its workers start with, and the path `transformer` is found on.
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transformer  # noqa: E402
from ray.data import ActorPoolStrategy  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402
from ray_zerocopy.diagnostics import pss_breakdown  # noqa: E402


def memory():
    p = pss_breakdown()
    return p["anon"] + p["shmem"]


class Measured:
    """Shared by both ways: time the model's arrival, then report per batch."""

    def __init__(self, get_model):
        torch.set_num_threads(1)
        self.mem0 = memory()
        t = time.perf_counter()
        self.model = get_model()
        self.load_ms = (time.perf_counter() - t) * 1e3

    def __call__(self, batch):
        with torch.no_grad():
            pred = self.model(torch.as_tensor(batch["ids"])).argmax(-1).numpy()
        n = len(pred)
        return {
            "pred": pred,
            "pid": np.full(n, os.getpid()),
            "load_ms": np.full(n, self.load_ms),
            "mem_growth_mb": np.full(n, (memory() - self.mem0) / 2**20),
            "t": np.full(n, time.time()),
        }


class ZeroCopyActor(Measured):
    def __init__(self, actor_wrapper):
        super().__init__(actor_wrapper.load)  # zero-copy, once per actor


class PlainActor(Measured):
    def __init__(self, model_ref):
        super().__init__(lambda: ray.get(model_ref[0]))  # unpickles a private copy


def run(ds, cls, kwargs, actors):
    t = time.perf_counter()
    rows = ds.map_batches(
        cls, fn_constructor_kwargs=kwargs, batch_size=8, compute=ActorPoolStrategy(size=actors), num_cpus=0.5
    ).take_all()
    wall = time.perf_counter() - t
    last = {}
    for r in sorted(rows, key=lambda r: r["t"]):
        last[r["pid"]] = r  # each actor's last batch
    return wall, np.array([r["pred"] for r in rows]), list(last.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    model = transformer.build(args.size_mb)
    print(f"model: {transformer.nbytes(model) / 2**20:.0f} MiB in {len(model.state_dict())} tensors")
    ids = np.random.default_rng(0).integers(0, 8192, size=(args.rows, 8))
    ds = (
        ray.data.from_numpy(ids)
        .map_batches(lambda b: {"ids": b["data"]})
        .repartition(max(1, args.rows // 8))
        .materialize()
    )

    wrapper = ActorWrapper(model, device="cpu")
    zc = run(ds, ZeroCopyActor, {"actor_wrapper": wrapper}, args.actors)
    plain = run(ds, PlainActor, {"model_ref": [ray.put(model)]}, args.actors)
    assert np.array_equal(np.sort(zc[1]), np.sort(plain[1])), "the two ways must predict the same"

    print(f"\n{args.rows} rows, map_batches with ActorPoolStrategy(size={args.actors}) on {os.cpu_count()} cores")
    print("| way | actors | model load per actor (median) | memory growth, all actors | job wall time |")
    print("| --- | --- | --- | --- | --- |")
    for name, (wall, _, last) in (("zero-copy (ActorWrapper)", zc), ("plain (model as argument)", plain)):
        loads = np.median([r["load_ms"] for r in last])
        mem = sum(r["mem_growth_mb"] for r in last)
        print(f"| {name} | {len(last)} | {loads:.1f} ms | {mem:.0f} MiB | {wall:.1f} s |")


if __name__ == "__main__":
    main()
