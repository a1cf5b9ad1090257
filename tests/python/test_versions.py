"""Versions published under a name: a real local Ray cluster, real actors and
a real Ray Serve application over HTTP on localhost. A new version reaches
running actors without a restart; no request fails or mixes two versions;
the old version's objects are freed once no one holds them."""

import gc
import json
import os
import signal
import threading
import time
import urllib.request

import pytest

torch = pytest.importorskip("torch")
serve = pytest.importorskip("ray.serve")

import ray_zerocopy as rzc  # noqa: E402
from ports import free_port  # noqa: E402
from ray_zerocopy import ActorWrapper, InvalidInputError, Subscription, VersionNotFoundError  # noqa: E402

DIM = 256


def model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.ReLU(), torch.nn.Linear(DIM, 4)).eval()


def answer(m, x) -> list:
    with torch.no_grad():
        return m(x).tolist()


def objects_listed() -> str:
    """Ray's table of every object some process of this cluster references
    (``ray memory``), of this cluster only."""
    import ray
    from ray._private.internal_api import memory_summary

    return memory_summary(address=ray.get_runtime_context().gcs_address, units="B", num_entries=100000)


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


class Server:
    """An actor that answers with the newest version, and names it."""

    def __init__(self, name):
        self.sub = Subscription(name)

    def run(self, x):
        v = self.sub.current()
        return v.number, answer(v.pipeline, x)

    def version(self):
        return self.sub.version


def test_a_registry_made_by_an_earlier_version_finds_its_class():
    """Ray keeps a detached actor's class by its import path and imports it
    again where it restarts the actor: registries made before the registry
    had a module of its own name ``ray_zerocopy._versions._Registry``, and
    one restarted after an upgrade must find its class there (without it,
    Ray makes a stand-in whose every method fails, and every publish and
    load of a version failed until someone killed the registry)."""
    import pickle

    from ray_zerocopy import _registry

    by_old_path = b"cray_zerocopy._versions\n_Registry\n."  # a class pickled by reference, as Ray keeps it
    assert pickle.loads(by_old_path) is _registry.Registry


def test_publish_and_latest(ray_cluster):
    ray = ray_cluster
    name = "test-publish-and-latest"
    with pytest.raises(VersionNotFoundError, match=name):
        rzc.latest(name)
    v1, v2 = model(1), model(2)
    assert rzc.publish(name, ActorWrapper(v1)) == 1
    assert rzc.publish(name, ActorWrapper(v2)) == 2
    assert rzc.versions()[name] == 2
    x = torch.randn(3, DIM)
    assert answer(rzc.latest(name).load(), x) == answer(v2, x)

    @ray.remote
    def in_a_task(name, x):
        return answer(rzc.latest(name).load(), x)

    assert ray.get(in_a_task.remote(name, x)) == answer(v2, x)
    with pytest.raises(rzc.InvalidInputError):
        rzc.publish("", ActorWrapper(v1))
    with pytest.raises(rzc.InvalidInputError, match="ActorWrapper"):
        rzc.publish(name, v1)


def test_publish_replaces_only_the_version_it_was_made_from(ray_cluster):
    """Two publishers update version 1: the second, told which version its
    update replaces, is refused (its change would silently drop the
    first's), nothing changes, and it publishes once it replaces the newest."""
    from ray_zerocopy import VersionConflictError

    name = "test-replaces"
    v1, v2, v3 = model(1), model(2), model(3)
    assert rzc.publish(name, ActorWrapper(v1), replaces=0) == 1
    assert rzc.publish(name, ActorWrapper(v2), replaces=1) == 2
    late = ActorWrapper(v3)
    with pytest.raises(VersionConflictError, match="version 2 is the newest, not version 1"):
        rzc.publish(name, late, replaces=1)
    with pytest.raises(VersionConflictError, match="version 2 is the newest, not version 0"):
        rzc.publish(name, late, replaces=0)
    assert rzc.versions()[name] == 2
    x = torch.randn(2, DIM)
    newest = rzc.latest(name)  # with its number, read in the same call
    assert newest.version == 2 and torch.allclose(newest.load()(x), v2(x))
    assert newest.update(v3).version is None, "a version made from it is not published yet"
    assert rzc.publish(name, late, replaces=newest.version) == 3
    assert torch.allclose(rzc.latest(name).load()(x), v3(x))
    assert rzc.publish(name, ActorWrapper(v1)) == 4, "without replaces: whatever is newest"
    for bad in (-1, "2", True):
        with pytest.raises(InvalidInputError):
            rzc.publish(name, late, replaces=bad)
    rzc.unpublish(name)


def cyclic(m):
    """``m`` holding its own bound method: a reference cycle, freed by a
    full garbage collection only."""
    m.act = m.forward
    return m


