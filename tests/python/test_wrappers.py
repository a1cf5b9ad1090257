"""ActorWrapper, TaskWrapper and the map_batches class on a real local Ray
cluster, with real torch models."""

import collections
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from models import Encoder, Pipeline, ids  # noqa: E402
from ray_zerocopy import ActorWrapper, TaskWrapper, UnsupportedDtypeError  # noqa: E402


def plasma_range(ray, wrapper):
    buf = ray.get(wrapper.object_ref)
    start = buf.__array_interface__["data"][0]
    return start, start + buf.nbytes


@pytest.mark.parametrize("fast", [False, True])
def test_pipeline_loads_zero_copy_and_equal(ray_cluster, fast):
    ray = ray_cluster
    pipe = Pipeline()
    w = ActorWrapper(pipe, device="cpu", use_fast_load=fast)
    loaded = w.load()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), pipe(x)), "outputs must be bit for bit equal"
        assert torch.equal(loaded.encode(x), pipe.encode(x))
    # Tied weights stay tied; every parameter is frozen; modules in eval mode.
    assert loaded.decoder.proj.weight is loaded.encoder.emb.weight
    params = list(loaded.encoder.parameters()) + list(loaded.heads["extra"][0].parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in params)
    assert not loaded.encoder.training and not loaded.heads["extra"][0].training
    # Pickled in eval mode (no walk at load); the caller's modules are untouched.
    assert pipe.heads["extra"][0].training and not w._sealed.needs_eval
    # Persistent and non-persistent buffers come back.
    assert torch.equal(loaded.encoder.norm.running_var, pipe.encoder.norm.running_var)
    assert float(loaded.encoder.scale) == 0.5
    assert loaded.config == pipe.config
    # Zero-copy: every tensor points into the sealed object in shared memory.
    lo, hi = plasma_range(ray, w)
    for t in list(loaded.encoder.parameters()) + list(loaded.encoder.buffers()):
        assert lo <= t.data_ptr() < hi
    # Tied weights are stored once.
    assert w.num_tensors == len({id(t) for t in _all_tensors(pipe)})


def _all_tensors(pipe):
    mods = [pipe.encoder, pipe.decoder, pipe.heads["extra"][0]]
    return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]


def test_wrapper_pickles_small(ray_cluster):
    w = ActorWrapper(Pipeline())
    size = len(ray_cluster.cloudpickle.dumps(w))
    assert size < 20_000, size


def test_plain_ray_actor(ray_cluster):
    ray = ray_cluster
    pipe = Pipeline()
    w = ActorWrapper(pipe, device="cpu")

    @ray.remote(num_cpus=0.5)
    class InferenceActor:
        def __init__(self, actor_wrapper):
            self.pipeline = actor_wrapper.load()

        def predict(self, data):
            with torch.no_grad():
                return self.pipeline(data)

    x = ids()
    actors = [InferenceActor.remote(w) for _ in range(2)]
    outs = ray.get([a.predict.remote(x) for a in actors])
    with torch.no_grad():
        expected = pipe(x)
    for out in outs:
        assert torch.equal(out, expected)


