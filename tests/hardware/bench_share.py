"""One device copy per GPU, on real hardware: N processes load one ~2 GiB
fp16 model onto one GPU, sharing (the default) and then each with its own
copy; prints the device memory they hold beside the model's size, each
process's load time (the first uploads, the others import), and checks every
process's outputs against ``model.to("cuda")``.

    python tests/hardware/bench_share.py [--procs 4] [--size-gb 2] [--out DIR]
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def build(size_gb: float) -> torch.nn.Sequential:
    d = 4096
    layers = max(1, int(size_gb * 2**30 / (2 * d * d)))
    torch.manual_seed(0)
    with torch.no_grad():
        return torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)]).half().eval()


def worker(path: str, description: str, share: str):
    """Loads the sealed model from the shared-memory file onto cuda:0 and
    reports, then holds it until stdin closes."""
    from ray_zerocopy import _load
    from ray_zerocopy.weights import Weights

    with open(description, "rb") as f:
        sealed, x, expected = pickle.load(f)
    w = Weights.from_buffer(np.memmap(path, dtype=np.uint8, mode="r+"))
    torch.cuda.init()
    torch.cuda.synchronize()
    t = time.perf_counter()
    model, info = _load.build(w, sealed, _load.LoadOptions(device="cuda:0", share_key=share or None))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        equal = torch.equal(model(x.cuda()).cpu(), expected)
    keep = ("sharing", "read_only", "fallback", "note", "verified_nbytes", "verified_copies")
    print(json.dumps({"seconds": seconds, "equal": equal, **{k: info[k] for k in keep}}), flush=True)
    sys.stdin.read()


def run(procs: int, path: str, description: str, share: str) -> dict:
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    ps, reports = [], []
    for _ in range(procs):  # one after the other: the first uploads, the others import
        p = subprocess.Popen([sys.executable, __file__, "--worker", path, description, share],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        reports.append(json.loads(p.stdout.readline()))
        ps.append(p)
    used = free0 - torch.cuda.mem_get_info()[0]
    for p in ps:
        p.stdin.close()
        p.wait()
    return {"used_bytes": used, "loads_s": [r["seconds"] for r in reports], "equal": all(r["equal"] for r in reports),
            "reports": reports}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
    from ray_zerocopy import _seal

    model = build(args.size_gb)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sealed, buffer = _seal.seal(model)
    path = f"/dev/shm/rzc-bench-share-{os.getpid()}"
    np.memmap(path, dtype=np.uint8, mode="w+", shape=buffer.shape)[:] = buffer
    x = torch.randn(8, 4096).half()
    with torch.no_grad():
        expected = model.to("cuda")(x.cuda()).cpu()
    model.cpu()
    torch.cuda.empty_cache()
    description = path + ".pkl"
    with open(description, "wb") as f:
        pickle.dump((sealed, x, expected), f)
    try:
        one = run(1, path, description, "")
        private = run(args.procs, path, description, "")
        shared = run(args.procs, path, description, f"bench-{os.getpid()}")
    finally:
        os.unlink(path)
        os.unlink(description)
    context = one["used_bytes"] - nbytes
    gib = 2**30
    print(f"GPU: {torch.cuda.get_device_name(0)}; model {nbytes / gib:.2f} GiB fp16 in {len(sealed.kinds)} tensors; "
          f"{args.procs} processes on one GPU")
    print(f"one process: {one['used_bytes'] / gib:.2f} GiB of device memory (model + {context / gib:.2f} GiB context)")
    for name, r in (("private", private), ("shared", shared)):
        loads = ", ".join(f"{s * 1e3:.0f}" for s in r["loads_s"])
        print(f"{name:8s} {r['used_bytes'] / gib:6.2f} GiB = {r['used_bytes'] / nbytes:.2f} x model; "
              f"loads (ms, in start order): {loads}; outputs equal to .to('cuda'): {r['equal']}")
    # The importers' trust checks on real hardware: each read windows of the
    # memory it mapped back (one in every tensor) and found its own weights,
    # and maps it read-only where the device allows.
    importers = [r for r in shared["reports"] if r["sharing"] == "imported"]
    for r in shared["reports"]:
        print(f"  {r['sharing']:8s} read_only={r['read_only']} fallback={r['fallback']} "
              f"verified {r['verified_nbytes'] / 2**10:.0f} KiB in {r['verified_copies']} copies {r['note']}")
    ok = len(importers) == args.procs - 1 and all(
        r["fallback"] == "none" and r["verified_nbytes"] > 0 for r in importers
    )
    print(f"importers verified their mapping: {ok}; read-only: {all(r['read_only'] for r in importers)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "share.json"), "w") as f:
        json.dump(
            {
                "gpu": torch.cuda.get_device_name(0),
                "model_bytes": nbytes,
                "one": one,
                "private": private,
                "shared": shared,
                "importers_verified": ok,
            },
            f,
            indent=2,
        )
    return 0 if ok and shared["equal"] and private["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