@pytest.mark.parametrize("make", [model, lambda seed: cyclic(model(seed))], ids=["plain", "cycle"])
def test_an_actor_follows_new_versions_and_the_old_one_is_freed(ray_cluster, make):
    """The version replaced is freed once no request holds it; a model in a
    reference cycle too: the subscriber collects it. (A load moves what it
    makes to the oldest generation, where full collections are rare: each
    replaced version of such a model kept its object in the store, one more
    with every publish.)"""
    ray = ray_cluster
    name = f"test-follow-{make is model}"

    v1, v2 = make(1), make(2)
    x = torch.randn(2, DIM)
    w1 = ActorWrapper(v1)
    rzc.publish(name, w1)
    server = ray.remote(num_cpus=0)(Server).remote(name)
    assert ray.get(server.run.remote(x)) == (1, answer(v1, x))
    rzc.publish(name, ActorWrapper(v2))
    seen = wait_for(lambda: (r := ray.get(server.run.remote(x)))[0] == 2 and r, "the actor to load version 2")
    assert seen == (2, answer(v2, x))
    # Version 1 is held by no one now but this driver, its owner: once it
    # lets go, the object goes, with no garbage collection needed here.
    old = w1.object_ref.hex()
    assert old in objects_listed()
    del w1
    gc.disable()
    try:
        wait_for(lambda: old not in objects_listed(), "version 1's object to be freed")
    finally:
        gc.enable()
    ray.kill(server)