def test_ray_data_map_batches_with_actor_pool(ray_cluster):
    ray = ray_cluster
    from ray.data import ActorPoolStrategy

    pipe = Pipeline()
    w = ActorWrapper(pipe, device="cpu")

    class InferenceActor:
        def __init__(self, actor_wrapper):
            self.pipeline = actor_wrapper.load()

        def __call__(self, batch):
            with torch.no_grad():
                return {"id": batch["id"], "predictions": self.pipeline(torch.as_tensor(batch["data"])).numpy()}

    data = ids(n=40).numpy()
    ds = ray.data.from_items([{"id": i, "data": data[i]} for i in range(len(data))])
    out = ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={"actor_wrapper": w},
        batch_size=8,
        compute=ActorPoolStrategy(size=2),
        num_cpus=0.5,
    ).take_all()
    got = np.stack([r["predictions"] for r in sorted(out, key=lambda r: r["id"])])
    with torch.no_grad():
        expected = pipe(torch.as_tensor(data)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_as_udf(ray_cluster):
    ray = ray_cluster
    from ray.data import ActorPoolStrategy

    pipe = Pipeline()
    w = ActorWrapper(pipe)

    def predict(pipeline, batch):
        batch["y"] = pipeline.encode(torch.as_tensor(batch["data"])).numpy()
        return batch

    data = ids(n=16).numpy()
    ds = ray.data.from_items([{"i": i, "data": data[i]} for i in range(16)])
    out = ds.map_batches(w.as_udf(predict), batch_size=4, compute=ActorPoolStrategy(size=2), num_cpus=0.5).take_all()
    got = np.stack([r["y"] for r in sorted(out, key=lambda r: r["i"])])
    with torch.no_grad():
        np.testing.assert_array_equal(got, pipe.encode(torch.as_tensor(data)).numpy())


def test_task_wrapper_runs_and_reuses(ray_cluster):
    pipe = Pipeline()
    wrapped = TaskWrapper(pipe, device="cpu", num_cpus=1)
    x = ids()
    with torch.no_grad():
        assert torch.equal(wrapped(x), pipe(x))
        assert torch.equal(wrapped.encode(x), pipe.encode(x))
    # A worker that loaded the pipeline reuses that very object: 12 calls on
    # a 2-CPU cluster run on a few workers, each serving several of them from
    # one loaded pipeline.
    ray = ray_cluster
    seen, calls = {}, collections.Counter()
    for pid, obj in ray.get([wrapped.remote("whoami") for _ in range(12)]):
        assert seen.setdefault(pid, obj) == obj, "a worker rebuilt a pipeline it had loaded"
        calls[pid] += 1
    assert max(calls.values()) >= 2, f"no worker served two calls: {dict(calls)}"


def test_numpy_and_jax_pytrees(ray_cluster):
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "layers": [np.ones(4, np.int64)], "name": "m"}
    w = ActorWrapper(tree)
    out = w.load()
    assert out["name"] == "m" and isinstance(out["w"], np.ndarray)
    np.testing.assert_array_equal(out["w"], tree["w"])
    np.testing.assert_array_equal(out["layers"][0], tree["layers"][0])
    assert not out["w"].flags.writeable
    as_torch = w.load(framework="torch")
    assert torch.equal(as_torch["w"], torch.as_tensor(tree["w"]))

    jax = pytest.importorskip("jax")
    jtree = {"a": jax.numpy.arange(8.0), "b": {"c": jax.numpy.ones((2, 2), dtype=jax.numpy.bfloat16)}}
    jw = ActorWrapper(jtree)
    jout = jw.load()
    assert isinstance(jout["a"], jax.Array)
    np.testing.assert_array_equal(np.asarray(jout["a"]), np.asarray(jtree["a"]))
    assert jout["b"]["c"].dtype == jax.numpy.bfloat16
    assert isinstance(jw.load(framework="numpy")["a"], np.ndarray)


def _leaf(kind, i):
    """A leaf of framework ``kind`` whose values and dtype say which it is."""
    values = np.arange(10 * (i + 1), dtype=np.float64) + 100 * (i + 1)
    if kind == "numpy":
        return values.astype(np.float32)
    if kind == "torch":
        return torch.as_tensor(values, dtype=torch.bfloat16)
    import jax.numpy as jnp

    return jnp.asarray(values, dtype=jnp.int32)


