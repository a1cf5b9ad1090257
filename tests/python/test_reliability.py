"""Reliability: shared weights cannot be corrupted through a loaded tensor,
buffers live exactly as long as their tensors, bad input fails cleanly,
faults under Ray are survived, and concurrent use is safe."""

import ctypes
import errno
import gc
import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ray_zerocopy as rzc  # noqa: E402
from models import Pipeline, ids  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402
from ray_zerocopy.weights import live_buffers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _actor_class(ray):
    @ray.remote(num_cpus=0.25, max_restarts=0)
    class Actor:
        def __init__(self, wrapper):
            self.p = wrapper.load()

        def predict(self, x):
            with torch.no_grad():
                return self.p(x)

        def corrupt(self):
            with torch.no_grad():
                self.p.encoder.emb.weight.add_(1.0)  # in place, into shared memory
            return "wrote"

    return Actor


# -- 1. read-only weights ----------------------------------------------------
def test_a_write_kills_the_writer_and_spares_the_others(ray_cluster):
    ray = ray_cluster
    pipe = Pipeline()
    w = ActorWrapper(pipe)  # write_protect is on by default
    Actor = _actor_class(ray)
    writer, reader = Actor.remote(w), Actor.remote(w)
    x = ids()
    before = ray.get(reader.predict.remote(x))
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(writer.corrupt.remote())
    assert torch.equal(ray.get(reader.predict.remote(x)), before)
    late = Actor.remote(w)  # an actor started after the attempt sees the original
    with torch.no_grad():
        assert torch.equal(ray.get(late.predict.remote(x)), pipe(x))


def test_without_the_guard_one_write_changes_every_actor(ray_cluster):
    """What the guard prevents (write_protect=False): the write succeeds and
    silently changes another actor's model."""
    ray = ray_cluster
    w = ActorWrapper(Pipeline(), write_protect=False)
    Actor = _actor_class(ray)
    writer, reader = Actor.remote(w), Actor.remote(w)
    x = ids()
    before = ray.get(reader.predict.remote(x))
    assert ray.get(writer.corrupt.remote()) == "wrote"
    assert not torch.equal(ray.get(reader.predict.remote(x)), before)