def post(port: int, route: str, body: dict, headers=None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VersionedService:
    def __init__(self, name):
        import os

        self.sub = Subscription(name)
        self.pid = os.getpid()

    async def __call__(self, request):
        x = torch.tensor((await request.json())["x"])
        v = self.sub.current()  # one version for the whole request
        return {"version": v.number, "y": answer(v.pipeline, x), "pid": self.pid}


def test_a_served_model_is_updated_without_a_failed_or_mixed_request(ray_cluster):
    name = "test-serve-update"
    versions = {1: model(1), 2: model(2)}
    x = torch.randn(2, DIM)
    expected = {n: answer(m, x) for n, m in versions.items()}
    rzc.publish(name, ActorWrapper(versions[1]))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results, errors, stop = [], [], threading.Event()

    def requests():
        while not stop.is_set():
            try:
                results.append((time.monotonic(), post(port, "/versioned", {"x": x.tolist()})))
            except Exception as e:  # every failure counts
                errors.append(repr(e))

    loop = threading.Thread(target=requests)
    try:
        serve.run(VersionedService.options(num_replicas=2).bind(name), name="versioned", route_prefix="/versioned")
        loop.start()
        wait_for(lambda: len({r["pid"] for _, r in results}) == 2, "both replicas to answer")
        published = time.monotonic()
        rzc.publish(name, ActorWrapper(versions[2]))

        def converged():
            newest = {r["pid"]: r["version"] for _, r in list(results)}
            return len(newest) == 2 and set(newest.values()) == {2}

        wait_for(converged, "every replica to serve version 2")
        first_v2 = {}
        for t, r in list(results):
            if r["version"] == 2:
                first_v2.setdefault(r["pid"], t)
        converge_s = max(first_v2.values()) - published
    finally:
        stop.set()
        if loop.is_alive():
            loop.join(timeout=120)
        serve.delete("versioned")
        serve.shutdown()
    assert not errors, f"{len(errors)} requests failed: {errors[:3]}"
    mixed = [r for _, r in results if r["y"] != expected[r["version"]]]
    assert not mixed, f"{len(mixed)} of {len(results)} answers do not match the version they name"
    assert {r["version"] for _, r in results} == {1, 2}
    assert converge_s < 30, converge_s


def test_publish_lets_the_owner_go_of_what_only_old_versions_used(ray_cluster):
    """Owned by an Owner, a delta only a replaced version used is released
    on publish and freed once the subscriber has moved on; the base that the
    newest version still uses stays."""
    ray = ray_cluster
    name = "test-owner-versions"
    owner = rzc.Owner("test-versions")

    try:
        base = model(1)
        v1 = ActorWrapper(base, owner=owner)
        tuned = model(1)
        with torch.no_grad():
            tuned[2].weight.add_(1.0)
        v2 = v1.update(tuned)
        assert v2.owner == owner and len(v2.object_refs) == 2
        rzc.publish(name, v2)
        server = ray.remote(num_cpus=0)(Server).remote(name)
        assert ray.get(server.version.remote()) == 1
        delta = v2.object_ref.hex()
        assert delta in owner.objects()
        v3 = v1.update(model(1))  # back to the base: an empty delta
        del v2
        rzc.publish(name, v3)
        wait_for(lambda: ray.get(server.version.remote()) == 2, "the subscriber to load version 2")
        assert delta not in owner.objects(), "publish released the replaced delta"
        wait_for(lambda: delta not in objects_listed(), "the replaced delta to be freed")
        assert v1.object_ref.hex() in objects_listed()
        ray.kill(server)
    finally:
        owner.close()


def test_an_owned_version_that_never_left_this_process_is_released_when_dropped(ray_cluster):
    """An owner keeps what it owns for other processes; an update sealed
    with one and never sent anywhere (its publish lost a race, a candidate
    that failed a check) stayed in the store until ``owner.close()``, one
    more with each retry. Dropped here, it is released as an object
    without an owner is freed; one sent to an actor, published, or that a
    sent or published version was made from, stays with the owner."""
    ray = ray_cluster
    name = "test-owner-candidates"
    owner = rzc.Owner("test-candidates")

    def tuned(k):
        m = model(1)
        with torch.no_grad():
            m[2].weight.add_(float(k))
        return m

    try:
        base = ActorWrapper(model(1), owner=owner)
        assert rzc.publish(name, base, replaces=0) == 1
        kept = {base.object_ref.hex()}
        for k in range(1, 4):  # a publisher that keeps losing the race, retrying with a new update
            candidate = base.update(tuned(k))
            with pytest.raises(rzc.VersionConflictError):
                rzc.publish(name, candidate, replaces=0)
            hex_id = candidate._ref.hex()
            assert hex_id in owner.objects()
            del candidate
            gc.collect()
            assert hex_id not in owner.objects(), "a candidate no one else has stays with the owner"
        wait_for(lambda: hex_id not in objects_listed(), "the dropped candidate to be freed")

        sent = base.update(tuned(5))
        ray.get(ray.remote(num_cpus=0)(lambda w: w.num_tensors).remote(sent))  # pickled to a worker
        kept.add(sent._ref.hex())
        first = base.update(tuned(6))
        second = first.update(tuned(7))  # made from first: first's delta is one of its parts
        assert rzc.publish(name, second, replaces=1) == 2
        kept |= {first._ref.hex(), second._ref.hex()}
        del sent, first, second
        gc.collect()
        assert kept <= set(owner.objects())
        x = torch.randn(2, DIM)
        assert answer(rzc.latest(name).load(), x) == answer(tuned(7), x)
    finally:
        owner.close()


class _Batches:
    """Counts the batches a Ray Data job has computed (a named actor)."""

    def __init__(self):
        self.n = 0

    def done(self):
        self.n += 1

    def count(self):
        return self.n


class Infer:
    """A Ray Data UDF that follows the newest version, one per batch."""

    def __init__(self, name, counter):
        self.sub, self.counter, self.batches = Subscription(name), counter, 0

    def __call__(self, batch):
        import numpy as np

        self.batches += 1
        if self.batches == 5:
            # The test publishes version 2 after a few batches; this actor
            # goes on only once it has it, so the job cannot end first.
            deadline = time.monotonic() + 120
            while self.sub.version < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        v = self.sub.current()  # one version for the whole batch
        y = answer(v.pipeline, torch.tensor(batch["x"]))
        time.sleep(0.02)  # a batch takes a while, as real inference does
        self.counter.done.remote()
        return {"x": batch["x"], "version": np.full(len(y), v.number), "y": np.array(y)}


def test_a_ray_data_job_picks_up_a_new_version_mid_job(ray_cluster):
    import numpy as np
    import ray.data
    from ray.data import ActorPoolStrategy

    ray = ray_cluster
    name = "test-ray-data"
    versions = {1: model(1), 2: model(2)}
    rzc.publish(name, ActorWrapper(versions[1]))
    counter = ray.remote(_Batches).options(num_cpus=0).remote()
    rows = [{"x": np.random.default_rng(i).standard_normal(DIM).astype(np.float32)} for i in range(400)]
    ds = ray.data.from_items(rows).map_batches(
        Infer, fn_constructor_kwargs={"name": name, "counter": counter}, batch_size=2,
        compute=ActorPoolStrategy(size=2), num_cpus=0.5,
    )
    out = []
    job = threading.Thread(target=lambda: out.extend(ds.iter_rows()))
    job.start()
    wait_for(lambda: ray.get(counter.count.remote()) >= 5, "the job to compute a few batches")
    rzc.publish(name, ActorWrapper(versions[2]))
    job.join(timeout=600)
    assert not job.is_alive() and len(out) == len(rows)
    seen = {int(r["version"]) for r in out}
    assert seen == {1, 2}, f"versions seen: {seen}"
    # Each row computed by the version it names, whole (a mixed batch would
    # match neither); batches of other sizes round differently, hence close.
    for number, m in versions.items():
        mine = [r for r in out if int(r["version"]) == number]
        x = torch.tensor(np.stack([r["x"] for r in mine]))
        y = np.stack([r["y"] for r in mine])
        assert np.allclose(y, np.array(answer(m, x)), rtol=1e-5, atol=1e-6), f"rows of version {number}"
    ray.kill(counter)


def test_a_subscription_closed_or_dropped_stops_following(ray_cluster):
    ray = ray_cluster
    name = "test-close"
    rzc.publish(name, ActorWrapper(model(1)))

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, name):
            self.closed, self.dropped = Subscription(name), Subscription(name)

        def close_and_drop(self):
            self.closed.close()
            self.dropped = None

        def state(self):
            followers = [t for t in threading.enumerate() if t.name.startswith("rzc-versions-")]
            return self.closed.version, len(followers)

    holder = Holder.remote(name)
    assert ray.get(holder.state.remote()) == (1, 2)
    ray.get(holder.close_and_drop.remote())
    wait_for(lambda: ray.get(holder.state.remote())[1] == 0, "both followers to end")
    rzc.publish(name, ActorWrapper(model(2)))
    time.sleep(1.0)  # a follower would have loaded version 2 well within this
    assert ray.get(holder.state.remote()) == (1, 0)
    ray.kill(holder)


