"""What the write guard costs at load: fresh actors load one sealed ~1 GiB
model with the guard on and off, alternating which goes first, one actor at
a time (so nothing else competes for the cores).

    python benchmarks/bench_guard.py [--size-mb 1024] [--rounds 10]

Prints both medians and writes bench-results/guard.json.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)  # for Ray's workers

import ray  # noqa: E402
import transformer  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402


@ray.remote(num_cpus=0.5)
class Loader:
    def ready(self):
        return True

    def load(self, wrapper):
        t = time.perf_counter()
        self.model = wrapper.load()
        return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="bench-results/guard.json")
    args = ap.parse_args()
    model = transformer.build(args.size_mb)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=int(2 * transformer.nbytes(model) + 2**30),
    )
    base = ActorWrapper(model)  # one sealed object for both settings
    wrappers = {}
    for guard in (True, False):
        wrappers[guard] = copy.copy(base)
        wrappers[guard].write_protect = guard
    loads = {True: [], False: []}
    for r in range(args.rounds):
        for guard in (True, False) if r % 2 else (False, True):
            actor = Loader.remote()
            ray.get(actor.ready.remote())
            loads[guard].append(ray.get(actor.load.remote(wrappers[guard])))
            ray.kill(actor)
    on, off = statistics.median(loads[True]), statistics.median(loads[False])
    print(f"model {transformer.nbytes(model) / 2**20:.0f} MiB; load per fresh actor, median of {args.rounds}:")
    print(f"write_protect=True {on:.2f} ms, write_protect=False {off:.2f} ms, difference {on - off:+.2f} ms")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"on_ms": loads[True], "off_ms": loads[False], "on_median": on, "off_median": off}, f, indent=2)


if __name__ == "__main__":
    main()
