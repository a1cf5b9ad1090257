"""The Python half of the thread-safety contract (docs/usage.md, "Threads"),
a test per promise: one ``Weights`` used by many threads at once; ``close()``
while other threads use it never crashes (their calls complete, later ones
raise ``InvalidInputError``, exported tensors stay valid); ``ActorWrapper.load``
from several threads of one actor at once (``max_concurrency > 1``). The GPU
half (uploads, ``DeviceWeights``, first calls of fresh processes) is
``tests/gpu/test_threads.py``."""

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ray_zerocopy as rzc  # noqa: E402
from models import Pipeline, ids  # noqa: E402
from ray_zerocopy import _seal  # noqa: E402

THREADS = 8


def run_together(fn, n=THREADS):
    """``fn(k)`` on ``n`` threads released together; their results, or the
    first exception raised in any."""
    barrier = threading.Barrier(n)
    out, errors = [None] * n, []

    def run(k):
        try:
            barrier.wait()
            out[k] = fn(k)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_one_weights_from_many_threads():
    state = {f"w{i}": torch.arange(1000 * (i + 1), dtype=torch.float32) * (i + 1) for i in range(6)}
    state["ids"] = torch.arange(-50, 50)
    _, buf = _seal.seal(state)
    w = rzc.Weights.from_buffer(buf, write_protect=True)
    names = list(state)
    digest = w.content_digest(trust_claim=False)

    def use(k):
        for _ in range(20):
            assert w.names() == names and len(w) == len(names)
            assert [w.find(n) for n in names] == list(range(len(names)))
            assert w.content_digest() == digest and w.content_digest(trust_claim=False) == digest
            assert w.guard_state != "none" and "rzc.data_blake3" in w.metadata
            for i, n in enumerate(names):
                assert np.array_equal(np.from_dlpack(w.dlpack(i)), state[n].numpy()), n
                assert torch.equal(torch.from_dlpack(w.dlpack(i)), state[n]), n
            assert np.from_dlpack(w.data_section()).nbytes == w.nbytes - w.data_start
            for address in w.export_versioned_many(list(range(len(names)))):
                rzc._native.lib.rzc_dlpack_versioned_free(rzc._native.ffi.cast("DLManagedTensorVersioned *", address))
        return k

    assert run_together(use) == list(range(THREADS))