class _Flaky:
    """An actor following ``name`` whose loads fail, once each, on the
    calls numbered in ``failing`` (1 is the first version's load)."""

    def __init__(self, name, failing):
        self.calls = 0

        def load(wrapper):
            self.calls += 1
            if self.calls in failing:
                raise RuntimeError("out of memory (a passing failure)")
            return wrapper.load()

        self.sub = Subscription(name, load=load)

    def state(self):
        return self.sub.version, self.calls

    def generation(self):
        """The registry generation the subscription's version is of."""
        return self.sub._generation


def test_a_version_that_failed_to_load_is_tried_again(ray_cluster):
    """A load that fails once or twice (device memory while two versions
    are resident, a fetch that timed out) must not leave the replica on the
    old version until the next publish: it is tried again, 1 s then 2 s
    later, and the replica takes the new version."""
    ray = ray_cluster
    name = "test-retry"
    rzc.publish(name, ActorWrapper(model(1)))

    flaky = ray.remote(num_cpus=0)(_Flaky).remote(name, (2, 3))  # the first two tries of version 2
    assert ray.get(flaky.state.remote()) == (1, 1)
    rzc.publish(name, ActorWrapper(model(2)))
    wait_for(lambda: ray.get(flaky.state.remote())[0] == 2, "version 2 after two failed tries", timeout=30)
    assert ray.get(flaky.state.remote()) == (2, 4)
    ray.kill(flaky)