@pytest.mark.parametrize("order", list(itertools.permutations(["numpy", "jax", "torch"])))
def test_mixed_pytrees_keep_each_leafs_values_and_dtype(ray_cluster, order):
    """numpy, JAX and torch leaves in any order each come back with their own
    values and dtype (a JAX leaf after a numpy one once came back with the
    numpy leaf's values)."""
    jax = pytest.importorskip("jax")
    tree = {f"{i}_{kind}": _leaf(kind, i) for i, kind in enumerate(order)}
    tree["nested"] = [_leaf(order[0], 3), {"x": _leaf(order[-1], 4)}]
    out = ActorWrapper(tree).load()
    expected = dict(tree, **{"nested.0": tree["nested"][0], "nested.1.x": tree["nested"][1]["x"]})
    got = dict(out, **{"nested.0": out["nested"][0], "nested.1.x": out["nested"][1]["x"]})
    for key in (k for k in expected if k != "nested"):
        a, b = got[key], expected[key]
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), key
        assert a.dtype == b.dtype, key
        assert np.array_equal(
            np.asarray(torch.as_tensor(a).float() if isinstance(a, torch.Tensor) else a, dtype=np.float64),
            np.asarray(torch.as_tensor(b).float() if isinstance(b, torch.Tensor) else b, dtype=np.float64),
        ), key


def test_the_wrapper_carries_no_table_of_its_own(ray_cluster):
    """Where tensors lie comes from the validated buffer alone: the wrapper
    carries the skeleton, each tensor's framework, the buffer's digest, the
    object reference and the options."""
    w = ActorWrapper(Pipeline())
    assert set(vars(w)) == {
        "device", "use_fast_load", "write_protect", "share_gpu", "_sealed", "_ref", "_share_key", "_owner", "_session"
    }
    assert set(vars(w._sealed)) == {
        "skeleton",
        "kinds",
        "modules",
        "nbytes",
        "content_digest",
        "needs_eval",
        "own",  # which references each loading process copies (indices, no places)
        "holds_modules",
    }


def test_a_buffer_that_is_not_the_wrappers_is_refused(ray_cluster):
    """A buffer with as many tensors but another table (here: other shapes)
    is an error at load, never tensors cut at the wrong places."""
    from ray_zerocopy import _load

    a = ActorWrapper({"x": np.zeros((4, 8), np.float32), "y": np.ones(3, np.float32)})
    b = ActorWrapper({"x": np.zeros((8, 4), np.float32), "y": np.ones(3, np.float32)})
    other = _load.open_sealed(b.object_ref, False, b.content_digest)
    with pytest.raises(RuntimeError, match="not the one this wrapper was sealed with"):
        _load.assemble(other, a._sealed)
    assert _load.assemble(other, b._sealed)["x"].shape == (8, 4)


def test_the_content_digest_covers_every_byte(ray_cluster):
    """The wrapper's content digest is the sealed buffer's, computed from
    every byte: the header claims the data's BLAKE3 digest, and reading the
    data again gives the same."""
    import hashlib

    from ray_zerocopy import _load

    values = np.arange(100_000, dtype=np.float32)
    w = ActorWrapper({"x": values})
    opened = _load.open_sealed(w.object_ref, False, w.content_digest)
    assert opened.content_digest(trust_claim=False) == opened.content_digest() == w.content_digest
    claimed = opened.metadata["rzc.data_blake3"]
    assert len(claimed) == 64 and claimed != "0" * 64
    patched = values.copy()
    patched[54_321] += 1  # one value, far from either end
    assert ActorWrapper({"x": patched}).content_digest != w.content_digest
    assert hashlib.sha256(w.content_digest).digest() != w.content_digest  # 32 bytes of its own


_CLUSTERS = textwrap.dedent(
    """
    import json, sys, numpy as np, ray
    from ray_zerocopy import ActorWrapper
    out = []
    for run in range(2):
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        a = ActorWrapper({"w": np.full(50_000, 1.0, np.float32)})
        b = ActorWrapper({"w": np.full(50_000, 2.0, np.float32)})  # same architecture, other values
        a2 = ActorWrapper({"w": np.full(50_000, 1.0, np.float32)})
        out.append({"a": a.share_key, "b": b.share_key, "a2": a2.share_key, "ref_a": a.object_ref.hex(),
                    "off": ActorWrapper({"w": np.ones(3, np.float32)}, share_gpu=False).share_key})
        ray.shutdown()
    print(json.dumps(out))
    """
)


