"""Sealing a sharded checkpoint: wrap time and the driver's peak memory,
ours beside what users do without ray-zerocopy, in one run.

    python benchmarks/bench_seal.py [--size-gb 2] [--shards 8] [--rounds 2]

A checkpoint of about --size-gb GiB (fp16, ~300 tensors) is written as a
sharded safetensors directory with a model.safetensors.index.json, as
save_pretrained writes one. Each way runs in its own driver process
connected to one local Ray cluster, and a sampler in this process reads the
driver's /proc/<pid>/status every 2 ms (anonymous, file-backed and shared
memory separately):

  ours      ActorWrapper.from_safetensors(directory): the shards packed straight
            into the object store, one shard mapped at a time
  baseline  ray.put({name: tensor for every shard's safetensors.torch.load_file})
  copy      the memory-speed bound: the shard files' bytes copied into fresh
            shared memory (/dev/shm) by as many threads as there are cores,
            nothing parsed, nothing hashed; sealing's speed is quoted as a
            fraction of this copy's

The shards are in the page cache (just written): disk reads are not measured.
Also prints what the content digest (BLAKE3 of every byte of the sealed
buffer, computed while sealing) cost within our wrap time.

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

WAYS = ("ours", "baseline", "copy")


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


def driver(way: str, path: str, address: str):
    """One way, in a fresh driver process connected to the cluster."""
    import ray

    ray.init(address=address, log_to_driver=False)
    if way == "ours":
        import ray_zerocopy  # noqa: F401  (imported before the clock starts, as torch is below)
    import torch  # noqa: F401
    from safetensors.torch import load_file

    print("ready", flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    if way == "ours":
        from ray_zerocopy import ActorWrapper

        keep = ActorWrapper.from_safetensors(path)
    elif way == "copy":
        keep = copy_files(path)
    else:
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        state = {}
        for f in shards:
            state.update(load_file(os.path.join(path, f)))
        keep = ray.put(state)
    seconds = time.perf_counter() - t
    # The content digest (BLAKE3 of every byte) is part of the wrap time: it
    # is hashed on a thread of its own while the fill runs; what the seal
    # waited for it after the fill is reported beside the wrap time.
    digest = keep._sealed.digest_seconds if way == "ours" else 0.0
    print(json.dumps({"seconds": seconds, "digest_seconds": digest}), flush=True)
    sys.stdin.readline()
    del keep


def copy_files(path: str):
    """Every shard file's bytes into one fresh shared-memory block, in 64 MiB
    pieces spread over one thread per core (numpy copies release the GIL)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor
    from multiprocessing import shared_memory

    import numpy as np

    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    sizes = [os.path.getsize(f) for f in files]
    block = shared_memory.SharedMemory(create=True, size=sum(sizes))
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

    class Block:  # unlinked when the driver lets go of it
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


def measure(way: str, path: str, address: str) -> dict:
    p = subprocess.Popen([sys.executable, __file__, "--driver", way, path, address], stdin=subprocess.PIPE,
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
    p.stdin.write("go\n")
    p.stdin.flush()
    result = json.loads(p.stdout.readline())
    stop.set()
    sampler.join()
    p.stdin.write("done\n")
    p.stdin.flush()
    p.wait()
    grow = {k: peak[k] - base[k] for k in base}
    grow["total"] = peak["total"] - sum(base.values())
    return {"seconds": result["seconds"], "digest_seconds": result["digest_seconds"], **grow}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        return driver(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results/seal.json")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory(dir=os.environ.get("RZC_BENCH_DIR")) as path:
        nbytes = write_checkpoint(path, args.size_gb, args.shards)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=int(4 * nbytes + 2**30))
        address = ray.get_runtime_context().gcs_address
        runs = {w: [] for w in WAYS}
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                runs[way].append(measure(way, path, address))
        ray.shutdown()
    mib = 2**20
    print(f"checkpoint: {nbytes / 2**30:.2f} GiB fp16 in {args.shards} shards, 288 tensors; "
          f"driver memory growth at peak (median of {args.rounds} fresh drivers each)")
    print(
        f"{'way':10s} {'wrap s':>8s} {'peak total MiB':>15s} {'x ckpt':>7s} {'anon MiB':>9s} {'file MiB':>9s} "
        f"{'shmem MiB':>10s}"
    )
    med = {}
    for way in WAYS:
        m = {k: statistics.median(r[k] for r in runs[way]) for k in runs[way][0]}
        med[way] = m
        print(
            f"{way:10s} {m['seconds']:8.2f} {m['total'] / mib:15.0f} {m['total'] / nbytes:7.2f} "
            f"{m['RssAnon'] / mib:9.0f} {m['RssFile'] / mib:9.0f} {m['RssShmem'] / mib:10.0f}"
        )
    print(
        f"ours vs baseline: wrap {med['ours']['seconds'] / med['baseline']['seconds']:.2f} x the time, "
        f"{med['ours']['total'] / med['baseline']['total']:.2f} x the peak memory"
    )
    print(
        f"sealing speed vs a plain copy of the files into shared memory on {os.cpu_count()} threads: "
        f"{med['copy']['seconds'] / med['ours']['seconds']:.2f} x (the copy took {med['copy']['seconds']:.2f} s)"
    )
    d = med["ours"]["digest_seconds"]
    print(
        f"content digest (BLAKE3 of every byte, hashed on its own thread behind the fill, the rest on "
        f"{os.cpu_count()} cores): the seal waited {d:.3f} s for it after the fill = {d / med['ours']['seconds']:.1%} "
        f"of the {med['ours']['seconds']:.2f} s wrap"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"checkpoint_bytes": nbytes, "runs": runs, "median": med}, f, indent=2)


if __name__ == "__main__":
    main()