def _registry_generation(ray, make: bool = False):
    """The generation of the registry's actor now (``None`` while there is
    none, or it does not answer in 10 s). ``make``: where there is none,
    this process makes one, without calling it (its recovery starts with
    its first call)."""
    try:
        if make:
            rzc._registry._handle = None  # not the handle of one killed
            handle = rzc._registry.handle()
        else:
            handle = ray.get_actor("ray_zerocopy.versions", namespace="ray_zerocopy")
        return ray.get(handle.__ray_call__.remote(lambda self: self._generation), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return None


def _registry_killed(ray, restart: bool) -> None:
    """Kills the registry's actor: for good (a new one is made here) or as a
    crash (Ray restarts it); returns once a new one runs, not yet called.
    Its start (seconds on a busy machine) is over, so that a test can time
    what the new registry does on its first call. (The kill takes effect a
    little later: until then the old one answers.)"""
    before = wait_for(lambda: _registry_generation(ray), "the registry's generation")
    ray.kill(ray.get_actor("ray_zerocopy.versions", namespace="ray_zerocopy"), no_restart=not restart)
    wait_for(lambda: _registry_generation(ray, make=True) not in (None, before), "a new registry's actor")


def _registry_gone(ray, restart: bool) -> None:
    """:func:`_registry_killed`, then the new registry's first call
    answered (its table taken back)."""
    _registry_killed(ray, restart)
    _until_the_registry_answers(lambda: rzc.versions())


def _made_again(name: str, before):
    """The entry of ``name`` from a registry other than generation ``before``
    (``ray.kill`` takes effect a little later: until then the old registry
    answers)."""

    def made_again():
        entry = _until_the_registry_answers(lambda: rzc._versions._entry(name, 0, None, 0.0))
        return entry[4] != before and entry

    return wait_for(made_again, "a new registry")


def _until_the_registry_answers(call):
    deadline = time.monotonic() + 60
    while True:  # the first calls after the death may find the dead or restarting actor
        try:
            return call()
        except rzc.RegistryUnavailableError:
            assert time.monotonic() < deadline, "the registry was not made again within 60 s"
            time.sleep(0.1)


def test_a_registry_that_died_is_made_again_and_subscribers_start_over(ray_cluster):
    ray = ray_cluster
    name = "test-registry-restart"
    rzc.publish(name, ActorWrapper(model(1)))
    rzc.publish(name, ActorWrapper(model(2)))

    server = ray.remote(num_cpus=0)(Server).remote(name)
    x = torch.randn(2, DIM)
    assert ray.get(server.run.remote(x))[0] == 2
    _registry_gone(ray, restart=False)
    wrapper = ActorWrapper(model(3))
    # A name published without an owner is not taken back, but its number
    # is: the new registry numbers on.
    assert _until_the_registry_answers(lambda: rzc.publish(name, wrapper)) == 3
    # The subscriber had version 2 of the old registry: it takes version 3
    # of the new one (a registry of another generation: it compares).
    got = wait_for(lambda: (r := ray.get(server.run.remote(x)))[1] == answer(model(3), x) and r, "the new version 3")
    assert got[0] == 3
    ray.kill(server)


def test_a_process_that_knew_a_registry_killed_since_reads_from_the_new_one(ray_cluster):
    """A process keeps the registry's handle: after the registry was killed
    and made again by another process, its first read failed (an actor made
    then, in a worker that had served an earlier task, failed to make its
    Subscription). A read is made once more on the registry there is now;
    a publish still says the registry it knew is gone (it may have run)."""
    ray = ray_cluster
    rzc.publish("test-known", ActorWrapper(model(1)))

    @ray.remote(num_cpus=0)
    class Reader:
        def read(self):
            return rzc.versions()["test-known"]

    reader = Reader.remote()
    assert ray.get(reader.read.remote()) == 1
    _registry_gone(ray, restart=False)  # made again by this process
    rzc.publish("test-known", ActorWrapper(model(2)))
    assert ray.get(reader.read.remote()) == 2
    ray.kill(reader)


def test_a_failed_version_of_a_registry_made_again_is_tried_again(ray_cluster):
    """The subscriber holds version 2 of a registry that died; the new
    registry's first version (3) fails to load once. It is tried again and
    taken: the retry asks the new registry, of its own generation."""
    ray = ray_cluster
    name = "test-retry-restart"
    rzc.publish(name, ActorWrapper(model(1)))
    rzc.publish(name, ActorWrapper(model(2)))

    flaky = ray.remote(num_cpus=0)(_Flaky).remote(name, (2,))  # the new registry's first version, first try
    assert ray.get(flaky.state.remote()) == (2, 1)
    _registry_gone(ray, restart=False)
    wrapper = ActorWrapper(model(3))
    assert _until_the_registry_answers(lambda: rzc.publish(name, wrapper)) == 3
    wait_for(lambda: ray.get(flaky.state.remote()) == (3, 3), "the new version 3, on its second try", timeout=30)
    ray.kill(flaky)


@pytest.mark.parametrize("restart", [False, True], ids=["killed", "restarted"])
def test_a_registry_made_again_takes_back_what_owners_hold(ray_cluster, restart):
    """A replica that starts after the registry died must still find the
    newest version of a name published with an Owner, numbered as before;
    a subscriber holding it keeps it without loading it again, and follows
    the next version. A name published without an owner is gone."""
    ray = ray_cluster
    name, plain = f"test-recover-{restart}", f"test-recover-plain-{restart}"
    owner = rzc.Owner(f"test-recover-{restart}")
    try:
        rzc.publish(name, ActorWrapper(model(1), owner=owner))
        rzc.publish(name, ActorWrapper(model(2), owner=owner))
        rzc.publish(plain, ActorWrapper(model(1)))
        follower = ray.remote(num_cpus=0)(_Flaky).remote(name, ())
        assert ray.get(follower.state.remote()) == (2, 1)
        before = ray.get(follower.generation.remote())

        _registry_gone(ray, restart)

        assert _made_again(name, before)[0] == 2
        known = rzc.versions()
        assert known[name] == 2 and plain not in known
        x = torch.randn(2, DIM)
        assert answer(rzc.latest(name).load(), x) == answer(model(2), x)
        # The follower notices the new registry, and keeps what it has.
        wait_for(lambda: ray.get(follower.generation.remote()) != before, "the follower to meet the new registry")
        assert ray.get(follower.state.remote()) == (2, 1)
        assert rzc.publish(name, ActorWrapper(model(3), owner=owner), replaces=2) == 3
        wait_for(lambda: ray.get(follower.state.remote()) == (3, 2), "the follower to load version 3")
        ray.kill(follower)
    finally:
        owner.close()


def test_a_record_a_forget_missed_is_never_taken_back(ray_cluster):
    """An owner that was unreachable when a newer version (of another owner,
    or of none) replaced its own keeps a stale record. A registry made again
    must not take it back (replicas would go back to the older version, and
    its objects would stay held): only the record of each name's newest
    publish counts, a stale one is told to go, and a name whose newest
    version had no owner numbers on."""
    ray = ray_cluster
    alone, other = "test-stale-alone", "test-stale-other"
    old_owner, new_owner = rzc.Owner("test-stale-old"), rzc.Owner("test-stale-new")
    try:
        for name in (alone, other):
            rzc.publish(name, ActorWrapper(model(1), owner=old_owner))
        planted = dict(old_owner._call("records"))
        rzc.publish(alone, ActorWrapper(model(2)))
        rzc.publish(other, ActorWrapper(model(2), owner=new_owner))
        wait_for(lambda: old_owner._call("records") == [], "the replaced owner to forget (not waited for)")
        for name, record in planted.items():  # as if each forget had missed
            old_owner._call("remember", name, record)
        before = rzc._versions._entry(other, 0, None, 0.0)[4]

        _registry_gone(ray, restart=False)

        entry = _made_again(other, before)
        x = torch.randn(2, DIM)
        assert entry[0] == 2 and answer(rzc.latest(other).load(), x) == answer(model(2), x)
        assert alone not in rzc.versions()
        wait_for(lambda: old_owner._call("records") == [], "the stale records to be told to go")
        assert rzc.publish(alone, ActorWrapper(model(3)), replaces=2) == 3
    finally:
        old_owner.close()
        new_owner.close()


def _pid(owner) -> int:
    import ray

    return ray.get(owner._handle().__ray_call__.remote(lambda self: os.getpid()))


def _within(seconds: float, call, what: str):
    """``call()``, which must return within ``seconds`` (it may hang: it
    runs on a thread of its own, so that the test fails instead)."""
    result, error = [], []

    def run():
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001 - raised again below, in the test
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if error:
        raise error[0]
    assert result, f"{what} did not return within {seconds:g} s"
    return result[0]


class _Gate:
    """An object that is ready only once :meth:`open` is called."""

    def __init__(self):
        import asyncio

        self._open = asyncio.Event()

    async def value(self):
        await self._open.wait()
        return b"ready"

    async def open(self):
        self._open.set()


def test_a_busy_owner_holds_up_neither_a_publish_nor_a_registry_made_again(ray_cluster):
    """An owner putting a large model for its sealer (``put_zeros``, or
    ``adopt``'s copy: seconds for hundreds of GB) answered nothing else
    until done: a publish with it waited for its record and its release,
    and a registry made again waited 30 s for its records, then passed it
    over, losing the name. Its quick methods now run on a thread of their
    own."""
    ray = ray_cluster
    name = "test-busy-owner"
    owner = rzc.Owner("test-busy-owner")
    gate = ray.remote(num_cpus=0)(_Gate).remote()
    try:
        first, second = (ActorWrapper(model(i), owner=owner) for i in (1, 2))
        rzc.publish(name, first)
        del first  # the owner's objects of version 1 are released when version 2 replaces it
        busy = owner._handle().adopt.remote([gate.value.remote()])  # waits for the gate, as a long put would
        assert _within(15, lambda: rzc.publish(name, second, replaces=1), "a publish with the busy owner") == 2
        before = rzc._versions._entry(name, 0, None, 0.0)[4]
        _registry_killed(ray, restart=False)
        start = time.monotonic()  # the new registry's first call: its table taken back from the busy owner
        entry = _made_again(name, before)
        assert entry[0] == 2 and time.monotonic() - start < 15, "the new registry waited for the busy owner"
        x = torch.randn(2, DIM)
        assert answer(rzc.latest(name).load(), x) == answer(model(2), x)
        assert len(owner.objects()) == 1, "version 1's object released, version 2's kept"
        ray.get(gate.open.remote())
        ray.get(busy)
    finally:
        ray.get(gate.open.remote())
        owner.close()
        ray.kill(gate)


def test_a_silent_owner_holds_up_neither_publishes_nor_a_registry_made_again(ray_cluster):
    """An owner that does not answer at all (stopped, cut off): a publish
    replacing its version hung until it answered (its release), and the
    name's next publish waited 30 s (its forget, under the name's lock). A
    registry made again while it was silent made every call wait 23-30 s,
    then passed it over for good: its names lost, their objects held by it
    for ever. Now a publish waits 10 s at most for the release, which the
    registry then asks for until the owner answers (the publisher, a task
    here, may be gone by then); the new registry answers for the other
    names within seconds and takes the silent owner's names back when it
    answers (unless published since; asking again where Ray gave up
    reaching it, after about 20 s), and releases what only its stale
    records used."""
    ray = ray_cluster
    silent, other = rzc.Owner("test-silent"), rzc.Owner("test-silent-other")
    pid = _pid(silent)

    @ray.remote(num_cpus=0)
    def publish(name, wrapper):  # from a process that never reached the owner, and ends
        # A worker an earlier test used may hold the handle of a registry
        # killed since: its first call says so, the next makes a new one.
        return _until_the_registry_answers(lambda: rzc.publish(name, wrapper))

    try:
        # A publish replacing the silent owner's version.
        rzc.publish("test-silent-a", ActorWrapper(model(1), owner=silent))
        os.kill(pid, signal.SIGSTOP)
        v2, v3 = ActorWrapper(model(2), owner=other), ActorWrapper(model(3), owner=other)
        assert _within(60, lambda: ray.get(publish.remote("test-silent-a", v2)), "a publish replacing it") == 2
        assert _within(15, lambda: rzc.publish("test-silent-a", v3), "the next publish") == 3
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: silent.objects() == [] and silent._call("records") == [], "the release and the forget")

        # A registry made again while an owner is silent.
        rzc.publish("test-silent-b", ActorWrapper(model(4), owner=silent))
        rzc.publish("test-silent-c", ActorWrapper(model(5), owner=silent))
        rzc.publish("test-silent-d", ActorWrapper(model(6), owner=other))
        os.kill(pid, signal.SIGSTOP)
        _registry_killed(ray, restart=False)
        _within(15, lambda: _until_the_registry_answers(rzc.versions), "a new registry's first answers")
        x = torch.randn(2, DIM)
        got = rzc.latest("test-silent-d")
        assert answer(got.load(), x) == answer(model(6), x)
        with pytest.raises(VersionNotFoundError):
            rzc.latest("test-silent-b")  # until its owner answers
        rzc.publish("test-silent-c", ActorWrapper(model(7), owner=other))  # replaced meanwhile
        time.sleep(25)  # Ray gives up reaching it: the registry must ask again
        os.kill(pid, signal.SIGCONT)
        b = rzc.latest("test-silent-b", timeout=60)
        assert b.__class__ is ActorWrapper and answer(b.load(), x) == answer(model(4), x)
        assert rzc.versions()["test-silent-b"] == 1 and rzc.versions()["test-silent-c"] == 2
        assert answer(rzc.latest("test-silent-c").load(), x) == answer(model(7), x)
        # Its record of c is stale: forgotten, and its object released.
        wait_for(lambda: [n for n, _ in silent._call("records")] == ["test-silent-b"], "the stale record to go")
        wait_for(lambda: len(silent.objects()) == 1, "the stale version's object to be released")
    finally:
        os.kill(pid, signal.SIGCONT)
        silent.close()
        other.close()


