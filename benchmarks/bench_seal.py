"""Sealing a sharded checkpoint: wrap time and the driver's peak memory,
ours beside what users do without ray-zerocopy, in one run.

    python benchmarks/bench_seal.py [--size-gb 2] [--shards 8] [--rounds 2]

A checkpoint of about --size-gb GiB (fp16, ~300 tensors) is written as a
sharded safetensors directory with a model.safetensors.index.json, as
save_pretrained writes one. Each way runs in its own driver process, which
starts its own local Ray cluster (so that the object store's pages are
fresh, as on a new cluster), and a sampler in this process reads the
driver's /proc/<pid>/status every 2 ms during the first run (anonymous,
file-backed and shared memory separately). Each driver then lets go of
what it made and does it again: the store now reuses the freed pages.

  ours      ActorWrapper.from_safetensors(directory): the shards read (pread)
            straight into the object store on every core, hashed as they land
  ours_pre  the same, in a cluster started with Ray's preallocate_plasma_memory
            (RAY_preallocate_plasma_memory=1): the store's pages are allocated
            when Ray starts, not when the object is created, as a node that
            seals often (a long-running service) can choose
  baseline  ray.put({name: tensor for every shard's safetensors.torch.load_file})
  put       Ray's own floor: ray.put of one uint8 array of the checkpoint's
            bytes, read into the driver before the clock starts (what any way
            into the object store costs: Ray creates the object and writes it)
  copy      the memory-speed bound: the shard files' bytes copied into fresh
            shared memory (/dev/shm) by as many threads as there are cores,
            nothing parsed, nothing hashed (again: into the same memory, its
            pages now present); sealing's speed is quoted as a fraction of it

The shards are in the page cache (just written): disk reads are not measured.
Also prints how much of our wrap was Ray creating the object (ray.put of
zero pages, which writes the object's every byte) against our own fill
(copy, and the content digest: BLAKE3 of every byte).

Writes bench-results/seal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WAYS = ("ours", "ours_pre", "baseline", "put", "copy")


def write_checkpoint(path: str, size_gb: float, shards: int) -> int:
    import torch
    from safetensors.torch import save_file

    n = 288
    per = int(size_gb * 2**30 / 2 / n)
    side = int(per**0.5)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i // 12}.w{i % 12}.weight" for i in range(n)]
    weight_map, total = {}, 0
    per_shard = -(-n // shards)
    for s in range(shards):
        part = {}
        for name in names[s * per_shard : (s + 1) * per_shard]:
            part[name] = torch.randn(side, side, generator=g).half()
            total += part[name].numel() * 2
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def shard_files(path: str) -> list[str]:
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]


def driver(way: str, path: str, store_bytes: str):
    """One way, in a fresh driver process with a fresh local cluster: run
    twice, the second time once the first's result is released."""
    if way != "copy":
        import ray

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=int(store_bytes),
            _system_config={"preallocate_plasma_memory": True} if way == "ours_pre" else None,
        )
    if way.startswith("ours"):
        import ray_zerocopy  # noqa: F401  (imported before the clock starts, as torch is below)
        from ray_zerocopy import _store

        # What Ray's creation of the object costs within our wrap.
        creating = []
        put_zeros = _store._put_zeros

        def timed(*args):
            t = time.perf_counter()
            try:
                return put_zeros(*args)
            finally:
                creating.append(time.perf_counter() - t)

        _store._put_zeros = timed
    import numpy as np
    import torch  # noqa: F401
    from safetensors.torch import load_file

    if way == "put":
        files = shard_files(path)
        ready = np.empty(sum(os.path.getsize(f) for f in files), np.uint8)
        at = 0
        for f in files:
            with open(f, "rb") as fh:
                at += fh.readinto(memoryview(ready)[at:])

    def once(into=None):
        if way.startswith("ours"):
            from ray_zerocopy import ActorWrapper

            return ActorWrapper.from_safetensors(path)
        if way == "copy":
            return copy_files(path, into)
        if way == "put":
            return ray.put(ready)
        state = {}
        for f in shard_files(path):
            state.update(load_file(f))
        return ray.put(state)

    print("ready", flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    keep = once()
    first = time.perf_counter() - t
    print(json.dumps({"seconds": first}), flush=True)
    sys.stdin.readline()
    if way == "copy":
        t = time.perf_counter()
        keep = once(keep)  # into the same memory, its pages present
    else:
        del keep  # the store frees the object's pages for reuse
        time.sleep(1)
        t = time.perf_counter()
        keep = once()
    again = time.perf_counter() - t
    out = {"again_seconds": again}
    if way.startswith("ours"):
        out.update(creating_seconds=creating[0], creating_again_seconds=creating[1])
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    del keep


def copy_files(path: str, into=None):
    """Every shard file's bytes into one fresh shared-memory block (or the
    block ``into`` again), in 64 MiB pieces spread over one thread per core
    (numpy copies release the GIL)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor
    from multiprocessing import shared_memory

    import numpy as np

    files = shard_files(path)
    sizes = [os.path.getsize(f) for f in files]
    block = into.block if into is not None else shared_memory.SharedMemory(create=True, size=sum(sizes))
    dst = np.ndarray(sum(sizes), dtype=np.uint8, buffer=block.buf)
    maps, jobs, at = [], [], 0
    for f, n in zip(files, sizes, strict=True):
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), n, prot=mmap.PROT_READ)
        maps.append(m)
        src = np.frombuffer(m, dtype=np.uint8)
        for lo in range(0, n, 64 << 20):
            hi = min(n, lo + (64 << 20))
            jobs.append((dst[at + lo : at + hi], src[lo:hi]))
        at += n
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: np.copyto(*job), jobs))
    del dst, src, jobs
    for m in maps:
        m.close()
    if into is not None:
        return into

    class Block:  # unlinked when the driver lets go of it
        def __init__(self):
            self.block = block

        def __del__(self):
            block.close()
            block.unlink()

    return Block()


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def measure(way: str, path: str, store_bytes: int) -> dict:
    p = subprocess.Popen([sys.executable, __file__, "--driver", way, path, str(store_bytes)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    base = status(p.pid)
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                now = status(p.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            peak["total"] = max(peak.get("total", 0), sum(now.values()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()

    def step() -> dict:
        p.stdin.write("go\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    result = step()
    stop.set()
    sampler.join()
    result.update(step())
    p.stdin.write("done\n")
    p.stdin.flush()
    p.wait()
    grow = {k: peak[k] - base[k] for k in base}
    grow["total"] = peak["total"] - sum(base.values())
    return {**result, **grow}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        return driver(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results/seal.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("RZC_BENCH_DIR")) as path:
        nbytes = write_checkpoint(path, args.size_gb, args.shards)
        store = int(2.5 * nbytes + 2**30)
        runs = {w: [] for w in WAYS}
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                runs[way].append(measure(way, path, store))
    mib = 2**20
    print(f"checkpoint: {nbytes / 2**30:.2f} GiB fp16 in {args.shards} shards, 288 tensors; each way in a fresh "
          f"driver with a fresh cluster, medians of {args.rounds}; driver memory growth at peak of the first run")
    print(
        f"{'way':10s} {'wrap s':>8s} {'again s':>8s} {'peak total MiB':>15s} {'x ckpt':>7s} {'anon MiB':>9s} "
        f"{'file MiB':>9s} {'shmem MiB':>10s}"
    )
    med = {}
    for way in WAYS:
        m = {k: statistics.median(r[k] for r in runs[way]) for k in runs[way][0]}
        med[way] = m
        print(
            f"{way:10s} {m['seconds']:8.2f} {m['again_seconds']:8.2f} {m['total'] / mib:15.0f} "
            f"{m['total'] / nbytes:7.2f} {m['RssAnon'] / mib:9.0f} {m['RssFile'] / mib:9.0f} "
            f"{m['RssShmem'] / mib:10.0f}"
        )
    o, c, p, pre = med["ours"], med["copy"], med["put"], med["ours_pre"]
    print(
        f"ours vs baseline: wrap {o['seconds'] / med['baseline']['seconds']:.2f} x the time, "
        f"{o['total'] / med['baseline']['total']:.2f} x the peak memory"
    )
    print(
        f"sealing speed vs a plain copy of the files into fresh shared memory on {os.cpu_count()} threads: "
        f"{c['seconds'] / o['seconds']:.2f} x (the copy took {c['seconds']:.2f} s); "
        f"again (the store's pages reused, the copy's present): {c['again_seconds'] / o['again_seconds']:.2f} x"
    )
    print(
        f"with the store preallocated (RAY_preallocate_plasma_memory=1): ours {pre['seconds']:.2f} s, "
        f"{c['seconds'] / pre['seconds']:.2f} x the copy's speed into fresh memory (Ray creating the object "
        f"{pre['creating_seconds']:.2f} s)"
    )
    print(
        f"Ray's own floor, ray.put of the bytes from memory: {p['seconds']:.2f} s into fresh pages "
        f"({c['seconds'] / p['seconds']:.2f} x the copy's speed), {p['again_seconds']:.2f} s into reused ones; "
        f"ours is {p['seconds'] / o['seconds']:.2f} x and {p['again_seconds'] / o['again_seconds']:.2f} x its speed"
    )
    print(
        f"of our wrap, Ray creating the object (writing its every byte) took {o['creating_seconds']:.2f} s "
        f"({o['creating_again_seconds']:.2f} s again); our fill (copy and digest, every core) and the rest "
        f"{o['seconds'] - o['creating_seconds']:.2f} s ({o['again_seconds'] - o['creating_again_seconds']:.2f} s)"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"checkpoint_bytes": nbytes, "runs": runs, "median": med}, f, indent=2)


if __name__ == "__main__":
    main()
