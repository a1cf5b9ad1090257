"""First load of a model in a fresh Ray actor, four ways, in one run:

  ours_on    ray_zerocopy.ActorWrapper(model) (write guard on, the default); wrapper.load() in the actor
  ours_off   the same sealed object with write_protect=False
  peer       ray-zerocopy 0.2.0 from PyPI: ModelWrapper.from_model(model, mode="actor"); wrapper.load()
  ray_flag   Ray's RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1: ray.put(model); ray.get(ref) in the actor

    python benchmarks/bench_load.py [--tensors 400,20000] [--flat 20000] [--actors 8] [--out bench-results/load.json]

The models, one per ``--tensors`` count (default 400 and 20,000, in one run):
blocks of two nn.Linear(d, d) and an nn.LayerNorm(d), plus an nn.Linear(d,
16) head, 6 fp32 tensors per block. Their width d is the largest power of two
up to 1024 that keeps the model within about 512 MiB: 400 tensors are 66
blocks of d = 1024 (530 MiB), 20,000 tensors 3,333 blocks of d = 128 (the
shape of a mixture-of-experts model: many small tensors). Each is built in
this process; per tensor figures (us) divide a load by the tensor count.

Each load runs in a new actor, one actor at a time: the actor is created and
made ready (its __init__ imports torch and the package; the wrapper argument
is unpickled before the load method runs, as Ray does for any argument), then
only the load call is timed with time.perf_counter inside the actor, then the
actor is killed and its process waited for (tearing down a process that
mapped the model must not overlap the next load). The ways take turns round by round (the order rotates), so
drift hits all of them equally. A second load in the same actor is timed as
well ("warm"). Every loaded model is checked: its output on a fixed input
matches the original, and the pages of its parameters lie in Ray's shared
memory (zero-copy), not in the actor's private memory.

The peer package has the same import name (``ray_zerocopy``) as ours, so it
is installed with ``pip install --no-deps --target bench-results/peer-site``
(done here if missing) and only ever imported in Ray workers whose
PYTHONPATH starts with that directory: its driver-side sealing runs in a
helper actor (which owns the objects it puts), and its wrapper travels to the
loading actors as an object reference this process never unpickles. Ray's
flag is likewise set only in a helper actor that puts the model and in the
loading actors of that way (it is read when a worker starts).

Then ``--flat`` (default 20,000): pipelines that are a plain dict of that
many 1,024-element fp32 arrays, one per framework (torch, numpy, JAX), with
no modules to rebuild: what a load costs per tensor itself. Each is loaded
in fresh actors the same way, ours (write guard on) beside a plain
``ray.get`` of the same dict put by Ray (numpy arrays come back zero-copy
that way; torch tensors and JAX arrays are copied). Every load is checked:
values, type, and (ours) every array's memory in Ray's shared memory.

Prints medians (min, max) per way, each way's ratio to the peer, and the
median time Python's garbage collector ran inside the timed load (a
collection that falls into a load is part of that load's cost); writes JSON
to --out.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

PEER_VERSION = "0.2.0"
WAYS = ("ours_on", "ours_off", "peer", "ray_flag")
FLAG = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
_here = os.path.dirname(os.path.abspath(__file__))


# -- the model (module level: workers import this module to unpickle it) ----
class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self, d: int = 1024, blocks: int = 64, classes: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def shape_for(tensors: int) -> tuple[int, int]:
    """``(d, blocks)`` of a model with about ``tensors`` tensors (6 per
    block, 2 in the head) within about 512 MiB."""
    blocks = max(1, round((tensors - 2) / 6))
    d = 1024
    while d > 16 and blocks * 2 * d * d * 4 > 560 * 2**20:
        d //= 2
    return d, blocks


def build(tensors: int = 386, seed: int = 0) -> Net:
    d, blocks = shape_for(tensors)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = Net(d, blocks)
        for p in model.parameters():  # LayerNorm starts at 1/0: give every tensor distinct values
            p.normal_(0, 0.02)
    return model.eval()


def probe_input(d: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, d, generator=g)


def nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- in the actors --------------------------------------------------------
def _private_kib() -> int:
    """Private (unshared) memory of this process, from smaps_rollup."""
    out = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out += int(line.split()[1])
    return out


def _mappings():
    # Read here, not with ray_zerocopy.diagnostics: this runs in workers that
    # import the peer package, which has the same import name.
    starts, rows = [], []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            starts.append(lo)
            rows.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return starts, rows


def _where(model) -> dict:
    """For every parameter: the mapping its data lies in (path, perms)."""
    starts, rows = _mappings()
    paths, perms = {}, {}
    for p in model.parameters():
        ptr = p.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        lo, hi, perm, path = rows[i] if i >= 0 else (0, 0, "?", "?")
        if not lo <= ptr < hi:
            path, perm = "?", "?"
        key = path or "[anon]"
        paths[key] = paths.get(key, 0) + 1
        perms[perm] = perms.get(perm, 0) + 1
    return {"mappings": paths, "perms": perms}


class Loader:
    """One per load; ``way`` says which package/flags this worker has."""

    def __init__(self, way: str):
        import torch  # noqa: F401

        self.way = way
        self.pkg_file = None
        if way != "ray_flag":
            import ray_zerocopy

            self.pkg_file = ray_zerocopy.__file__

    def ready(self) -> dict:
        from ray._private import ray_constants

        self.private_kib = _private_kib()  # read here, not next to the timed load
        flag = bool(ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS)
        return {"pid": os.getpid(), "pkg_file": self.pkg_file, "flag": flag}

    @staticmethod
    def _timed(fn):
        """Runs ``fn``; returns its result, the ms it took, and the ms that
        Python's cyclic garbage collector ran inside it (and in which
        generations): a collection that falls into a load is part of it."""
        events = []

        def on_gc(phase, info):
            events.append((time.perf_counter(), info["generation"]))

        gc.callbacks.append(on_gc)
        try:
            t = time.perf_counter()
            model = fn()
            ms = (time.perf_counter() - t) * 1e3
        finally:
            gc.callbacks.remove(on_gc)
        gc_ms = sum((b[0] - a[0]) * 1e3 for a, b in zip(events[::2], events[1::2], strict=False))
        return model, ms, {"ms": gc_ms, "generations": [g for _, g in events[::2]]}

    def load(self, wrapper) -> dict:
        """ours_*, peer: ``wrapper`` arrives unpickled; ray_flag: ``[ref]``."""
        if self.way == "ray_flag":
            import ray

            ref = wrapper[0]
            fn = lambda: ray.get(ref)  # noqa: E731
        else:
            fn = wrapper.load
        self.model, ms, gc_info = self._timed(fn)
        grew = _private_kib() - self.private_kib
        self.model2, warm_ms, warm_gc = self._timed(fn)  # a second load, the first still alive
        return {"ms": ms, "gc": gc_info, "warm_ms": warm_ms, "warm_gc": warm_gc, "private_growth_kib": grew}

    def check(self, expected) -> dict:
        with torch.no_grad():
            out = self.model(probe_input(self.model.head.in_features))
        where = _where(self.model)
        return {
            "output_matches": bool(torch.allclose(out, expected, rtol=1e-5, atol=1e-6)),
            "params": sum(1 for _ in self.model.parameters()),
            "training": any(m.training for m in self.model.modules()),
            **where,
        }


def flat_pipeline(framework: str, count: int) -> dict:
    """``{name: array}`` of ``count`` 1,024-element fp32 arrays of
    ``framework``, array ``i`` filled with ``i`` (checked after a load)."""
    import numpy as np

    base = np.arange(1024, dtype=np.float32) / 1024
    arrays = {f"expert.{i}": base + i for i in range(count)}
    if framework == "torch":
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
    if framework == "jax":
        import jax.numpy as jnp

        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return arrays


def _address(a) -> int:
    if hasattr(a, "data_ptr"):
        return a.data_ptr()
    if hasattr(a, "unsafe_buffer_pointer"):
        return a.unsafe_buffer_pointer()
    return a.ctypes.data


class FlatLoader:
    """One per load of a flat pipeline: ``ours`` (wrapper.load()) or
    ``ray`` (ray.get of the plain dict, given as ``[ref]``)."""

    def __init__(self, framework: str):
        import numpy  # noqa: F401

        if framework == "jax":
            import jax  # noqa: F401
        import ray_zerocopy  # noqa: F401

        self.framework = framework

    def ready(self) -> int:
        return os.getpid()

    def load(self, way: str, wrapper) -> dict:
        import ray

        fn = wrapper.load if way == "ours" else (lambda: ray.get(wrapper[0]))
        self.pipeline, ms, gc_info = Loader._timed(fn)
        values = self.pipeline
        first, last = values["expert.0"], values[f"expert.{len(values) - 1}"]
        starts, rows = _mappings()
        shared = 0
        for a in values.values():
            i = bisect.bisect_right(starts, _address(a)) - 1
            shared += i >= 0 and ("/dev/shm" in rows[i][3] or "plasma" in rows[i][3])
        values_ok = float(first[1]) == 1 / 1024 and float(last[0]) == len(values) - 1
        kind = f"{type(first).__module__}.{type(first).__name__}"
        # A second load in the same process: what the first paid once per
        # process (JAX starting its CPU backend, a first call's setup) is
        # the difference.
        del values, first, last, a
        self.pipeline = None
        self.pipeline, ms2, _ = Loader._timed(fn)
        return {
            "ms": ms,
            "ms2": ms2,
            "gc": gc_info,
            "type": kind,
            "values_ok": values_ok,
            "in_shared_memory": shared,
        }


def measure_flat(count: int, actors: int) -> dict:
    """Ours and a plain ray.get on flat pipelines of ``count`` arrays, one
    per framework; prints a table and returns the figures."""
    import ray
    from ray_zerocopy import ActorWrapper

    FlatActor = ray.remote(num_cpus=0.5)(FlatLoader)
    env = {"env_vars": {"RZC_BENCH_WAY": "flat"}}  # every actor in a new worker process
    out = {}
    print(f"\nflat pipelines of {count} arrays (no modules), first load in a fresh actor, ms, {actors} actors per way:")
    print(
        f"{'framework':10} {'ours':>9} {'per tensor':>11} {'ray.get':>9} {'per tensor':>11} {'ours/ray':>9} "
        f"{'ours 2nd':>9} {'per tensor':>11} {'ray.get 2nd':>11}"
    )
    for framework in ("torch", "numpy", "jax"):
        pipeline = flat_pipeline(framework, count)
        ways = {"ours": ActorWrapper(pipeline), "ray": [ray.put(pipeline)]}
        del pipeline
        times = {"ours": [], "ray": []}
        second = {"ours": [], "ray": []}
        for r in range(actors):
            for way in ("ours", "ray") if r % 2 == 0 else ("ray", "ours"):
                actor = FlatActor.options(runtime_env=env).remote(framework)
                pid = ray.get(actor.ready.remote())
                res = ray.get(actor.load.remote(way, ways[way]))
                assert res["values_ok"], f"{framework}/{way}: wrong values after the load"
                if way == "ours":
                    assert res["in_shared_memory"] == count, (
                        f"{framework}: {count - res['in_shared_memory']} arrays outside Ray's shared memory"
                    )
                times[way].append(res["ms"])
                second[way].append(res["ms2"])
                ray.kill(actor)
                wait_gone(pid)
        ours, plain = statistics.median(times["ours"]), statistics.median(times["ray"])
        print(
            f"{framework:10} {ours:9.2f} {ours * 1e3 / count:8.2f} us {plain:9.2f} {plain * 1e3 / count:8.2f} us "
            f"{ours / plain:9.3f} {statistics.median(second['ours']):9.2f} "
            f"{statistics.median(second['ours']) * 1e3 / count:8.2f} us {statistics.median(second['ray']):11.2f}"
        )
        out[framework] = {
            "ours_ms": times["ours"],
            "ray_get_ms": times["ray"],
            "ours_median": ours,
            "ray_get_median": plain,
            "ours_us_per_tensor": ours * 1e3 / count,
            "ratio_to_ray_get": ours / plain,
            "ours_second_ms": second["ours"],
            "ray_get_second_ms": second["ray"],
            "type": res["type"],
        }
        del ways
    return out


class PeerSealer:
    """Seals the model with the peer package, in a worker that has it on its
    PYTHONPATH; lives for the whole run because it owns the objects."""

    def seal(self, model):
        import ray
        import ray_zerocopy

        t = time.perf_counter()
        w = ray_zerocopy.ModelWrapper.from_model(model, mode="actor")
        ms = (time.perf_counter() - t) * 1e3
        self.wrapper = w
        # A nested ref: the driver must never unpickle the peer's classes.
        return [ray.put(w)], ray_zerocopy.__file__, ms


class FlagPutter:
    """Puts the model with Ray's zero-copy torch flag on; owns the object."""

    def put(self, model):
        import ray
        from ray._private import ray_constants

        assert ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS, f"{FLAG} is not set in the putting worker"
        t = time.perf_counter()
        self.ref = ray.put(model)
        ms = (time.perf_counter() - t) * 1e3
        return [self.ref], ms