def test_share_keys_follow_content_and_cluster(tmp_path):
    """Two clusters started one after the other on one machine (their object
    ids repeat), each wrapping two models of one architecture: every key
    differs except equal content in one cluster."""
    script = tmp_path / "clusters.py"
    script.write_text(_CLUSTERS)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = json.loads(run.stdout.strip().splitlines()[-1])
    assert first["a"] == first["a2"], "equal content in one cluster shares"
    assert first["a"] != first["b"], "different content never shares"
    assert first["a"] != second["a"], "equal content in another cluster does not"
    assert len({first["a"], first["b"], second["a"], second["b"]}) == 4
    assert first["off"] is None


def test_from_safetensors(ray_cluster, tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int32),
        "h": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "ckpt.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    w = ActorWrapper.from_safetensors(path)
    out = w.load()
    assert set(out) == set(tensors)
    for k in tensors:
        assert torch.equal(out[k], tensors[k])
    np.testing.assert_array_equal(w.load(framework="numpy")["w"], tensors["w"].numpy())
    jax = pytest.importorskip("jax")
    assert isinstance(w.load(framework="jax")["b"], jax.Array)


def test_clear_errors_at_wrap_time(ray_cluster, tmp_path):
    with pytest.raises(ValueError, match="not understood"):
        ActorWrapper(Pipeline(), device="gpu0")
    with pytest.raises(UnsupportedDtypeError, match="complex128"):
        ActorWrapper({"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(ValueError, match="no tensors"):
        ActorWrapper(torch.nn.ReLU())
    with pytest.raises(ValueError, match="meta device"):
        with torch.device("meta"):
            m = torch.nn.Linear(2, 2)
        ActorWrapper(m)

    class Holder:
        def __init__(self):
            self.model = Encoder()
            self.lock = threading.Lock()

    with pytest.raises(TypeError, match="cannot be pickled"):
        ActorWrapper(Holder())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="runs past the end"):
        ActorWrapper.from_safetensors(bad)
    with pytest.raises(ValueError, match="framework"):
        ActorWrapper(Pipeline()).load(framework="tf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_request_without_cuda_says_what_to_do(ray_cluster):
    w = ActorWrapper(Pipeline(), device="cuda:0")  # wrapping on a CPU driver is fine
    with pytest.raises(RuntimeError, match="no CUDA device.*num_gpus=1"):
        w.load()
    assert w.load(device="cpu") is not None


_BEFORE_INIT = textwrap.dedent(
    """
    import numpy as np
    import ray
    import ray_zerocopy
    from ray_zerocopy import ActorWrapper

    try:
        w = ActorWrapper({"a": np.arange(3.0)})
    except ray_zerocopy.RayNotInitializedError as e:
        print("ERR", e)
        raise SystemExit(0)
    print("STARTED", ray.is_initialized())
    print("LOADED", ray.get(ray.remote(lambda w: w.load()["a"].tolist()).remote(w)))
    ray_zerocopy.publish("before-init", w)
    print("PUBLISHED", ray_zerocopy.versions())
    ray.shutdown()
    """
)


@pytest.mark.parametrize("auto", ["", "0"], ids=["auto-connect", "no-auto-connect"])
def test_a_wrapper_made_before_ray_init_starts_ray_as_ray_does(auto):
    """As ``ray.put`` does, a first wrapper (or publish) before ``ray.init()``
    starts a local Ray (the usage guide's examples call no ``ray.init()``);
    with ``RAY_ENABLE_AUTO_CONNECT=0`` it says what to call instead."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_AUTO_CONNECT=auto)
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", _BEFORE_INIT], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    if auto == "0":
        assert "ERR ray.init() has not been called (and RAY_ENABLE_AUTO_CONNECT=0" in run.stdout, run.stdout
    else:
        lines = run.stdout.splitlines()
        assert "STARTED True" in lines and "LOADED [0.0, 1.0, 2.0]" in lines, run.stdout
        assert "PUBLISHED {'before-init': 1}" in lines, run.stdout


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def test_sealing_packs_straight_into_the_object_store(ray_cluster):
    """The driver writes the sealed buffer into the object store itself: its
    peak memory grows by one copy of the weights (the store's), not two (a
    packed buffer plus the store's copy of it)."""
    nbytes = 192 * 2**20  # well above the ~35 MiB Ray itself adds to a put
    tree = {"w": torch.randn(nbytes // 4)}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak RSS
    base = _status_kib("VmHWM") * 1024
    w = ActorWrapper(tree)
    grew = _status_kib("VmHWM") * 1024 - base
    assert grew < 1.5 * nbytes, f"sealing grew the driver by {grew / nbytes:.2f} x the weights"
    assert torch.equal(w.load()["w"], tree["w"])


@pytest.mark.parametrize("huge_zero_page", [True, False])
def test_the_zeros_an_object_is_created_from_cost_no_memory(monkeypatch, huge_zero_page):
    """Ray creates the object that sealing fills from a read-only view of
    zeros: reading every byte of it, as Ray's copy does, allocates no memory,
    whether the kernel's huge zero page or its 4 KiB one backs it."""
    from ray_zerocopy import _store

    if huge_zero_page and not _store._huge_zero_page():
        pytest.skip("this kernel has no huge zero page")
    monkeypatch.setattr(_store, "_huge_zero_page", lambda: huge_zero_page)
    nbytes = 256 << 20
    before = _status_kib("RssAnon")
    zeros, view = _store.zero_view(nbytes)
    try:
        assert view.nbytes == nbytes and not view.flags.writeable
        assert not view.any()  # every byte read
        grew = (_status_kib("RssAnon") - before) * 1024
    finally:
        del view
        zeros.close()
    assert grew < nbytes // 16, f"reading the zeros allocated {grew >> 20} MiB"


def test_seal_and_load_each_log_one_info_line_and_record_metrics(ray_cluster, caplog, monkeypatch):
    from ray_zerocopy import _telemetry

    metrics = _telemetry._ray_metrics()
    assert metrics and [type(m).__name__ for m in metrics] == ["Histogram", "Counter"], metrics
    recorded = []

    def spy(metric, method):
        real = getattr(metric, method)
        monkeypatch.setattr(metric, method, lambda *a, **k: (recorded.append((method, a, k)), real(*a, **k)))

    spy(metrics[0], "observe")
    spy(metrics[1], "inc")
    tree = {"w": torch.arange(1000, dtype=torch.float32)}
    with caplog.at_level("INFO", logger="ray_zerocopy"):
        w = ActorWrapper(tree)
        assert torch.equal(w.load()["w"], tree["w"])
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("sealed 1 tensors, 0.0 MiB, in ") and lines[0].endswith(
        f"as object {w.object_ref.hex()}"
    ), lines
    assert lines[1].startswith("loaded 1 tensors on cpu: zero-copy, write-protected, in ") and lines[1].endswith(
        " ms"
    ), lines
    assert [r[0] for r in recorded] == ["inc", "observe"], recorded
    assert recorded[0][1] == (w._sealed.nbytes,) and recorded[1][2] == {
        "tags": {"device": "cpu", "mode": "zero-copy"}
    }, recorded
    # A metric that fails never fails the load.
    monkeypatch.setattr(metrics[0], "observe", lambda *a, **k: 1 / 0)
    assert torch.equal(w.load()["w"], tree["w"])


@pytest.mark.parametrize(
    "sharing, expected",
    [
        ("uploaded", "uploaded 2.0 MiB at 1.0 GB/s (registered staging, shared), host copy write-protected"),
        ("private", "uploaded 2.0 MiB at 1.0 GB/s (registered staging), host copy write-protected"),
        ("imported", "mapped the device copy another process uploaded (no copy), host copy write-protected"),
    ],
)
def test_the_load_line_of_a_gpu_load_says_how_the_device_copy_came(caplog, sharing, expected):
    from ray_zerocopy import _telemetry

    info = {"sharing": sharing, "nbytes": 2 * 2**20, "seconds": 2 * 2**20 / 1e9, "staging": "registered"}
    with caplog.at_level("INFO", logger="ray_zerocopy"):
        _telemetry.loaded("cuda:0", 3, 0.0123, True, info)
    assert [r.getMessage() for r in caplog.records] == [f"loaded 3 tensors on cuda:0: {expected}, in 12.3 ms"]


def test_sealing_through_a_copy_warns_and_still_seals(ray_cluster, caplog, monkeypatch):
    from ray_zerocopy import _store

    monkeypatch.setattr(_store, "_shared_writable", lambda addr, nbytes: False)
    tree = {"w": torch.randn(2**20)}
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        w = ActorWrapper(tree)
    assert [r.getMessage() for r in caplog.records] == [
        "sealing through a copy, the weights held twice while sealing: "
        "the object store is not mapped as writable shared memory here"
    ]
    assert torch.equal(w.load()["w"], tree["w"])


def test_an_object_the_store_may_have_spilled_half_filled_is_put_again_whole(ray_cluster, monkeypatch, caplog):
    """Sealing fills an object after Ray made it; a store above its spilling
    threshold could spill it before the fill (no process held it for a
    moment), the copy on disk zeros: once the filled copy in memory was
    evicted, a load restored zeros, and the model was lost (1 seal in 16
    under a full store). The store's usage and spill count are read around
    the fill: near the threshold before, the seal takes the copy; a spill
    during it, and the filled object is put again whole. Both load, here and
    in a task. (The store's figures are given: a real spill in that moment
    cannot be timed in a test.)"""
    ray = ray_cluster
    from ray_zerocopy import _store

    tree = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB: filled in place
    capacity = 1 << 30

    @ray.remote
    def total(w):
        return float(w.load()["w"].sum())

    cases = {
        "spilled objects while it was filled": [(0, capacity, 0), (8 << 20, capacity, 1)],
        "near its spilling threshold": [(int(0.799 * capacity), capacity, 0)],
        "usage cannot be read": [None],
    }
    for why, states in cases.items():
        states = iter(states)
        monkeypatch.setattr(_store, "_store_state", lambda ray, s=states: next(s))
        caplog.clear()
        with caplog.at_level("WARNING", logger="ray_zerocopy"):
            w = ActorWrapper(tree)
        assert why in caplog.text, (why, caplog.text)
        assert torch.equal(w.load()["w"], tree["w"])
        assert ray.get(total.remote(w)) == float(tree["w"].sum())
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        w = ActorWrapper(tree)  # a store with room: filled in place, no word
    assert "ray_zerocopy" not in caplog.text and torch.equal(w.load()["w"], tree["w"])


def test_a_wrapper_pickled_without_ray_says_so_instead_of_waiting_for_ever(ray_cluster):
    """Pickled by ``pickle`` (or the cloudpickle package) instead of Ray, a
    wrapper's object reference loses where its owner is: loaded in another
    process, ``ray.get`` waited for ever, the owner alive. It says why now,
    and what to do; the process that owns the object loads it as before."""
    import pickle

    ray = ray_cluster
    from ray_zerocopy import SealedObjectLostError

    w = ActorWrapper({"w": torch.arange(1 << 18, dtype=torch.float32)})
    blob = pickle.dumps(w)
    assert torch.equal(pickle.loads(blob).load()["w"], w.load()["w"])

    @ray.remote
    def load(blob):
        try:
            return float(pickle.loads(blob).load()["w"].sum())
        except SealedObjectLostError as e:
            return str(e)

    said = ray.get(load.remote(blob), timeout=120)
    assert isinstance(said, str) and "ray.cloudpickle" in said, said
    assert ray.get(load.remote(ray.cloudpickle.dumps(w)), timeout=120) == float(w.load()["w"].sum())
