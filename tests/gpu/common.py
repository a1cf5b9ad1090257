"""What the GPU tests share: which driver this process runs on, a shared
memory buffer standing in for Ray's object store, and the stand-in driver's
resource log.

The GPU tests run on one of two drivers:
- the stand-in (`tests/fakecuda`, built by `make fakecuda`), selected by
  pointing `LD_LIBRARY_PATH` at `build/fakecuda` and setting `RZC_FAKECUDA`
  to that directory: `make test` runs `tests/gpu` this way on every machine.
  It proves control flow, cleanup and error paths; no figure and no claim that
  something works on a GPU rests on it.
- a real CUDA driver with a GPU (`tests/gpu/run_gpu_checks.sh`).
"""

from __future__ import annotations

import json
import os

import numpy as np

STANDIN_DIR = os.environ.get("RZC_FAKECUDA")


def backend() -> str:
    """``"standin"``, ``"cuda"`` or ``"none"`` (no driver or no device)."""
    from ray_zerocopy.errors import NoCudaError
    from ray_zerocopy.weights import cuda_device_count

    try:
        count = cuda_device_count()
    except NoCudaError:
        return "none"
    if count == 0:
        return "none"
    return "standin" if STANDIN_DIR and _standin_loaded() else "cuda"


def _standin_loaded() -> bool:
    """Whether the libcuda this process mapped is the stand-in's."""
    from ray_zerocopy.diagnostics import mappings

    standin = os.path.realpath(STANDIN_DIR)
    return any("libcuda.so" in m.path and standin in m.path for m in mappings())


def sample_tensors() -> dict:
    """A tensor of every dtype torch and safetensors share, plus a scalar and
    an empty one, with values that tell them apart."""
    import torch

    dtypes = [
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
        torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
    ]
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(dtypes):
        base = torch.randn(37, 5 + i, generator=g) * 3
        out[f"t{i}"] = torch.complex(base, -base) if dt == torch.complex64 else base.to(dt)
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 7)
    return out


def sealed_in_shm(obj, shm, name: str):
    """``obj`` sealed as an ActorWrapper would (its description), and the
    buffer opened from shared memory standing in for Ray's object store."""
    import ray_zerocopy as rzc
    from ray_zerocopy import _seal

    description, buffer = _seal.seal(obj)
    return description, rzc.Weights.from_buffer(shm(buffer, name))


def shared_buffer(data: np.ndarray, name: str) -> np.ndarray:
    """A copy of ``data`` in a /dev/shm file (shared, pageable memory, as
    Ray's object store is), mapped by this process."""
    path = os.path.join("/dev/shm", f"rzc-test-{os.getpid()}-{name}")
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=data.shape)
    mm[:] = data
    os.unlink(path)  # the mapping stays valid
    return mm


def read_log(path) -> list[dict]:
    """The stand-in's resource events (``FAKECUDA_LOG``), one dict each."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# The stand-in's events that take a resource, and those that give one back,
# by kind of resource.
TAKES = {"alloc": "alloc", "create": "handle", "import": "handle", "register": "register",
         "host_alloc": "host_alloc", "map": "map"}
GIVES = {"free": "alloc", "release": "handle", "unregister": "register", "host_free": "host_alloc",
         "unmap": "map"}


def held(events: list[dict], pid: int | None = None) -> dict[str, int]:
    """Resources taken and not given back, per kind, from a log's events (of
    process ``pid`` when given)."""
    out: dict[str, int] = {}
    for e in events:
        if pid is not None and e.get("pid") != pid:
            continue
        op = e.get("op")
        if op in TAKES:
            out[TAKES[op]] = out.get(TAKES[op], 0) + 1
        elif op in GIVES:
            out[GIVES[op]] = out.get(GIVES[op], 0) - 1
    return {k: v for k, v in out.items() if v}


def wait_for_exit() -> None:
    """What a worker process does once it has reported: holds what it made
    until its test writes "exit" to its standard input (or closes it)."""
    import sys

    for line in sys.stdin:
        if line.strip() == "exit":
            break