def test_close_while_other_threads_use_it_never_crashes(tmp_path):
    """Threads reading a memory-mapped file (a digest of every byte takes a
    while) when another closes it: the calls in progress complete, the ones
    after raise ``InvalidInputError``. Before, close() freed the handle, and
    unmapped the file, under the running calls: the process died of a
    segmentation fault. In a process of its own, so that a crash fails this
    test instead of ending the run."""
    from safetensors.numpy import save_file

    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": np.full(1 << 20, i, dtype=np.float32) for i in range(16)}, str(path))
    code = textwrap.dedent(
        f"""
        import threading, time, ray_zerocopy as rzc
        w = rzc.Weights.open_file({str(path)!r})
        digest = w.content_digest(trust_claim=False)
        started = threading.Barrier(5)
        first = [threading.Event() for _ in range(4)]  # each thread's first call returned
        done = {{}}
        def use(k):
            calls = 0
            started.wait()
            try:
                while True:
                    if k % 2:
                        assert w.content_digest(trust_claim=False) == digest
                    else:
                        assert len(w.table()) == 16 and w.find("t7") == w.names().index("t7")
                    calls += 1
                    first[k].set()
            except rzc.InvalidInputError as e:
                done[k] = (calls, str(e))
        threads = [threading.Thread(target=use, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        started.wait()
        # Closed while every thread is in its calls (not before a slow
        # thread's first: a fixed sleep left that to the scheduler).
        assert all(e.wait(60) for e in first), "a thread's first call did not return"
        time.sleep(0.01)
        w.close()
        [t.join() for t in threads]
        assert sorted(done) == [0, 1, 2, 3], done
        assert all(calls > 0 and "closed" in why for calls, why in done.values()), done
        print("ok", done)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok")


def test_a_closed_weights_raises_and_its_tensors_stay_valid():
    state = {"a": torch.arange(10.0), "b": torch.arange(5)}
    _, buf = _seal.seal(state)
    gc.collect()  # buffers earlier tests left in garbage cycles go now, not mid-test
    before = rzc.weights.live_buffers()
    w = rzc.Weights.from_buffer(buf)
    producer, kept = w.dlpack(0), torch.from_dlpack(w.dlpack(1))
    w.close()
    assert rzc.weights.live_buffers() == before + 1, "the tensor still holds the buffer"
    with pytest.raises(rzc.InvalidInputError, match="closed"):
        w.table()
    with pytest.raises(rzc.InvalidInputError, match="closed"):
        np.from_dlpack(producer)
    w.close()  # again: nothing
    assert torch.equal(kept, state["b"])
    del kept
    assert rzc.weights.live_buffers() == before


def test_a_sealer_advanced_by_several_threads_and_closed_under_finish():
    """Threads declare parts of a buffer final at once (the buffer written
    whole first: ``upto`` is a prefix every writer has finished, so a
    thread's own stripe may be declared only once the parts below it are
    written): the digest is the one of sealing the buffer whole. A sealer closed
    while another thread is in ``finish()`` (hashing 64 MiB) is freed when
    that call returns: it returns the right digest, and later calls raise
    ``InvalidInputError``."""
    from ray_zerocopy import Dtype, PackInput, PackPlan, Sealer, seal_buffer

    data = np.arange(16 << 20, dtype=np.float32)
    plan = PackPlan([PackInput("a", Dtype.F32, data.shape, data.ctypes.data, data.nbytes)], reserve_digest=True)
    whole = plan.allocate()
    plan.write(whole)
    expected = seal_buffer(whole.copy())
    stripes = np.linspace(0, plan.nbytes, THREADS + 1, dtype=np.int64)

    def filled():
        buf = plan.allocate()
        plan.write_layout(buf)
        sealer = Sealer(buf)
        plan.write(buf)
        return buf, sealer

    buf, sealer = filled()

    def advance(k):
        for upto in np.linspace(stripes[k], stripes[k + 1], 16, dtype=np.int64):
            sealer.advance(int(upto))

    run_together(advance)
    assert sealer.finish() == expected
    # Nothing declared final: finish() hashes all of it, for a while, and a
    # close() meanwhile frees the sealer only after it. A close that comes
    # before finish() has taken the handle (the finisher descheduled in
    # between) makes finish() refuse: that round says nothing, and is run
    # again.
    for _ in range(20):
        buf, sealer = filled()
        got, refused, ready = [], [], threading.Event()

        def finish(sealer=sealer, got=got, refused=refused, ready=ready):
            ready.set()
            try:
                got.append(sealer.finish())
            except rzc.InvalidInputError as e:
                refused.append(e)

        finisher = threading.Thread(target=finish)
        finisher.start()
        ready.wait()
        time.sleep(0.002)
        sealer.close()
        finisher.join()
        if not refused:
            break
        assert "closed" in str(refused[0])
    assert got == [expected], f"finish() refused in every round: {refused}"
    with pytest.raises(rzc.InvalidInputError, match="closed"):
        sealer.advance(0)


def test_loads_ending_in_any_order_leave_the_collector_as_they_found_it():
    """Loads overlapping in threads of one process hold garbage collection
    off while any runs and leave it on after the last, however they
    interleave (with thread switches as often as the interpreter allows,
    a hundred rounds). Each load restoring the collector as it had read
    it left it off for good in about one round in ten: one read it off
    while another ran, the other put it back on, then the first turned it
    off."""
    from ray_zerocopy import _load

    def loads():
        for _ in range(300):
            with _load._no_collection():
                assert not gc.isenabled()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        left_off = 0
        for _ in range(100):
            run_together(lambda _k: loads())
            left_off += not gc.isenabled()
            gc.enable()
    finally:
        sys.setswitchinterval(switch)
    assert left_off == 0, f"collector left off after {left_off} of 100 rounds"
    # Off before: still off after, and the loads do not turn it on.
    gc.disable()
    try:
        run_together(lambda _k: loads())
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_loads_from_several_threads_of_one_actor(ray_cluster):
    """An actor with ``max_concurrency=4`` whose calls load one wrapper at
    the same moment, in a process that never loaded it: every call gets a
    pipeline that computes as the original, all of them zero-copy over the
    one buffer the process opened, and the collector is on afterwards."""
    ray = ray_cluster
    pipe = Pipeline()
    w = rzc.ActorWrapper(pipe, device="cpu")

    @ray.remote(num_cpus=0.5, max_concurrency=4)
    class Server:
        def __init__(self):
            self.barrier = threading.Barrier(4)

        def load(self, wrapper, x):
            self.barrier.wait()
            pipeline = wrapper.load()
            with torch.no_grad():
                out = pipeline(x)
            return out, pipeline.encoder.emb.weight.data_ptr(), os.getpid()

        def collector_on(self):
            return gc.isenabled()

    server = Server.remote()
    x = ids()
    results = ray.get([server.load.remote(w, x) for _ in range(4)], timeout=120)
    with torch.no_grad():
        expected = pipe(x)
    assert all(torch.equal(out, expected) for out, *_ in results)
    assert len({ptr for _, ptr, _ in results}) == 1, "one buffer, opened once, under every pipeline"
    assert len({pid for *_, pid in results}) == 1
    # Once every load has ended (one still running holds collection off).
    assert ray.get(server.collector_on.remote(), timeout=60)
    ray.kill(server)
