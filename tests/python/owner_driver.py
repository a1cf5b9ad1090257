"""Drivers for test_owner.py, each a separate process that connects to the
test's cluster, does one thing, prints one JSON line and exits (the point:
what an Owner keeps outlives the driver that sealed it).

    python owner_driver.py ADDRESS deploy PORT OWNER_NAME|-
    python owner_driver.py ADDRESS kill-replicas
    python owner_driver.py ADDRESS teardown OWNER_NAME
    python owner_driver.py ADDRESS release-in-actor OWNER_NAME
    python owner_driver.py ADDRESS owner-id OWNER_NAME
    python owner_driver.py ADDRESS errors OWNER_NAME
    python owner_driver.py ADDRESS seal-through-a-copy OWNER_NAME
    python owner_driver.py ADDRESS far-owner OWNER_NAME

The model, the deployment and the request helper live here and are imported
by name (``owner_driver``) by the test, the drivers and Serve's replicas.
"""

import json
import os
import sys
import time
import urllib.request

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

APP, ROUTE = "owned", "/owned"
DIM, INPUTS = 1024, 4


def make_model():
    """The model every process rebuilds identically: 3 Linear layers of
    1024 x 1024, 12 MiB of fp32 weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM)).eval()


def make_inputs():
    import torch

    return torch.linspace(-1, 1, INPUTS * DIM).reshape(INPUTS, DIM)


def expected_output() -> list:
    import torch

    with torch.no_grad():
        return make_model()(make_inputs()).sum(-1).tolist()


def ask(port: int, post: bool = True) -> dict:
    """POSTs the inputs to the app (GET: the replica's load figures)."""
    data = json.dumps({"inputs": make_inputs().tolist()}).encode() if post else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{ROUTE}", data=data)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _deployment():
    from ray import serve

    @serve.deployment(name="Owned", num_replicas=2, ray_actor_options={"num_cpus": 0.25})
    class Owned:
        def __init__(self, wrapper):
            from ray_zerocopy.diagnostics import pss_breakdown

            before = pss_breakdown()
            started = time.perf_counter()
            self.model = wrapper.load()
            self.stats = {
                "pid": os.getpid(),
                "load_ms": (time.perf_counter() - started) * 1e3,
                "private_mib": (pss_breakdown()["anon"] - before["anon"]) / 2**20,
            }

        async def __call__(self, request):
            import torch

            if request.method == "GET":
                return self.stats
            body = await request.json()
            with torch.no_grad():
                out = self.model(torch.tensor(body["inputs"], dtype=torch.float32)).sum(-1)
            return {"out": out.tolist(), "pid": os.getpid()}

    return Owned


def deploy(port: str, owner_name: str) -> dict:
    from ray import serve
    from ray_zerocopy import ActorWrapper, Owner

    owner = None if owner_name == "-" else Owner(owner_name)
    wrapper = ActorWrapper(make_model(), owner=owner)
    serve.start(http_options={"host": "127.0.0.1", "port": int(port)})
    serve.run(_deployment().bind(wrapper), name=APP, route_prefix=ROUTE, blocking=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            answer = ask(int(port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    if answer["out"] != expected_output():
        raise AssertionError(f"the app answered {answer['out']}")
    return {"object_id": wrapper.object_ref.hex(), "nbytes": wrapper.nbytes}


def kill_replicas() -> dict:
    """Kills every replica of the app at once: none keeps the object mapped,
    so the restarted ones can load only what an owner still holds."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    replicas = sorted(n for n in names if f"{APP}#" in n)
    if not replicas:
        raise AssertionError(f"no replica of {APP} among {names}")
    for name in replicas:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    return {"killed": replicas}


def teardown(owner_name: str) -> dict:
    from ray import serve
    from ray_zerocopy import Owner

    serve.delete(APP)
    owner = Owner(owner_name)
    held = owner.objects()
    owner.close()
    return {"held": held}


def release_in_actor(owner_name: str) -> dict:
    """Seals a model and a checkpoint with an owner; an actor given the
    owner releases both (the objects stay in the store until then)."""
    import tempfile

    import ray
    from ray_zerocopy import ActorWrapper, Owner
    from safetensors.torch import save_file

    owner = Owner(owner_name)
    wrapper = ActorWrapper(make_model(), owner=owner)
    with tempfile.TemporaryDirectory() as d:
        save_file(make_model().state_dict(), os.path.join(d, "model.safetensors"))
        checkpoint = ActorWrapper.from_safetensors(d, owner=owner)

    @ray.remote(num_cpus=0)
    class Releaser:
        def __init__(self, owner):
            self.owner = owner  # unpickled here: found by name

        def release(self, refs):
            # refs in a list: the actor gets the references, not the objects
            return self.owner.release(*refs), self.owner.objects()

    releaser = Releaser.remote(owner)
    held_before = owner.objects()
    refs = [wrapper.object_ref, checkpoint.object_ref]
    released, held_after = ray.get(releaser.release.remote(refs))
    ray.kill(releaser)
    return {"object_ids": sorted(r.hex() for r in refs), "nbytes": wrapper.nbytes + checkpoint.nbytes,
            "before": sorted(held_before), "released": released, "after": held_after}  # fmt: skip


def owner_id(owner_name: str) -> dict:
    from ray_zerocopy import Owner

    owner = Owner(owner_name)
    return {"actor_id": owner._handle()._actor_id.hex(), "objects": owner.objects()}


def errors(owner_name: str) -> dict:
    """What each misuse raises: a name that is not a string, a closed owner."""
    from ray_zerocopy import ActorWrapper, Owner

    out = {}

    def record(key, fn):
        try:
            fn()
            out[key] = None
        except Exception as e:
            out[key] = [type(e).__name__, str(e), [c.__name__ for c in type(e).__mro__]]

    record("name", lambda: Owner(42))
    record("owner_type", lambda: ActorWrapper(make_model(), owner="not-an-owner"))
    owner = Owner(owner_name)
    copy = __import__("pickle").loads(__import__("pickle").dumps(owner))
    owner.close()
    record("seal_closed", lambda: ActorWrapper(make_model(), owner=owner))
    record("objects_closed_elsewhere", copy.objects)
    record("close_twice", owner.close)
    return out


def seal_through_a_copy(owner_name: str) -> dict:
    """Seals with an owner where the object store cannot be filled in place
    (as if its mapping were not writable shared memory here): the owner gets
    its own copy, this driver's is dropped, and the log says so."""
    import logging

    import ray
    import torch
    from ray_zerocopy import ActorWrapper, Owner, _store

    _store._shared_writable = lambda addr, nbytes: False
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("ray_zerocopy").addHandler(handler)
    owner = Owner(owner_name)
    wrapper = ActorWrapper(make_model(), owner=owner)

    @ray.remote(num_cpus=0)
    def compute(wrapper):
        with torch.no_grad():
            return wrapper.load()(make_inputs()).sum(-1).tolist()

    right = ray.get(compute.remote(wrapper)) == expected_output()
    return {"object_id": wrapper.object_ref.hex(), "nbytes": wrapper.nbytes, "held": owner.objects(),
            "warnings": messages, "right": right}  # fmt: skip


def far_owner(owner_name: str) -> dict:
    """Makes the owner from a task on the node with the resource ``far``,
    then seals with it here, on another node."""
    import ray
    from ray_zerocopy import ActorWrapper, Owner

    @ray.remote(num_cpus=0, resources={"far": 1})
    def make(name):
        return Owner(name)  # on the node this task runs on

    owner = ray.get(make.remote(owner_name))
    try:
        ActorWrapper(make_model(), owner=owner)
        error = None
    except Exception as e:
        error = [type(e).__name__, str(e)]
    held = owner.objects()
    owner.close()
    return {"error": error, "held": held}


def main(argv):
    import ray

    address, command, *args = argv
    ray.init(address=address, log_to_driver=False)
    fn = {
        "deploy": deploy,
        "kill-replicas": kill_replicas,
        "teardown": teardown,
        "release-in-actor": release_in_actor,
        "owner-id": owner_id,
        "errors": errors,
        "seal-through-a-copy": seal_through_a_copy,
        "far-owner": far_owner,
    }[command]
    print(json.dumps(fn(*args)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    # Run as the module ``owner_driver`` so that what Serve's replicas
    # unpickle (the deployment's class) is imported by name.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import owner_driver

    owner_driver.main(sys.argv[1:])
