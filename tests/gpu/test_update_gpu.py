"""Two versions of one model on one GPU, on the stand-in driver: each part
of a version is uploaded under its own share key, so processes on the old
and the new version share ONE device copy of the base part and each delta
is its own; every tensor reads back equal; nothing leaks.

The processes are this file run as a script (``python test_update_gpu.py
VERSION``): every one seals the same base (same bytes, same share key), as
every actor of a node maps the same sealed object, and an update of it that
changes one tensor (``w1`` for version 1, ``w2`` for version 2). SHARE_DIR
(RZC_SHARE_DIR) in the environment is the share directory.
"""

import gc
import json
import os
import subprocess
import sys

import pytest
from common import read_log, shared_buffer, wait_for_exit

pytestmark = pytest.mark.standin

HERE = os.path.dirname(os.path.abspath(__file__))


CLUSTER = "update-test-cluster"


def base_state() -> dict:
    import torch

    return {f"w{i}": torch.arange(4000 * (i + 1), dtype=torch.float32) * (i + 1) for i in range(4)}


def version(k: int) -> tuple[list, list, dict]:
    """The parts of version ``k`` (opened from shared memory), their
    descriptions, and the tensors each part holds, by part and index."""
    from ray_zerocopy import Weights, _delta, _load, _seal

    base = base_state()
    sealed, buf = _seal.seal(base)
    w0 = Weights.from_buffer(shared_buffer(buf, f"base-{os.getpid()}"))
    part0 = _load.Part(None, sealed.nbytes, sealed.content_digest, len(w0), sealed.share_key(CLUSTER))
    new = dict(base, **{f"w{k}": base[f"w{k}"] + 1})
    packing, kept = _delta.pack_update((part0,), [w0], sealed, new, _load.LoadOptions())
    delta, dbuf = packing.to_array()
    w1 = Weights.from_buffer(shared_buffer(dbuf, f"delta-{os.getpid()}"))
    part1 = _load.Part(None, delta.nbytes, delta.content_digest, len(w1), delta.share_key(CLUSTER))
    expected = {(p, j): new[f"w{i}"] for i, (p, j) in enumerate(delta.sources)}
    return [w0, w1], [*kept, part1], expected


def worker(k: int) -> None:
    """Uploads version ``k``, prints what each part's upload did as one JSON
    line, then holds the memory until it reads "exit" on stdin."""
    from ray_zerocopy import _load
    from ray_zerocopy._device import parse_device

    opened, parts, expected = version(k)
    devs = _load.upload_parts(opened, parts, parse_device("cuda:0"), share=True)
    out = {
        "pid": os.getpid(),
        "parts": len(parts),
        "delta_tensors": len(opened[1]),
        "sharing": [d.info()["sharing"] for d in devs],
        "equal": all(devs[p].read(j).tobytes() == t.numpy().tobytes() for (p, j), t in expected.items()),
    }
    print(json.dumps(out), flush=True)
    wait_for_exit()
    del devs, opened
    gc.collect()


def _start(env, k):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "test_update_gpu.py"), str(k)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"worker failed: {proc.stderr.read()}")
    return proc, json.loads(line)


def test_versions_share_the_base_parts_device_copy(share_env):
    env, log = share_env
    procs = []
    try:
        procs.append(_start(env, 1))
        procs.append(_start(env, 2))
        (_, old), (_, new) = procs
        assert old["parts"] == new["parts"] == 2 and old["delta_tensors"] == new["delta_tensors"] == 1
        assert old["equal"] and new["equal"]
        assert old["sharing"] == ["uploaded", "uploaded"], old
        assert new["sharing"] == ["imported", "uploaded"], "the base part's device copy is the old version's"
        creates = [e for e in read_log(log) if e["op"] == "create"]
        assert len(creates) == 3, "one base copy and one per delta, for two processes"
    finally:
        for proc, _ in procs:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
    done = {e["pid"]: e["leaks"] for e in read_log(log) if e["op"] == "exit"}
    assert all(done.get(info["pid"]) == 0 for _, info in procs), done


if __name__ == "__main__":
    worker(int(sys.argv[1]))
