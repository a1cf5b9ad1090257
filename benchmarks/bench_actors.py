"""Load time and memory of N Ray actors serving one model, three ways, in one
run on a real local Ray cluster:

- zero-copy: ``ActorWrapper(model).load()`` (default path, with
  ``use_fast_load=True``, and without the write guard);
- plain: the model passed to each actor as a normal Ray object (``ray.get``
  unpickles a private copy in every actor);
- pure-Python: numpy arrays in the object store, ``torch.as_tensor`` per
  parameter into a weightless (meta) copy of the model.

Actors start first; once all are up they load at the same moment (loads
compete with each other for the cores, not with process start-up). Memory is
the growth of each actor's PSS (``/proc/<pid>/smaps_rollup``) from just
before loading to after one forward pass, read when every actor is done, and
summed over actors: shared pages count once in total. Two figures: all PSS,
and the part backed by anonymous and shared memory (``Pss_Anon +
Pss_Shmem``): where weights live, whether copied or shared. The rest is
file-backed (shared libraries such as libtorch); its per-process share moves
as other processes start and exit, which is noise for this comparison.
Then a Ray Data ``map_batches`` job (ActorPoolStrategy) end to end, zero-copy
vs plain.

    python benchmarks/bench_actors.py            # 1 GiB model, 4 actors
    python benchmarks/bench_actors.py --size-mb 256 --rows 64

Prints a table and writes bench-results/actors.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)  # for Ray's workers

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transformer  # noqa: E402
from ray.data import ActorPoolStrategy  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402
from ray_zerocopy.diagnostics import pss_breakdown  # noqa: E402

SEQ = 8


def sample_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8192, size=(n, SEQ), dtype=np.int64)


def load_model(way: str, payload):
    """What each way does in an actor to get a usable model."""
    if way.startswith("zero-copy"):
        return payload.load()
    if way == "plain":
        return ray.get(payload[0])  # a private, unpickled copy
    if way == "pure-python":
        skeleton, ref = payload
        arrays = ray.get(ref)  # zero-copy numpy views of the object store
        model = copy.deepcopy(skeleton)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about read-only numpy arrays
            state = {k: torch.as_tensor(v) for k, v in arrays.items()}
        model.load_state_dict(state, assign=True)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
    raise ValueError(way)


@ray.remote(num_cpus=0.5)
class Probe:
    """Started (and torch imported) first; told to load once every actor of
    the round is up, so that loads compete with each other, as in a real
    pool, but not with process start-up."""

    def __init__(self):
        torch.set_num_threads(1)

    def ready(self):
        return os.getpid()

    def load(self, way, payload, ids):
        self.pss0 = pss_breakdown()
        t = time.perf_counter()
        self.model = load_model(way, payload)
        self.load_s = time.perf_counter() - t
        with torch.no_grad():
            self.model(torch.as_tensor(ids))

    def report(self):
        now = pss_breakdown()
        grow = {k: now[k] - self.pss0[k] for k in now}
        return {"load_s": self.load_s, "pss_growth": grow["total"], "mem_growth": grow["anon"] + grow["shmem"]}


def _round(way: str, payload, actors: int, together: bool) -> list:
    ids = sample_ids(2)
    probes = [Probe.remote() for _ in range(actors)]
    ray.get([p.ready.remote() for p in probes])
    if together:
        ray.get([p.load.remote(way, payload, ids) for p in probes])
    else:
        for p in probes:
            ray.get(p.load.remote(way, payload, ids))
    reports = ray.get([p.report.remote() for p in probes])  # every actor is loaded
    for p in probes:
        ray.kill(p)
    time.sleep(1.0)
    return reports


def measure(way: str, payload, actors: int) -> dict:
    """Two rounds of fresh actors: all loading at once (memory is read in
    this round), then one after the other."""
    together = _round(way, payload, actors, together=True)
    alone = [r["load_s"] for r in _round(way, payload, actors, together=False)]
    loads = [r["load_s"] for r in together]
    return {
        "load_ms_median": statistics.median(loads) * 1e3,
        "load_ms_all": [x * 1e3 for x in loads],
        "load_alone_ms_median": statistics.median(alone) * 1e3,
        "load_alone_ms_all": [x * 1e3 for x in alone],
        "pss_growth_sum_mb": sum(r["pss_growth"] for r in together) / 2**20,
        "anon_shmem_growth_sum_mb": sum(r["mem_growth"] for r in together) / 2**20,
    }


class ZeroCopyInference:
    def __init__(self, actor_wrapper):
        torch.set_num_threads(1)
        self.model = actor_wrapper.load()

    def __call__(self, batch):
        with torch.no_grad():
            return {"pred": self.model(torch.as_tensor(batch["ids"])).argmax(-1).numpy()}


class PlainInference:
    def __init__(self, model):
        torch.set_num_threads(1)
        self.model = model

    def __call__(self, batch):
        with torch.no_grad():
            return {"pred": self.model(torch.as_tensor(batch["ids"])).argmax(-1).numpy()}


def ray_data_job(cls, kwargs, rows: int, actors: int) -> tuple[float, np.ndarray]:
    ds = ray.data.from_numpy(sample_ids(rows, seed=1)).map_batches(lambda b: {"ids": b["data"]})
    ds = ds.repartition(max(1, rows // 32)).materialize()  # a fixed dataset: only the inference is timed
    t = time.perf_counter()
    out = ds.map_batches(
        cls, fn_constructor_kwargs=kwargs, batch_size=32, compute=ActorPoolStrategy(size=actors), num_cpus=0.5
    ).take_all()
    return time.perf_counter() - t, np.array([r["pred"] for r in out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--rows", type=int, default=128, help="rows in the Ray Data job (0 to skip it)")
    ap.add_argument("--out", default="bench-results/actors.json")
    args = ap.parse_args()

    model = transformer.build(args.size_mb)
    size = transformer.nbytes(model)
    # Room for one way's objects at a time plus the Ray Data job's: nothing
    # is spilled, so every way is measured on objects in shared memory.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=int(3 * size + 2**30))
    n_tensors = len(model.state_dict())
    print(f"model: {size / 2**20:.0f} MiB fp32 in {n_tensors} tensors; {args.actors} actors on {os.cpu_count()} cores")

    t = time.perf_counter()
    wrapper = ActorWrapper(model, device="cpu")
    wrap_s = time.perf_counter() - t
    wrapper_bytes = len(ray.cloudpickle.dumps(wrapper))

    skeleton = copy.deepcopy(model).to("meta")
    # Each way's object is made just before it is measured and dropped after.
    ways = {
        "zero-copy": lambda: ActorWrapper(model, device="cpu"),
        "zero-copy (use_fast_load)": lambda: ActorWrapper(model, device="cpu", use_fast_load=True),
        "zero-copy (write_protect=False)": lambda: ActorWrapper(model, device="cpu", write_protect=False),
        "plain": lambda: [ray.put(model)],
        "pure-python": lambda: (skeleton, ray.put({k: v.numpy() for k, v in model.state_dict().items()})),
    }
    results = {}
    for way, make in ways.items():
        payload = make()
        results[way] = measure(way, payload, args.actors)
        del payload
        gc.collect()
        time.sleep(1.0)

    e2e = {}
    if args.rows:
        zc_s, zc_pred = ray_data_job(ZeroCopyInference, {"actor_wrapper": wrapper}, args.rows, args.actors)
        plain_s, plain_pred = ray_data_job(PlainInference, {"model": model}, args.rows, args.actors)
        assert np.array_equal(np.sort(zc_pred), np.sort(plain_pred)), "zero-copy and plain predictions differ"
        e2e = {"zero_copy_s": zc_s, "plain_s": plain_s, "ratio": zc_s / plain_s, "rows": args.rows}

    plain = results["plain"]
    print(f"wrap (pack + seal) {wrap_s:.2f} s; the wrapper pickles to {wrapper_bytes} bytes\n")
    print(
        "| way | load per actor, all at once (median) | vs plain | load, one at a time (median) | vs plain "
        "| PSS growth, anon+shmem (sum) | vs plain | PSS growth, all (sum) | vs plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for way, r in results.items():
        print(
            f"| {way} | {r['load_ms_median']:.2f} ms | {plain['load_ms_median'] / r['load_ms_median']:.0f}x faster | "
            f"{r['load_alone_ms_median']:.2f} ms | "
            f"{plain['load_alone_ms_median'] / r['load_alone_ms_median']:.0f}x faster | "
            f"{r['anon_shmem_growth_sum_mb']:.0f} MiB | "
            f"{r['anon_shmem_growth_sum_mb'] / plain['anon_shmem_growth_sum_mb']:.2f} | "
            f"{r['pss_growth_sum_mb']:.0f} MiB | {r['pss_growth_sum_mb'] / plain['pss_growth_sum_mb']:.2f} |"
        )
    if e2e:
        print(
            f"\nRay Data map_batches, {args.rows} rows, ActorPoolStrategy(size={args.actors}): "
            f"zero-copy {e2e['zero_copy_s']:.1f} s, plain {e2e['plain_s']:.1f} s (ratio {e2e['ratio']:.2f})"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "model_bytes": size,
                "tensors": n_tensors,
                "actors": args.actors,
                "cores": os.cpu_count(),
                "wrap_s": wrap_s,
                "wrapper_pickled_bytes": wrapper_bytes,
                "ways": results,
                "ray_data": e2e,
            },
            f,
            indent=2,
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