class _EarlierOwner:
    """An owner actor as an earlier version of the package made it: its
    ``forget`` takes no stamp."""

    def forget(self, name):
        self._records.pop(name, None)


def test_records_of_an_earlier_version_are_taken_back_and_forgotten(ray_cluster):
    """What an earlier version of the package left in a cluster: a store
    value without the owner's name (the new registry judged every record
    of it stale, and deleted the name), an owner whose ``forget`` takes no
    stamp (every forget failed, its records kept for ever)."""
    ray = ray_cluster
    from ray.experimental import internal_kv
    from ray_zerocopy._owner import NAMESPACE, _OwnerActor

    earlier = type("EarlierOwner", (_EarlierOwner, _OwnerActor), {})
    ray.remote(earlier).options(
        name="owner:test-earlier", namespace=NAMESPACE, lifetime="detached", num_cpus=0
    ).remote()
    owner, other = rzc.Owner("test-earlier"), rzc.Owner("test-earlier-other")
    name = "test-earlier"
    try:
        rzc.publish(name, ActorWrapper(model(1), owner=owner))
        key, ns = f"versions/{name}", "ray_zerocopy"
        version, stamp, _ = internal_kv._internal_kv_get(key, namespace=ns).decode().split(" ", 2)
        internal_kv._internal_kv_put(key, f"{version} {stamp}", namespace=ns)  # the earlier form
        _registry_gone(ray, restart=False)
        x = torch.randn(2, DIM)
        assert answer(rzc.latest(name, timeout=30).load(), x) == answer(model(1), x)
        rzc.publish(name, ActorWrapper(model(2), owner=other))
        wait_for(lambda: owner._call("records") == [], "the earlier owner to forget")
    finally:
        owner.close()
        other.close()


