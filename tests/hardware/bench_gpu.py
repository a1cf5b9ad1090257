"""GPU upload benchmark, one run: a 2-3 GiB fp16 model in about 300 tensors,
sealed into a shared-memory buffer (standing in for Ray's object store).

Figures, all in this run on this GPU:
- peak: one pinned host-to-device copy of the same bytes (torch);
- cold upload from unpinned shared memory, registration included
  (staging "register", "auto", "pinned", "pageable");
- upload from memory already pinned;
- what users do today: state_dict ``.to("cuda")`` and
  ``safetensors.torch.load_file(device="cuda")``;
- device memory used vs model bytes.

    python tests/hardware/bench_gpu.py [--size-gb 2.5] [--out DIR]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpu"))
import ray_zerocopy as rzc  # noqa: E402
from common import shared_buffer  # noqa: E402
from ray_zerocopy import _seal  # noqa: E402


def model_state(size_gb: float, n: int = 288) -> dict:
    per = int(size_gb * 2**30 / 2 / n)
    side = int(per**0.5)
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i // 12}.w{i % 12}": torch.randn(side, side + i % 7, generator=g).half() for i in range(n)}


def timed(f, reps=3):
    best = float("inf")
    out = None
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = f()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        if reps > 1:
            del out
            out = None
            torch.cuda.empty_cache()
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    torch.cuda.init()
    state = model_state(args.size_gb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    _, buffer = _seal.seal(state)
    shm = shared_buffer(buffer, "bench")
    w = rzc.Weights.from_buffer(shm)
    gb = nbytes / 1e9
    rows = {}

    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows["peak: one pinned copy (torch)"] = timed(lambda: dst.copy_(pinned, non_blocking=True))
    dst = None  # frees the device memory before the next measurement

    for staging in ("register", "auto", "pinned", "pageable"):
        rows[f"rzc upload, cold shared memory, staging={staging}"] = timed(lambda s=staging: w.upload(0, staging=s))

    # Already pinned source: the same buffer in page-locked memory.
    src = torch.from_numpy(np.asarray(buffer)).pin_memory()
    wp = rzc.Weights.from_buffer(src.numpy())
    rows["rzc upload, source already pinned"] = timed(lambda: wp.upload(0))

    cpu_state = {k: v.clone() for k, v in state.items()}
    rows["state_dict .to('cuda')"] = timed(lambda: {k: v.to("cuda") for k, v in cpu_state.items()})
    path = "/dev/shm/rzc-bench.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(state, path)
    rows["safetensors.torch.load_file(device='cuda')"] = timed(lambda: load_file(path, device="cuda"))
    os.unlink(path)

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free0 = torch.cuda.mem_get_info()[0]
    dev = w.upload(0)
    used = free0 - torch.cuda.mem_get_info()[0]
    info = dev.info()

    peak = rows["peak: one pinned copy (torch)"]
    users = min(rows["state_dict .to('cuda')"], rows["safetensors.torch.load_file(device='cuda')"])
    print(f"model: {nbytes / 2**30:.2f} GiB fp16 in {len(state)} tensors on {torch.cuda.get_device_name(0)}")
    print("| path | seconds | GB/s | vs peak | vs faster of what users do |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in rows.items():
        print(f"| {name} | {s:.3f} | {gb / s:.1f} | {peak / s:.2f} | {users / s:.1f}x |")
    print(f"\ndevice memory: allocation {info['nbytes']} B for {nbytes} B of tensors "
          f"(+{info['nbytes'] - nbytes} B padding); driver-reported use {used} B")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump({"model_bytes": nbytes, "tensors": len(state), "gpu": torch.cuda.get_device_name(0),
                   "seconds": rows, "alloc_bytes": info["nbytes"], "used_bytes": used}, f, indent=2)


if __name__ == "__main__":
    main()
