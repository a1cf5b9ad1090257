"""A process that loads a buffer onto the GPU with sharing, for the sharing
tests: it prints what it got as one JSON line, then holds the memory until it
reads "exit" on stdin (or is killed).

    python share_worker.py KEY [SEED] [--fork-unprivileged] [--fork-sleeper] [--patch] [--many]

SEED picks the buffer's contents (same seed, same buffer). With
--fork-unprivileged the upload runs in a forked child that first switches to
the unprivileged user `nobody`. --patch changes one value in the middle of
the largest tensor (a checkpoint of the same model that differs in a row);
--many adds 3000 small tensors (a header larger than a socket's buffer).
--fork-sleeper forks, after the load, a child that only sleeps (as
multiprocessing or a DataLoader worker would fork); its pid is "sleeper".
SHARE_DIR in the environment is passed as ``share_dir``; SHARE_WRITABLE
(set) as ``share_writable=True``.
"""

import gc
import json
import os
import sys
import time

import ray_zerocopy as rzc
import torch
from common import shared_buffer, wait_for_exit
from ray_zerocopy import _seal


def state(seed: int, patch: bool = False, many: bool = False) -> dict:
    out = {f"w{i}": torch.arange(5000 * (i + 1), dtype=torch.float32) * (seed + i) for i in range(6)}
    if patch:
        out["w5"][12345] += 1.0
    if many:
        out.update({f"extra.layer_{i}.weight": torch.full((4,), float(i)) for i in range(3000)})
    return out


def prepare(seed: int, patch: bool = False, many: bool = False):
    tensors = state(seed, patch, many)
    _, buf = _seal.seal(tensors)
    return tensors, rzc.Weights.from_buffer(shared_buffer(buf, f"share-{os.getpid()}"))


def load(key: str, tensors, w) -> tuple[dict, object]:
    started = time.monotonic()
    dev = w.upload(
        0,
        share=key,
        share_wait=20,
        share_dir=os.environ.get("SHARE_DIR"),
        share_writable=bool(os.environ.get("SHARE_WRITABLE")),
    )
    seconds = time.monotonic() - started
    info = dev.info()
    out = {
        "pid": os.getpid(),
        "sharing": info["sharing"],
        "staging": info["staging"],
        "ptr": info["device_ptr"],
        "nbytes": info["nbytes"],
        "digest": w.content_digest().hex(),
        "read_only": info["read_only"],
        "note": info["note"],
        "fallback": info["fallback"],
        "dir_note": info["dir_note"],
        "verified_nbytes": info["verified_nbytes"],
        "seconds": seconds,
        "equal": all(dev.read(i).tobytes() == t.numpy().tobytes() for i, t in enumerate(tensors.values())),
    }
    return out, (w, dev)


def main():
    key = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 1
    tensors, w = prepare(seed, "--patch" in sys.argv, "--many" in sys.argv)  # everything imported before any fork
    if "--fork-unprivileged" in sys.argv:
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            out, held = load(key, tensors, w)
            del held
            gc.collect()
            os.write(wfd, json.dumps(out).encode())
            os._exit(0)
        os.close(wfd)
        with os.fdopen(r) as f:
            print(f.read(), flush=True)
        os.waitpid(pid, 0)
        return
    out, held = load(key, tensors, w)
    if "--fork-sleeper" in sys.argv:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        out["sleeper"] = pid
    print(json.dumps(out), flush=True)
    wait_for_exit()
    del held, w
    gc.collect()


if __name__ == "__main__":
    main()