def test_guard_in_one_process_faults_then_lifts(tmp_path):
    """In one process: a write through a guarded tensor is a segmentation
    fault (the process dies) with a message that says why and what to do; once
    the last tensor is gone the memory is writable again."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, torch
        import ray_zerocopy as rzc
        from ray_zerocopy import _seal
        _, buf = _seal.seal({"w": torch.ones(5000)})
        w = rzc.Weights.from_buffer(buf, write_protect=True)
        t = torch.from_dlpack(w.dlpack(0))
        if sys.argv[1] == "write":
            t.add_(1)
            print("wrote")
        del w, t
        buf[-5000] = 7  # writable again after release
        print("lifted")
        """
    )
    path = tmp_path / "guard.py"
    path.write_text(script)
    crash = subprocess.run([sys.executable, str(path), "write"], capture_output=True, text=True, timeout=120)
    assert crash.returncode == -11 and "wrote" not in crash.stdout, (
        crash.returncode,
        crash.stdout,
        crash.stderr[-500:],
    )
    assert "ray-zerocopy: a write to read-only shared weights" in crash.stderr, crash.stderr[-2000:]
    assert "clone() a tensor" in crash.stderr
    ok = subprocess.run([sys.executable, str(path), "read"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "lifted" in ok.stdout, ok.stderr[-2000:]


def test_guard_needs_guard_pages():
    data = np.ones(3000, np.float32)
    buf = rzc.pack([rzc.PackInput("x", rzc.Dtype.F32, data.shape, data.ctypes.data, data.nbytes)])  # no guard bytes
    with pytest.raises(rzc.InvalidArgumentError, match="guard_bytes"):
        rzc.Weights.from_buffer(buf, write_protect=True)


# The side doors of the guard. mprotect alone left the kernel willing to make
# the pages writable again, and madvise(MADV_REMOVE) only asks that a mapping
# be shared and *may* write: it zeroed the weights for every actor and every
# later load. The guard now maps the weights from a read-only descriptor of
# the object store's file, which the kernel never lets become writable.
MADV_REMOVE = 9


def _shared_pipeline():
    """A Pipeline with 1 MiB of ballast in 512 small tensors. Sealed, it lives
    in Ray's shared-memory object store (objects under 100 KiB travel inside
    the task's arguments instead: each actor gets a private copy, and nothing
    is shared to protect), and its header spans several pages that hold no
    tensor data."""
    pipe = Pipeline()
    pipe.heads["ballast"] = [torch.nn.Linear(32, 32) for _ in range(256)]
    return pipe


def _probe_class(ray):
    @ray.remote(num_cpus=0.25, max_restarts=0)
    class Probe:
        """Loads the guarded pipeline, then tries a side door on its weights."""

        def __init__(self, wrapper):
            self.wrapper = wrapper
            self.p = wrapper.load()
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.madvise.argtypes = self.libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

        def predict(self, x):
            with torch.no_grad():
                return self.p(x)

        def emb(self):
            return self.p.encoder.emb.weight.clone()

        def _weight_pages(self):
            t = self.p.encoder.emb.weight
            page = mmap.PAGESIZE
            lo = t.data_ptr() // page * page
            hi = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
            return lo, hi - lo

        def backing(self):
            """(permissions, device, inode, path) of the mapping holding the
            weights, from /proc/self/maps."""
            from ray_zerocopy.diagnostics import mapping_at

            m = mapping_at(self.p.encoder.emb.weight.data_ptr())
            return (m.perms, m.device, m.inode, m.path) if m is not None else None

        def guard_state(self):
            from ray_zerocopy import _load

            return _load.open_sealed(self.wrapper.object_ref, True, self.wrapper.content_digest).guard_state

        def madvise_remove(self):
            lo, n = self._weight_pages()
            return self.libc.madvise(lo, n, MADV_REMOVE), ctypes.get_errno()

        def mprotect_writable(self):
            lo, n = self._weight_pages()
            return self.libc.mprotect(lo, n, mmap.PROT_READ | mmap.PROT_WRITE), ctypes.get_errno()

        def write_header(self):
            """Writes one byte into the header's first guarded page: the first
            page boundary inside the buffer, which the header spans (it is
            padded past a page so that no tensor shares its pages)."""
            import ray

            buf = ray.get(self.wrapper.object_ref)  # another view of the same mapped object
            base, header_end = buf.ctypes.data, 8 + int.from_bytes(bytes(buf[:8]), "little")
            assert base <= self.p.encoder.emb.weight.data_ptr() < base + len(buf), "the view maps the loaded buffer"
            page = mmap.PAGESIZE
            target = -(-base // page) * page
            assert target + page <= base + header_end, "a page of the header only"
            ctypes.memset(target, ord("X"), 1)
            return "wrote"

        def store_fds(self):
            """This process's descriptors of the file behind the weights."""
            _, dev, inode, _ = self.backing()
            major, minor = (int(v, 16) for v in dev.split(":"))
            found = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    st = os.stat(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (major, minor, inode):
                    found.append(os.readlink(f"/proc/self/fd/{fd}"))
            return found

    return Probe


@pytest.fixture
def guarded(ray_cluster):
    """A pipeline sealed into the object store, a ``probe`` actor that loaded
    it guarded, and ``new_probe()`` for more. Afterwards the actors go and the
    store takes the object back before the next test, which may measure the
    store's free memory."""
    ray = ray_cluster

    def free():
        return ray.available_resources().get("object_store_memory", 0)

    before = free()
    pipe = _shared_pipeline()
    wrapper = ActorWrapper(pipe)
    Probe, actors = _probe_class(ray), []

    def new_probe():
        actors.append(Probe.remote(wrapper))
        return actors[-1]

    probe = new_probe()
    perms, _, _, path = ray.get(probe.backing.remote())
    assert perms[3] == "s" and path.startswith("/dev/shm/"), (perms, path)  # the object store's shared memory
    yield SimpleNamespace(pipe=pipe, probe=probe, new_probe=new_probe)
    for a in actors:
        ray.kill(a)
    actors.clear()
    wrapper = probe = None
    deadline = time.time() + 20
    while free() < before and time.time() < deadline:
        time.sleep(0.2)


def test_madvise_remove_is_refused_and_the_weights_stay(ray_cluster, guarded):
    """madvise(MADV_REMOVE) on the weights' pages fails with EACCES (the actor
    survives); a fresh actor still sees the original weights."""
    ray, pipe = ray_cluster, guarded.pipe
    assert ray.get(guarded.probe.madvise_remove.remote()) == (-1, errno.EACCES)
    x = ids()
    with torch.no_grad():
        expected = pipe(x)
    assert torch.equal(ray.get(guarded.probe.predict.remote(x)), expected), "the actor survives, its weights intact"
    observer = guarded.new_probe()
    assert torch.equal(ray.get(observer.emb.remote()), pipe.encoder.emb.weight)
    assert torch.equal(ray.get(observer.predict.remote(x)), expected)


def test_mprotect_cannot_make_the_weights_writable(ray_cluster, guarded):
    assert ray_cluster.get(guarded.probe.guard_state.remote()) == "sealed"
    assert ray_cluster.get(guarded.probe.mprotect_writable.remote()) == (-1, errno.EACCES)


def test_a_header_write_kills_the_writer_and_later_loads_work(ray_cluster, guarded):
    """The header's pages are guarded too: a rewritten header would make
    every later load fail its check of the header."""
    ray = ray_cluster
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(guarded.probe.write_header.remote())
    x = ids()
    with torch.no_grad():
        assert torch.equal(ray.get(guarded.new_probe().predict.remote(x)), guarded.pipe(x))


def test_an_actor_holds_no_descriptor_of_the_store(ray_cluster, guarded):
    """fallocate(PUNCH_HOLE) (and ftruncate, write) would change the weights
    through a writable descriptor of the object store's file, not through a
    mapping: an actor holds none (the plasma client closes the file after
    mapping it, and the guard's read-only descriptor is closed once mapped).
    A process that deliberately opens the file for writing (the raylet's
    descriptor, through /proc/<raylet pid>/fd) can still change it: that is
    outside what a guard on this process's mappings can stop."""
    assert ray_cluster.get(guarded.probe.store_fds.remote()) == []


# -- 2. lifetimes ------------------------------------------------------------
def test_a_loaded_model_in_a_reference_cycle_outlives_the_interpreter_cleanly(tmp_path):
    """A model still alive at exit inside a reference cycle (a module that
    refers to itself, a parametrized module) is freed by the interpreter's
    last garbage collection, after the package's globals are gone: its
    tensors' release must not call into freed memory (it crashed with
    SIGSEGV at exit)."""
    script = textwrap.dedent(
        """
        import torch
        import ray_zerocopy as rzc
        from ray_zerocopy import _load, _seal
        normed = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 8))
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), normed)
        sealed, buf = _seal.seal(m.eval())
        for protect in (False, True):
            out = _load.assemble(rzc.Weights.from_buffer(buf, write_protect=protect), sealed)
            out.cycle = [out]
        print("exiting", flush=True)
        """
    )
    path = tmp_path / "cycle.py"
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "exiting" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_tensors_outlive_wrapper_handle_and_refs_then_store_returns_to_baseline(ray_cluster):
    """The last tensor keeps the buffer after the wrapper, the pipeline and
    every handle are gone; once it goes too, the sealed object is
    referenced by no process, and its 4 MiB leave Ray's store. The object
    is followed by its id and size, and the store's usage (as the raylet
    counts it) compared with its figure just before the release. (The
    cluster's ``object_store_memory`` resource is no measure: it counts the
    object free as soon as its references are gone, while the tensor still
    maps it; and a baseline taken before the test depended on other tests'
    objects being freed, or put, meanwhile.)"""
    from ray._private.internal_api import memory_summary
    from ray_zerocopy import _store

    ray = ray_cluster

    def used():
        state = _store._store_state(ray)
        assert state is not None, "the raylet's store figures cannot be read"
        return state[0]

    def listed(object_hex):
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, units="B", num_entries=100000)
        return object_hex in summary

    def wait_for(cond, seconds=60):
        deadline = time.time() + seconds
        while not cond() and time.time() < deadline:
            time.sleep(0.2)
        return cond()

    gc.collect()
    base_live = live_buffers()
    model = torch.nn.Linear(1024, 1024)  # 4 MiB: large objects live in plasma
    w = ActorWrapper(model)
    loaded = w.load()
    weight = loaded.weight
    ref = w.object_ref
    object_hex = ref.hex()
    assert ray.experimental.get_object_locations([ref])[ref]["object_size"] >= 4 * 2**20, "in the store"
    del w, loaded, ref  # wrapper, pipeline and every handle gone: one tensor remains
    gc.collect()
    assert live_buffers() == base_live + 1, "the tensor keeps the buffer"
    assert torch.equal(weight, model.weight), "its memory is still valid"
    assert listed(object_hex), "the tensor's buffer keeps the object"
    before = used()
    assert before >= 4 * 2**20, "the object is in the store while the tensor maps it"
    del weight
    gc.collect()
    assert live_buffers() == base_live, "the buffer is released with the last tensor"
    assert wait_for(lambda: not listed(object_hex)), "no process references the object any more"
    assert wait_for(lambda: used() <= before - 4 * 2**20), "the object's 4 MiB leave Ray's store"


def _peak_rss_kib(reset: bool = False) -> int:
    """This process's peak RSS (``VmHWM``), after resetting it to the RSS of
    now where ``reset``: the lifetime peak (``ru_maxrss``) is set by
    whatever test used the most memory before, and hides any growth
    below it."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_ten_thousand_cycles_keep_rss_flat():
    data = np.arange(4096, dtype=np.float32)
    buf = rzc.pack(
        [rzc.PackInput(f"t{i}", rzc.Dtype.F32, (1024,), data.ctypes.data + 4096 * (i % 4), 4096) for i in range(8)],
        guard_bytes=4096,
    )

    def cycle():
        w = rzc.Weights.from_buffer(buf, write_protect=True)
        ts = [torch.from_dlpack(w.dlpack(i)) for i in range(len(w))]
        arr = np.from_dlpack(w.dlpack(0))
        del w, ts, arr

    for _ in range(1000):  # warm-up: allocator pools, caches
        cycle()
    gc.collect()
    rss0 = _peak_rss_kib(reset=True)
    base = live_buffers()
    for _ in range(10_000):
        cycle()
    gc.collect()
    grown_kb = _peak_rss_kib() - rss0
    assert live_buffers() == base
    assert grown_kb < 8 * 1024, f"peak RSS grew {grown_kb} KiB over 10,000 cycles"


# -- 3. bad input ------------------------------------------------------------
def test_a_malformed_file_never_reaches_an_actor(ray_cluster, tmp_path):
    p = tmp_path / "m.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}}'
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(99))
    with pytest.raises(rzc.BadFormatError, match="needs 16 bytes"):
        ActorWrapper.from_safetensors(p)


# -- 4. faults under Ray -----------------------------------------------------
def test_lost_object_gives_a_clear_error(ray_cluster):
    """The sealed object is owned by whoever created the wrapper; when that
    owner dies the object is gone, and load() says so."""
    ray = ray_cluster

    @ray.remote(num_cpus=0.25)
    class Owner:
        def make(self):
            return ActorWrapper(torch.nn.Linear(512, 512))  # 1 MiB: in plasma

    owner = Owner.remote()
    w = ray.get(owner.make.remote())
    ray.kill(owner)
    _wait_until_lost(ray, w.object_ref)
    with pytest.raises(RuntimeError, match="no longer in Ray's object store"):
        w.load()


def _wait_until_lost(ray, ref, seconds: float = 60.0) -> None:
    """Waits, up to a deadline, until reading ``ref`` reports it lost: the
    node frees a dead owner's objects once it learns of the death."""
    lost = (ray.exceptions.ObjectLostError, ray.exceptions.ObjectFreedError, ray.exceptions.OwnerDiedError)
    deadline = time.monotonic() + seconds
    while True:
        try:
            ray.get(ref, timeout=5)
        except lost:
            return
        except ray.exceptions.GetTimeoutError:
            pass  # the read waits for the object (its owner's death not yet known): not lost yet
        assert time.monotonic() < deadline, f"object {ref.hex()} still readable {seconds} s after its owner died"
        time.sleep(0.05)  # a poll of the object's state, not a guess at how long the loss takes


class _DiesOnce:
    """A map_batches actor that kills its process on its first batch if the
    marker file is there (and removes it), so exactly one actor dies once."""

    def __init__(self, actor_wrapper, marker):
        self.pipeline = actor_wrapper.load()
        self.marker = marker

    def __call__(self, batch):
        try:
            os.remove(self.marker)
            os._exit(1)
        except FileNotFoundError:
            pass
        with torch.no_grad():
            return {"i": batch["i"], "y": self.pipeline(torch.as_tensor(batch["data"])).numpy()}


def test_map_batches_survives_a_killed_actor(ray_cluster, tmp_path):
    ray = ray_cluster
    from ray.data import ActorPoolStrategy

    pipe = Pipeline()
    w = ActorWrapper(pipe)
    marker = tmp_path / "die"
    marker.write_text("once")
    data = ids(n=48).numpy()
    ds = ray.data.from_items([{"i": i, "data": data[i]} for i in range(48)])
    out = ds.map_batches(
        _DiesOnce,
        fn_constructor_kwargs={"actor_wrapper": w, "marker": str(marker)},
        batch_size=8,
        compute=ActorPoolStrategy(size=2),
        num_cpus=0.5,
        max_restarts=2,
        max_task_retries=2,
    ).take_all()
    assert not marker.exists(), "an actor was killed during the run"
    got = np.stack([r["y"] for r in sorted(out, key=lambda r: r["i"])])
    with torch.no_grad():
        np.testing.assert_array_equal(got, pipe(torch.as_tensor(data)).numpy())


def _run_script(body: str, timeout=600):
    env = dict(
        os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_wrapper_from_an_ended_ray_session_says_so():
    """A wrapper kept, or pickled and read back, after ``ray.shutdown()`` and
    a new ``ray.init()``: its sealed object went with the old session. The
    one read back waited in ``ray.get`` for ever, as did the one kept. Both
    now raise SealedObjectLostError saying why, at load, at update and at
    publish (which took it, for every subscriber to fail on)."""
    out = _run_script(
        """
        import pickle, ray, torch
        from ray_zerocopy import ActorWrapper, SealedObjectLostError
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        w = ActorWrapper(torch.nn.Linear(4, 4))
        blob = pickle.dumps(w)
        assert torch.equal(w.load().weight, w.load().weight)
        ray.shutdown()
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        import ray_zerocopy
        calls = {
            "load": lambda wr: wr.load(),
            "update": lambda wr: wr.update({"weight": torch.zeros(4, 4)}),
            "publish": lambda wr: ray_zerocopy.publish("stale", wr),
        }
        for which, wrapper in (("kept", w), ("read back", pickle.loads(blob))):
            for what, call in calls.items():
                try:
                    call(wrapper)
                except SealedObjectLostError as e:
                    assert "sealed in the Ray session" in str(e), e
                    print(which, what, "refused")
        ray.shutdown()
        """,
        timeout=180,
    )
    for which in ("kept", "read back"):
        for what in ("load", "update", "publish"):
            assert f"{which} {what} refused" in out, out


def test_spilled_objects_are_restored_and_load():
    """An object store small enough to force spilling to disk: every wrapper
    still loads, equal to its model, each copy read back checked in full
    first (the log says so)."""
    out = _run_script(
        """
        import logging, sys, ray, torch
        from ray_zerocopy import ActorWrapper, _load, _store
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        ray.init(
            address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20
        )
        models = [torch.nn.Linear(2048, 2048) for _ in range(4)]   # 16 MiB each, 64 MiB in all
        wrappers = [ActorWrapper(m) for m in models]
        filler = [ray.put(torch.zeros(4 * 2**20).numpy()) for _ in range(4)]  # 64 MiB more
        x = torch.randn(3, 2048)
        print("spilled", sum(_store.spilled(ray, w._ref) for w in wrappers))
        for m, w in zip(models, wrappers):
            with torch.no_grad():
                assert torch.equal(w.load()(x), m(x))
        print("restored", len(wrappers), "checks left", len(_load._checks))
        """
    )
    assert "restored 4 checks left 0" in out
    spilled = int(out.split("spilled ", 1)[1].split()[0])
    assert spilled >= 1 and out.count("which Ray may have read back from disk, in") == spilled, out


# A Ray with an 80 MiB object store spilling into SPILL, a 16 MiB model whose
# weight is all MARKER, and spill_and_change(): fills the store (the
# model's object spilled, and evicted where nothing maps it), waits until
# it has stopped spilling, then changes weight[0, 1000] in every spill file
# that holds the model, to 0.
_SPILL_SCENE = """
import glob, os, time, ray, torch
from ray_zerocopy import _store

ray.init(
    address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
    object_store_memory=80 * 2**20, object_spilling_directory=SPILL,
)
MARKER = 1234.5678  # its bytes, four in a row, are only in this model's weight
model = torch.nn.Linear(2048, 2048)
with torch.no_grad():
    model.weight.fill_(MARKER)
filler = []


def spill_and_change():
    filler.extend(ray.put(torch.zeros(4 * 2**20).numpy()) for _ in range(8))  # 128 MiB more, held
    state = None
    for _ in range(60):  # until the store has stopped spilling (no spill file being written)
        now = _store._store_state(ray)
        if now is not None and now == state:
            break
        state = now
        time.sleep(0.5)
    pattern, changed = torch.full((4,), MARKER).numpy().tobytes(), 0
    for path in glob.glob(os.path.join(SPILL, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                at = f.read().find(pattern)
            if at >= 0:  # Ray may write an object into more than one spill file (2 here, in every run)
                with open(path, "r+b") as f:
                    f.seek(at + 4 * 1000)
                    f.write(torch.zeros(1).numpy().tobytes())
                changed += 1
    return changed
"""


def _spill_script(spill_dir, body: str) -> str:
    return f"SPILL = {str(spill_dir)!r}\n" + _SPILL_SCENE + textwrap.dedent(body)


def test_a_spilled_copy_changed_on_disk_is_refused_not_loaded(tmp_path):
    """A sealed object spilled to disk is a file anyone who can write Ray's
    spilling directory can change (or a bad sector damage), and Ray reads it
    back without a check. One weight changed in the spilled file: a load in
    a task, and then in the driver, loaded the changed value without a word.
    Now a copy the owner says was spilled is hashed in full before its first
    load in a process, and refused. A copy never spilled is not (the owner
    is asked; a borrower's own records say "not spilled" either way)."""
    out = _run_script(
        _spill_script(
            tmp_path,
            """
            import concurrent.futures
            from ray_zerocopy import ActorWrapper, SealedObjectCorruptedError

            w = ActorWrapper(model)

            @ray.remote
            def spilled(refs):
                return _store.spilled(ray, refs[0])

            @ray.remote
            def load(w):
                try:
                    return "loaded, weight[0, 1000] = " + str(float(w.load().weight[0, 1000]))
                except SealedObjectCorruptedError as e:
                    return "refused: " + str(e)

            print("spilled before", _store.spilled(ray, w._ref), ray.get(spilled.remote([w._ref])))
            print("spill files changed", spill_and_change())
            print("spilled after", _store.spilled(ray, w._ref), ray.get(spilled.remote([w._ref])))
            print("task", ray.get(load.remote(w)))
            for attempt in ("driver", "again"):  # a copy found corrupted is not kept as opened: checked again
                try:
                    print(attempt, "loaded, weight[0, 1000] =", float(w.load().weight[0, 1000]))
                except SealedObjectCorruptedError as e:
                    print(attempt, "refused:", e)

            def in_thread(_):  # loads at once share one check of the copy: each is refused
                try:
                    w.load()
                    return "loaded"
                except SealedObjectCorruptedError:
                    return "refused"

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                print("threads", sorted(set(pool.map(in_thread, range(8)))))
            """,
        )
    )
    assert "spilled before False False" in out, out
    assert "spilled after True True" in out and "spill files changed 0" not in out, out
    task = next(line for line in out.splitlines() if line.startswith("task "))
    assert task.startswith("task refused: the sealed weights (object "), task
    assert "were spilled to disk" in task and "content digest, computed from every byte, differs" in task, task
    assert "driver refused: the sealed weights" in out and "again refused: the sealed weights" in out, out
    assert "threads ['refused']" in out, out


def test_an_owner_that_does_not_answer_holds_up_only_its_own_objects():
    """Whether an object was spilled is asked of its owner. An owner that
    does not answer (its process stopped) held every load of the process
    for 10 s, a load of an object the driver owns too (one thread asked for
    all), and a load at exit failed (no new thread then). Now each question
    has its own thread, an object this process owns is answered from its
    own records, and a load waits 2 s for an answer and then hashes the
    copy instead; a load at exit asks as any other (or, where no thread
    can start any more, hashes)."""
    out = _run_script(
        """
        import atexit, logging, os, signal, sys, threading, time, ray, torch
        from ray_zerocopy import ActorWrapper, Owner

        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        owner = Owner("stopped")
        theirs = ActorWrapper(torch.nn.Linear(1024, 1024), owner=owner)
        ours = ActorWrapper(torch.nn.Linear(1024, 1024))
        pid = ray.get(owner._handle().__ray_call__.remote(lambda self: os.getpid()))
        done = []

        def load(name, w):
            w.load()
            done.append(name)

        os.kill(pid, signal.SIGSTOP)
        try:
            slow = threading.Thread(target=load, args=("theirs", theirs))
            slow.start()
            time.sleep(0.3)
            load("ours", ours)
            print("order while theirs waits", done)
            slow.join(60)
            print("order", done)
        finally:
            os.kill(pid, signal.SIGCONT)

        def at_exit():  # before Ray's own shutdown (atexit runs last registered first)
            del done[:]
            load("at exit", theirs)
            print("loaded", done)

        atexit.register(at_exit)
        """
    )
    assert "order while theirs waits ['ours']" in out and "order ['ours', 'theirs']" in out, out
    assert out.count("which Ray may have read back from disk") == 1, out  # theirs: no answer, so hashed
    assert "loaded ['at exit']" in out, out


def test_an_owner_copies_the_bytes_sealed_not_a_spilled_copy(tmp_path):
    """Where sealing goes through a copy that an Owner then copies (and
    owns), the sealer's object could be spilled, evicted and read back from
    a changed spill file between the two: the owner's object, never spilled
    itself, was then trusted by every load. The spill and the change are
    made in that window here (the owner's copy asked for only after them):
    the sealer now holds its object mapped while the owner copies it, so the
    owner reads the bytes sealed. (Without the hold, the loaded weight was
    the one written into the spill file.)"""
    out = _run_script(
        _spill_script(
            tmp_path,
            """
            from ray_zerocopy import ActorWrapper, Owner, _owner

            _store._put_in_place = lambda ray, nbytes, fill, owner=None: (None, "a copy, for this test")
            real_adopt = _owner.Owner._adopt

            def adopt(self, ref):  # in the window: the store fills, the object may be spilled; its file changed
                print("spill files changed", spill_and_change())
                return real_adopt(self, ref)

            _owner.Owner._adopt = adopt
            w = ActorWrapper(model, owner=Owner("adopt-test"))
            del filler[:]
            print("owner's copy, weight[0, 1000] =", float(w.load().weight[0, 1000]))
            """,
        )
    )
    assert "owner's copy, weight[0, 1000] = 1234.5677490234375" in out, out


def test_a_sealers_copy_read_back_changed_before_the_owner_copies_it_is_refused(tmp_path):
    """The window before the hold: the sealer's object spilled, evicted and
    read back from a changed file before the sealer maps it for the owner.
    What is held is then not what was put; the seal compares the two (the
    sealer owns the object, so whether it was spilled is its own record)
    and fails, naming why, rather than hand the owner changed weights."""
    out = _run_script(
        _spill_script(
            tmp_path,
            """
            from ray_zerocopy import ActorWrapper, Owner, SealedObjectCorruptedError

            _store._put_in_place = lambda ray, nbytes, fill, owner=None: (None, "a copy, for this test")
            real_adopted = _store._adopted

            def adopted(ray, owner, ref, source):  # before the hold: spilled, evicted, its file changed
                print("spill files changed", spill_and_change())
                return real_adopted(ray, owner, ref, source)

            _store._adopted = adopted
            try:
                ActorWrapper(model, owner=Owner("adopt-test"))
                print("sealed")
            except SealedObjectCorruptedError as e:
                print("refused:", e)
            """,
        )
    )
    assert "spill files changed 0" not in out and "refused: the object " in out, out
    assert "the copy read back is not what was put" in out, out


def test_several_nodes_one_copy_each():
    """Ray's multi-node test cluster on this machine: actors on every node
    load the model; each node maps its own single copy (one plasma file per
    node, shared by that node's actors); results are equal."""
    out = _run_script(
        """
        import ray, torch
        from ray.cluster_utils import Cluster
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from ray_zerocopy import ActorWrapper


        @ray.remote(num_cpus=0.25)
        class Probe:
            def __init__(self, wrapper):
                self.p = wrapper.load()

            def run(self, x):
                # The mapping backing the weights: (device, inode) of the
                # node's plasma file (unlinked after mapping, so no name).
                from ray_zerocopy.diagnostics import mapping_at

                m = mapping_at(self.p[0].weight.data_ptr())
                backing = (m.device, m.inode) if m is not None else None
                with torch.no_grad():
                    return ray.get_runtime_context().get_node_id(), backing, self.p(x)


        def main():
            torch.manual_seed(0)
            pipe = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 8))  # 4 MiB: in plasma
            w = ActorWrapper(pipe)
            nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            assert len(nodes) == 3, nodes
            probes = [
                Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(w)
                for n in nodes
                for _ in range(2)
            ]
            x = torch.randn(4, 1024)
            with torch.no_grad():
                expected = pipe(x)
            per_node = {}
            for node, backing, y in ray.get([p.run.remote(x) for p in probes]):
                assert torch.equal(y, expected)
                per_node.setdefault(node, set()).add(backing)
            assert len(per_node) == 3, per_node
            assert all(len(b) == 1 and None not in b for b in per_node.values()), per_node  # one copy per node
            assert len({next(iter(b)) for b in per_node.values()}) == 3, per_node  # a distinct copy on each node
            print("nodes", len(per_node))


        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
            cluster.wait_for_nodes()
            main()
        finally:
            ray.shutdown()
            cluster.shutdown()
        """
    )
    assert "nodes 3" in out


# -- 6. concurrency ----------------------------------------------------------
def test_threads_open_export_free_concurrently():
    data = np.arange(1 << 16, dtype=np.float32)
    buf = rzc.pack(
        [
            rzc.PackInput(f"t{i}", rzc.Dtype.F32, (1 << 14,), data.ctypes.data + (1 << 16) * i, 1 << 16)
            for i in range(4)
        ],
        guard_bytes=4096,
    )
    gc.collect()  # buffers earlier tests left in garbage cycles go now, not mid-test
    base = live_buffers()
    errors = []
    deadline = time.time() + 30

    def work(seed):
        try:
            for k in range(400):
                if time.time() > deadline:
                    return
                w = rzc.Weights.from_buffer(buf, write_protect=(k % 2 == 0))
                t = torch.from_dlpack(w.dlpack((seed + k) % 4))
                a = np.from_dlpack(w.dlpack(k % 4))
                assert float(t[0]) == float(((seed + k) % 4) << 14) and a.shape == (1 << 14,)
                del w, t, a
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert not errors, errors[:3]
    assert live_buffers() == base
    buf[-1] = 1  # every guard lifted: writable again
