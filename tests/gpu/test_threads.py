"""The library under threads, on the stand-in driver: fresh processes whose
threads make their first calls into it at the same moment (import, open,
table, DLPack export to numpy and torch, assembly, digests, an upload in
every staging mode to two devices, a shared upload, one upload read by all,
release), many times. Every process exits normally, every value read back
is right, and no process holds a driver resource at exit.

The processes are forks of one zygote (``threads_worker.py``) that imported
numpy and torch but never the library nor the driver: each child is the
first in its life to load both, from its threads, as an actor with
``max_concurrency > 1`` is. A fork costs milliseconds where a fresh
interpreter importing torch costs seconds, so a test runs 30 of them. The
children run their threads in a busy interpreter (the collector running
Python code at nearly every allocation, where threads switch): there, with
cffi's C types built lazily on first use instead of at import, about one
child in four aborted in cffi (``realize_c_type.c``).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest
from common import read_log

pytestmark = pytest.mark.standin

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 30


def run_children(tmp_path, chunks, processes=PROCESSES, wave=3, threads=4, churn=True, **env):
    """Runs the zygote; returns each child's results and wait status (by
    index), the driver log's exit lines (by pid) and the zygote's stderr."""
    from ray_zerocopy import Weights, _seal
    from threads_worker import state

    sealed, buf = _seal.seal(state())
    path = tmp_path / "sealed.safetensors"
    buf.tofile(path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    # A short path of its own: a socket's path holds 107 bytes, and a longer
    # directory is passed over for the user's fallback, shared with others.
    share_dir = tempfile.mkdtemp(prefix="rzc-")
    spec = {
        "path": str(path), "sealed": pickle.dumps(sealed).hex(), "outdir": str(outdir),
        "digest": Weights.from_buffer(buf).content_digest().hex(),
        "processes": processes, "wave": wave, "threads": threads, "devices": 2, "churn": churn,
        "chunks": [c or (64 << 20) for c in chunks],
    }
    log = tmp_path / "driver.jsonl"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
    full_env.update({k: str(v) for k, v in env.items()}, FAKECUDA_LOG=str(log), FAKECUDA_DEVICES="2")
    full_env["RZC_SHARE_DIR"] = str(share_dir)  # this test's alone
    full_env["PYTHONPATH"] = os.pathsep.join([HERE, full_env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "threads_worker.py"), json.dumps(spec)],
            env=full_env, capture_output=True, text=True, timeout=600,
        )
    finally:
        shutil.rmtree(share_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    statuses = {int(i): s for i, s in json.loads(proc.stdout.splitlines()[-1]).items()}
    results = {i: json.loads((outdir / f"{i}.json").read_text()) for i in statuses if (outdir / f"{i}.json").exists()}
    exits = {e["pid"]: e for e in read_log(log) if e.get("op") == "exit"}
    return results, statuses, exits, proc.stderr


def check(results, statuses, exits, stderr):
    failed = {i: s["status"] for i, s in statuses.items() if s["status"] != 0}
    assert not failed, f"{len(failed)} of {len(statuses)} processes failed (wait status by child): {failed}\n" + (
        stderr[-4000:]
    )
    assert len(results) == len(statuses) == PROCESSES, "every child wrote its results"
    for i, r in results.items():
        # The first failure, not the others' broken barriers it caused.
        errors = sorted((t for t in r["threads"] if "error" in t), key=lambda t: "BrokenBarrierError" in t["error"])
        assert not errors, f"child {i}, thread {errors[0]['k']}:\n{errors[0]['error']}"
        for t in r["threads"]:
            assert t["sharing"] in ("uploaded", "imported") and t["fallback"] == "none", t
        # The threads of a process on one device hold one shared copy.
        ptrs = {}
        for t in r["threads"]:
            assert ptrs.setdefault(t["ordinal"], t["shared_ptr"]) == t["shared_ptr"], r
        exit_line = exits.get(r["pid"])
        assert exit_line is not None and exit_line["leaks"] == 0, f"child {i} at exit: {exit_line}"


def test_first_calls_from_threads_at_once(tmp_path):
    """Every staging mode; the default chunk size (an upload registers the
    whole buffer at once) and 16 KiB chunks (registrations of other bounds
    over the same pages)."""
    check(*run_children(tmp_path, chunks=(0, 16384, 16384, 0)))


def test_first_calls_from_threads_at_once_with_slow_copies(tmp_path):
    """The same with every copy taking 20 ms on the driver's side: uploads
    overlap each other's copies in flight (a pageable copy queued from
    pages another upload registered, then unregisters), and the shared
    upload's rendezvous waits for the copy in progress."""
    check(*run_children(tmp_path, chunks=(0, 0, 16384, 65536), FAKECUDA_COPY_DELAY_US=20000))
