"""Fresh processes whose threads make their first calls into the library at
the same moment, for ``test_threads.py``:

    python threads_worker.py SPEC_JSON

A zygote: it imports numpy and torch (never ray_zerocopy, nor the CUDA
driver), then forks ``processes`` children, ``wave`` at a time. In each
child, ``threads`` threads released by a barrier import ray_zerocopy and,
released by a second barrier, all at once: open the sealed buffer (their
own handle, and one handle they share), read its table, export every tensor
through DLPack to numpy and torch, assemble the pipeline on the CPU (as
``ActorWrapper.load`` does), compute digests; then, released together
again, upload to a device in one staging mode each (with one chunk size
each), upload again under a share key (one device copy per device, shared
with the other children of the wave), read every tensor back from their own
uploads and from one they share, and release everything. Each child writes
what its threads saw to ``OUTDIR/<index>.json`` and exits normally (so the
stand-in's log has its exit line); the zygote prints one JSON line:
``{index: {"pid": ..., "status": wait status}}``.

With ``churn``, the children run their threads in a busy interpreter: the
collector runs at nearly every allocation, and runs Python code there, where
another thread may take over (see :class:`Churn`).

SPEC: ``path`` (the sealed buffer's file), ``sealed`` (its pickled
description, hex), ``digest`` (hex content digest), ``outdir``,
``processes``, ``wave``, ``threads``, ``devices``, ``chunks`` (a chunk size
per thread, cycled), ``churn``. The shared uploads meet in
``RZC_SHARE_DIR``.
"""

import json
import os
import sys
import threading
import traceback

MODES = ("register", "pinned", "auto", "pageable")


def state() -> dict:
    """The sealed tensors: values that tell them apart, several dtypes."""
    import torch

    out = {f"w{i}": torch.arange(4000 * (i + 1), dtype=torch.float32) * (i + 1) for i in range(5)}
    out["half"] = torch.arange(3000, dtype=torch.float16)
    out["ids"] = torch.arange(-500, 500, dtype=torch.int64)
    return out


def as_bytes(t) -> bytes:
    import torch

    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


class Churn:
    """Cyclic garbage whose finalizer leaves the next one behind: with the
    collector's threshold at 1 and a switch interval of a microsecond, every
    other allocation of the interpreter collects and runs Python code (the
    finalizer) where another thread may take over, in the middle of whatever
    C code allocated (cffi building a C type on first use, say). The rare
    switches of a busy process, made frequent."""

    on = False

    def __init__(self):
        self.me = self

    def __del__(self):
        if Churn.on:
            Churn()


def once(shared, name, make):
    """``shared[name]``, made by the first thread that asks."""
    with shared["lock"]:
        if name not in shared:
            shared[name] = make()
        return shared[name]