# -- the driver -------------------------------------------------------------
def ensure_peer(site: str) -> str:
    if not os.path.isfile(os.path.join(site, "ray_zerocopy", "model_wrappers.py")):
        os.makedirs(site, exist_ok=True)
        subprocess.check_call(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                site,
                f"ray-zerocopy=={PEER_VERSION}",
            ]
        )
    return site


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Waits for a killed actor's process to exit (tearing down a process that
    mapped the whole model takes a while; it must not overlap the next load)."""
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.005)


def summary(xs) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", default="400,20000", help="tensor counts of the models, comma-separated")
    ap.add_argument("--flat", type=int, default=20000, help="arrays in the flat pipelines (0: none)")
    ap.add_argument("--actors", type=int, default=8, help="loads (fresh actors) per way")
    ap.add_argument("--out", default="bench-results/load.json")
    ap.add_argument("--peer-site", default="bench-results/peer-site")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop(FLAG, None)  # only the ray_flag helper and actors get it
    # Workers import this module (the model's classes) and, by default, our
    # package from wherever this process finds it.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)
    peer_site = os.path.abspath(ensure_peer(args.peer_site))

    import ray
    import ray_zerocopy

    ours_file = ray_zerocopy.__file__
    assert not ours_file.startswith(peer_site)
    counts = [int(n) for n in args.tensors.split(",")]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        # ours, peer, flag and the copy for the helpers of the largest model: no spilling
        object_store_memory=int(5 * 560 * 2**20 + 2**30),
    )
    envs = {
        # Every way gets a runtime_env, so every actor starts in a new worker process.
        "ours_on": {"env_vars": {"RZC_BENCH_WAY": "ours"}},
        "ours_off": {"env_vars": {"RZC_BENCH_WAY": "ours"}},
        "peer": {
            "env_vars": {"RZC_BENCH_WAY": "peer", "PYTHONPATH": os.pathsep.join((peer_site, os.environ["PYTHONPATH"]))}
        },
        "ray_flag": {"env_vars": {"RZC_BENCH_WAY": "ray_flag", FLAG: "1"}},
    }
    results = {}
    for n in counts:
        results[str(n)] = measure(build(n), args.actors, envs, ours_file, peer_site)
    print("\nper tensor, first load (us): " + "; ".join(
        f"{n} tensors: " + ", ".join(f"{w} {r['ways'][w]['median'] * 1e3 / r['tensors']:.2f}" for w in WAYS)
        for n, r in results.items()
    ))
    flat = measure_flat(args.flat, args.actors) if args.flat else {}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"models": results, "flat": flat}, f, indent=2)
    print(f"\nwrote {args.out}")


def measure(model, actors: int, envs: dict, ours_file: str, peer_site: str) -> dict:
    """The four ways on ``model``, ``actors`` fresh actors each; prints a
    table and returns the figures."""
    import ray
    from ray_zerocopy import ActorWrapper

    size = nbytes(model)
    with torch.no_grad():
        expected = model(probe_input(model.head.in_features))
    # Sealing, once per way.
    t = time.perf_counter()
    base = ActorWrapper(model)
    seal_ms = {"ours": (time.perf_counter() - t) * 1e3}
    wrappers = {"ours_on": base, "ours_off": copy.copy(base)}
    wrappers["ours_off"].write_protect = False
    model_ref = ray.put(model)  # for the helpers (ordinary pickling, no flag here)
    sealer = ray.remote(num_cpus=0)(PeerSealer).options(runtime_env=envs["peer"]).remote()
    putter = ray.remote(num_cpus=0)(FlagPutter).options(runtime_env=envs["ray_flag"]).remote()
    (peer_box, peer_file, seal_ms["peer"]), (flag_box, seal_ms["ray_flag"]) = ray.get(
        [sealer.seal.remote(model_ref), putter.put.remote(model_ref)]
    )
    del model_ref
    assert peer_file.startswith(peer_site), f"the peer sealed with {peer_file}, not the package in {peer_site}"
    wrappers["peer"] = peer_box[0]  # passed as a top-level argument: Ray unpickles it in the actor, before load
    wrappers["ray_flag"] = flag_box  # [ref]: the actor calls ray.get itself, timed
    print(
        f"model {size / 2**20:.0f} MiB in {sum(1 for _ in model.parameters())} tensors; "
        f"ours: {ours_file}; peer: {peer_file}"
    )

    LoaderActor = ray.remote(num_cpus=0.5)(Loader)
    loads = {w: [] for w in WAYS}
    warm = {w: [] for w in WAYS}
    growth = {w: [] for w in WAYS}
    gcs = {w: [] for w in WAYS}
    warm_gcs = {w: [] for w in WAYS}
    checks = {}
    for r in range(actors):
        order = WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]
        for way in order:
            actor = LoaderActor.options(runtime_env=envs[way]).remote(way)
            info = ray.get(actor.ready.remote())
            if way == "peer":
                assert info["pkg_file"].startswith(peer_site), f"peer actor imported {info['pkg_file']}"
            elif way.startswith("ours"):
                assert info["pkg_file"] == ours_file, f"our actor imported {info['pkg_file']}, not {ours_file}"
            assert info["flag"] == (way == "ray_flag"), f"{way}: {FLAG} is {info['flag']} in the actor"
            res = ray.get(actor.load.remote(wrappers[way]))
            loads[way].append(res["ms"])
            warm[way].append(res["warm_ms"])
            growth[way].append(res["private_growth_kib"])
            gcs[way].append(res["gc"])
            warm_gcs[way].append(res["warm_gc"])
            c = ray.get(actor.check.remote(expected))
            assert c["output_matches"], f"{way}: the loaded model's output differs"
            shared = sum(n for path, n in c["mappings"].items() if "/dev/shm" in path or "plasma" in path)
            assert shared == c["params"], f"{way}: parameters outside Ray's shared memory: {c['mappings']}"
            assert res["private_growth_kib"] < size / 1024 / 4, (
                f"{way}: the actor's private memory grew by {res['private_growth_kib']} KiB"
            )
            checks.setdefault(way, c)
            ray.kill(actor)
            wait_gone(info["pid"])

    peer_med = statistics.median(loads["peer"])
    print(f"\nfirst load in a fresh actor, ms, {actors} actors per way (one at a time):")
    print(
        f"{'way':10} {'median':>9} {'min':>9} {'max':>9} {'vs peer':>8} {'gc in it':>9} "
        f"{'warm 2nd':>9} {'gc in it':>9} {'private +MiB':>12}"
    )
    result = {
        "model_bytes": size,
        "tensors": sum(1 for _ in model.parameters()),
        "actors_per_way": actors,
        "ours_file": ours_file,
        "peer_file": peer_file,
        "peer_version": PEER_VERSION,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seal_ms": seal_ms,
        "ways": {},
    }
    for way in WAYS:
        s = summary(loads[way])
        ratio = s["median"] / peer_med
        wm = statistics.median(warm[way])
        gm = statistics.median(growth[way]) / 1024
        gcm = statistics.median(g["ms"] for g in gcs[way])
        wgcm = statistics.median(g["ms"] for g in warm_gcs[way])
        print(
            f"{way:10} {s['median']:9.2f} {s['min']:9.2f} {s['max']:9.2f} {ratio:8.3f} {gcm:9.2f} "
            f"{wm:9.2f} {wgcm:9.2f} {gm:12.1f}"
        )
        result["ways"][way] = {
            "load_ms": loads[way],
            **s,
            "ratio_to_peer": ratio,
            "gc": gcs[way],
            "gc_median_ms": gcm,
            "warm_ms": warm[way],
            "warm_median": wm,
            "warm_gc": warm_gcs[way],
            "warm_gc_median_ms": wgcm,
            "private_growth_kib": growth[way],
            "check": checks[way],
        }
    for h in (sealer, putter):
        ray.kill(h)  # their objects go with them
    return result




if __name__ == "__main__":
    # Run as the importable module `bench_load`, so that the model's and the
    # actors' classes pickle by reference (workers import this file).
    sys.path.insert(0, _here)
    import bench_load

    bench_load.main()