_AFTER_SHUTDOWN = """
import threading, time
import numpy as np
import ray
import ray_zerocopy as rzc

ray.init(num_cpus=1, include_dashboard=False)
rzc.publish("n", rzc.ActorWrapper({"w": np.zeros(4, np.float32)}))
loading = threading.Event()

def load(wrapper):
    if loading.is_set() or rzc._registry.ask("names")["n"] > 1:
        loading.set()
        time.sleep(3.0)  # loading version 2 (a real model takes seconds) when Ray is shut down
    return wrapper.load()

sub = rzc.Subscription("n", load=load)
rzc.publish("n", rzc.ActorWrapper({"w": np.ones(4, np.float32)}))
assert loading.wait(30)
ray.shutdown()
sub._thread.join(15)
print("RAY", ray.is_initialized(), "THREAD", sub._thread.is_alive())
"""


def test_a_subscription_ends_with_ray_shutdown_and_starts_no_ray():
    """A subscription's thread that was loading when the program shut Ray
    down must end, not start a new Ray (as a user's first call would)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", _AFTER_SHUTDOWN], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RAY False THREAD False" in run.stdout, run.stdout + run.stderr[-2000:]


def test_owners_keep_a_record_of_the_newest_version_only(ray_cluster):
    """A version's owner records it; when a version of another owner (or
    none) replaces it, or the name is unpublished, the record goes (a record
    holds its version's objects). The replaced owner is told without
    waiting for it (a silent owner must not hold up a publish)."""
    name = "test-records"
    first, second = rzc.Owner("test-records-1"), rzc.Owner("test-records-2")
    try:
        rzc.publish(name, ActorWrapper(model(1), owner=first))
        assert [n for n, _ in first._call("records")] == [name]
        rzc.publish(name, ActorWrapper(model(2), owner=second))
        wait_for(lambda: first._call("records") == [], "the first owner to forget")
        ((n, (version, *_)),) = second._call("records")
        assert (n, version) == (name, 2)
        rzc.publish(name, ActorWrapper(model(3)))
        wait_for(lambda: second._call("records") == [], "the second owner to forget")
        rzc.publish(name, ActorWrapper(model(4), owner=first))
        rzc.unpublish(name)
        wait_for(lambda: first._call("records") == [], "the first owner to forget on unpublish")
        # A forget the registry did not wait for may come after a newer
        # version of the name was recorded: it drops its own version's only.
        rzc.publish(name, ActorWrapper(model(5), owner=first))
        ((_, record),) = first._call("records")
        first._call("forget", name, "the stamp of an older version")
        assert first._call("records") == [(name, record)]
        first._call("forget", name, record[4])
        assert first._call("records") == []
    finally:
        first.close()
        second.close()


def test_unpublish_and_names_sharing_objects(ray_cluster):
    name_a, name_b = "test-shared-a", "test-shared-b"
    owner = rzc.Owner("test-shared")
    try:
        w = ActorWrapper(model(1), owner=owner)
        rzc.publish(name_a, w)
        rzc.publish(name_b, w)
        rzc.publish(name_a, ActorWrapper(model(2), owner=owner))
        # name_b still publishes the first wrapper: its object stays owned.
        assert w.object_ref.hex() in owner.objects()
        rzc.unpublish(name_b)
        assert w.object_ref.hex() not in owner.objects()
        assert name_b not in rzc.versions() and rzc.versions()[name_a] == 2
        with pytest.raises(VersionNotFoundError):
            rzc.latest(name_b)
        # Nothing of an unpublished name stays in the registry (a service
        # churning through names grew by its lock and event per name).
        import ray

        # Nor of a name waited for and never published (a multiplexed model
        # id from a client's request: one event each, for the registry's life).
        never = "test-never-published"
        with pytest.raises(VersionNotFoundError):
            rzc.latest(never, timeout=0.2)
        registry = ray.get_actor("ray_zerocopy.versions", namespace="ray_zerocopy")
        kept = ray.get(registry.__ray_call__.remote(lambda self: (set(self._locks), set(self._events))))
        assert name_b not in kept[0] and name_b not in kept[1]
        assert never not in kept[1]
    finally:
        owner.close()


def test_a_name_published_again_after_unpublish_numbers_on(ray_cluster):
    """Numbers started again at 1 after ``unpublish``: two versions had one
    number, and a subscriber holding version 2 took the new versions 1 and
    2 for older ones and kept the old weights, without a word. A name's
    numbers now never go back, a registry made again included."""
    ray = ray_cluster
    name = "test-republish"
    rzc.publish(name, ActorWrapper(model(1)))
    rzc.publish(name, ActorWrapper(model(2)))
    follower = ray.remote(num_cpus=0)(_Flaky).remote(name, ())
    assert ray.get(follower.state.remote()) == (2, 1)
    rzc.unpublish(name)
    assert rzc.publish(name, ActorWrapper(model(3))) == 3
    wait_for(lambda: ray.get(follower.state.remote()) == (3, 2), "the follower to load the version published again")
    x = torch.randn(2, DIM)
    assert answer(rzc.latest(name).load(), x) == answer(model(3), x)
    rzc.unpublish(name)
    _registry_gone(ray, restart=False)
    assert name not in rzc.versions()
    with pytest.raises(rzc.VersionConflictError, match="no version of it is published now"):
        rzc.publish(name, ActorWrapper(model(4)), replaces=1)
    assert rzc.publish(name, ActorWrapper(model(4)), replaces=0) == 4  # nothing published: 0 is met
    wait_for(lambda: ray.get(follower.state.remote())[0] == 4, "the follower to load version 4")
    ray.kill(follower)