def thread_body(k, spec, buf, expected, shared, gates):
    """What thread ``k`` does; returns what it saw (asserting as it goes)."""
    import pickle

    import numpy as np
    import torch

    gates[0].wait()  # the first import, together
    import ray_zerocopy as rzc
    from ray_zerocopy import _load

    gates[1].wait()  # the first calls, together
    names = list(expected)
    own = rzc.Weights.from_buffer(buf) if k % 2 == 0 else rzc.Weights.open_file(spec["path"])
    w = once(shared, "weights", lambda: rzc.Weights.from_buffer(buf, write_protect=True))
    for h in (own, w):
        assert [t.name for t in h.table()] == names
        assert [h.find(n) for n in names] == list(range(len(names)))
        assert h.content_digest().hex() == spec["digest"]
        assert h.metadata == w.metadata
        for i, n in enumerate(names):
            assert np.from_dlpack(h.dlpack(i)).tobytes() == expected[n], n
            assert as_bytes(torch.from_dlpack(h.dlpack(i))) == expected[n], n
    assert w.content_digest(trust_claim=False).hex() == spec["digest"]
    assert np.from_dlpack(w.data_section()).nbytes == w.nbytes - w.data_start
    sealed = pickle.loads(bytes.fromhex(spec["sealed"]))
    for framework in ("torch", "numpy"):
        pipeline = _load.assemble(w, sealed, device="cpu", framework=framework)
        for n in names:
            got = pipeline[n].numpy() if framework == "torch" else pipeline[n]
            assert got.tobytes() == expected[n], (framework, n)

    gates[2].wait()  # the uploads, together
    mode, chunk = MODES[k % len(MODES)], spec["chunks"][k % len(spec["chunks"])]
    ordinal = k % spec["devices"]
    # Thread 0 uploads its own handle of the shared buffer; the others, the
    # handle they share: all of them copy from the same pages.
    dev = (own if k == 0 else w).upload(ordinal, staging=mode, chunk_bytes=chunk)
    info = dev.info()
    assert info["staging"] == ("register" if mode == "auto" else mode) and info["ordinal"] == ordinal, info
    assert all(dev.read(i).tobytes() == expected[n] for i, n in enumerate(names))
    rzc._native.lib.rzc_dlpack_versioned_free(dev.export_versioned(0))
    # Under a share key: one device copy per device, in this process and in
    # the other children of the wave.
    digest = bytes.fromhex(spec["digest"])
    sdev = w.upload(ordinal, share="threads", share_digest=digest)  # meets in RZC_SHARE_DIR
    sinfo = sdev.info()
    assert sinfo["ordinal"] == ordinal, sinfo
    assert all(sdev.read(i).tobytes() == expected[n] for i, n in enumerate(names))
    # One upload, read and exported by every thread at once.
    common = once(shared, "device", lambda: w.upload(0, staging="pinned"))
    for i, n in enumerate(names):
        assert common.read(i).tobytes() == expected[n], n
        rzc._native.lib.rzc_dlpack_versioned_free(common.export_versioned(i))
    assert common.info()["nbytes"] >= sum(len(b) for b in expected.values())
    gates[3].wait()  # every thread holds its shared upload: one per device
    out = {
        "k": k, "ordinal": ordinal, "staging": info["staging"], "sharing": sinfo["sharing"],
        "fallback": sinfo["fallback"], "note": sinfo["note"], "shared_ptr": sdev.data_ptr(0),
    }
    del dev, sdev, common, pipeline
    own.close()
    return out


def child(index, spec, data, expected) -> None:
    """One child: its threads' results to OUTDIR/<index>.json."""
    import gc

    from common import shared_buffer

    buf = shared_buffer(data, f"threads-{index}")
    n = spec["threads"]
    gates = tuple(threading.Barrier(n) for _ in range(4))
    shared = {"lock": threading.Lock()}
    results = [None] * n

    def run(k):
        try:
            results[k] = thread_body(k, spec, buf, expected, shared, gates)
        except BaseException:
            results[k] = {"k": k, "error": traceback.format_exc()[-3000:]}
            for g in gates:  # the others fail at their next gate, not hang
                g.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    if spec["churn"]:
        Churn.on = True
        gc.set_threshold(1)
        sys.setswitchinterval(1e-6)
        Churn()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Churn.on = False
    shared.pop("device", None)
    if "weights" in shared:
        shared.pop("weights").close()
    gc.collect()
    with open(os.path.join(spec["outdir"], f"{index}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "threads": results}, f)


def main():
    spec = json.loads(sys.argv[1])
    import numpy as np
    import torch  # noqa: F401  (imported once here, inherited by every child)

    assert "ray_zerocopy" not in sys.modules, "the children must be the first to load the library"
    data = np.fromfile(spec["path"], dtype=np.uint8)
    expected = {n: as_bytes(t) for n, t in state().items()}
    statuses = {}
    index = 0
    while index < spec["processes"]:
        pids = {}
        for _ in range(min(spec["wave"], spec["processes"] - index)):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    child(index, spec, data, expected)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                # C's exit(), so that the stand-in writes its exit line (from
                # a library destructor); not Python's shutdown, which would
                # run the zygote's atexit handlers in a child too.
                import ctypes

                ctypes.CDLL(None).exit(code)
            pids[pid] = index
            index += 1
        for pid, i in pids.items():
            _, status = os.waitpid(pid, 0)
            statuses[i] = {"pid": pid, "status": status}
    print(json.dumps(statuses))


if __name__ == "__main__":
    main()
