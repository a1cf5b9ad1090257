"""Long-running services on Ray Serve, over HTTP on localhost, in one run:
many models per node, updates without restarts, weights that outlive the
script that sealed them. Prints ONE JSON line.

    python benchmarks/bench_services.py [--models 3] [--replicas 2] [--mib 256] [--out bench-results/services.json]

1. Model multiplexing (``@serve.multiplexed``), K models on R replicas,
   ours (``wrapper.load()``) beside plain Ray objects (``ray.get`` of the
   ``ray.put`` model), each in its own application:
   - ``multiplex_switch_p50_ms``: a replica holding one model at a time gets
     requests that cycle through the models, so every request switches; the
     median of the replicas' own timing of ``get_model`` (the switch);
   - ``memory_ratio``: every replica loads every model (K x R loads); what
     the replicas add to their private memory, plus the sealed objects they
     map (ours; plain Ray objects are copied into each replica instead),
     over the bytes of the distinct models. One copy per node is 1.0; a copy
     per replica is R (``memory_ratio_plain``).
2. An update (``publish`` / ``Subscription``): R replicas serve version 1
   while a loop sends requests; version 2, sealed by ``wrapper.update`` as a
   delta of the tensors that changed, is published mid-loop:
   ``update_requests``, ``update_failed`` (requests that failed),
   ``update_mixed`` (answers that match neither version they name),
   ``update_converge_s`` (publish to every replica answering version 2),
   ``update_delta_ratio`` (delta bytes over base bytes); then version 3 is
   published and ``old_version_freed`` says whether version 2's delta left
   the object store once no replica used it.
3. A driver that exits: a second driver process seals a model with an
   ``Owner``, deploys an application and exits. ``driver_exit_served``: the
   application answers right afterwards; ``restart_after_driver_exit_ok``:
   every replica killed, Serve restarts them and they load and answer right.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import ray_zerocopy as rzc
import torch
from ray import serve
from ray_zerocopy.diagnostics import pss_breakdown
from starlette.requests import Request


def make_model(seed: int, mib: int) -> torch.nn.Module:
    """Linear(1024, 1024) layers (4 MiB each) making ``mib`` MiB."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(max(1, mib // 4))]).eval()


def model_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def answer(m, x) -> list:
    with torch.no_grad():
        return m(x).tolist()


class _Models:
    """What both multiplexing deployments share: where a model comes from
    (``kind`` ours: a sealed wrapper; plain: ``ray.get`` of a plain object),
    and the replica's record of its loads and private memory."""

    def __init__(self, sources: dict, kind: str):
        self.sources, self.kind = sources, kind
        self.loads, self.pid = [], os.getpid()
        self.anon = pss_breakdown()["anon"]

    def _load(self, model_id: str):
        started = time.perf_counter()
        if self.kind == "ours":
            model = self.sources[model_id].load()
        else:
            model = ray.get(self.sources[model_id][0])
        self.loads.append((time.perf_counter() - started) * 1e3)
        return model

    async def _serve(self, request: Request, model):
        if request.method == "GET":
            return {"pid": self.pid, "loads": self.loads, "anon": pss_breakdown()["anon"] - self.anon}
        body = await request.json()
        if body.get("load_all"):  # every model in this replica (Serve would route each to one)
            for model_id in self.sources:
                await self.get_model(model_id)
            return {"pid": self.pid}
        x = torch.tensor(body["x"])
        return {"y": answer(model, x), "pid": self.pid}

    async def __call__(self, request: Request):
        # get_model: each deployment's, multiplexed with its own bound
        model_id = serve.get_multiplexed_model_id()
        return await self._serve(request, await self.get_model(model_id) if model_id else None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class OneAtATime(_Models):
    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str):
        return self._load(model_id)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AllOfThem(_Models):
    @serve.multiplexed(max_num_models_per_replica=16)
    async def get_model(self, model_id: str):
        return self._load(model_id)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Versioned:
    def __init__(self, name: str):
        self.sub, self.pid = rzc.Subscription(name), os.getpid()

    async def __call__(self, request: Request):
        x = torch.tensor((await request.json())["x"])
        v = self.sub.current()  # one version per request
        return {"version": v.number, "y": answer(v.pipeline, x), "pid": self.pid}


def call(port: int, route: str, body=None, model_id: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if model_id:
        headers["serve_multiplexed_model_id"] = model_id
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def records(port: int, route: str, replicas: int) -> list[dict]:
    """Every replica's record (GETs until each has answered)."""
    seen = {}
    for _ in range(200):
        r = call(port, route)
        seen[r["pid"]] = r
        if len(seen) == replicas:
            break
    return list(seen.values())


def store_used() -> int:
    """Bytes in this node's object store, as the raylet counts them."""
    from ray._private.internal_api import node_stats

    node = ray._private.worker.global_worker.node
    stats = node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False)
    return stats.store_stats.object_store_bytes_used


def multiplexing(port: int, models: dict, replicas: int, x) -> dict:
    distinct = sum(model_bytes(m) for m in models.values())
    before = store_used()
    ours = {mid: rzc.ActorWrapper(m) for mid, m in models.items()}
    sealed = store_used() - before  # the sealed objects, measured
    sources = {
        "ours": ours,
        "plain": {mid: [ray.put(m)] for mid, m in models.items()},  # in a list: Serve passes the ref itself
    }
    switch, memory = {}, {}
    for kind, src in sources.items():
        serve.run(OneAtATime.options(num_replicas=replicas).bind(src, kind), name="switch", route_prefix="/switch")
        for _ in range(4):
            for mid in models:
                call(port, "/switch", {"x": x.tolist()}, mid)
        loads = [ms for r in records(port, "/switch", replicas) for ms in r["loads"]]
        switch[kind] = round(statistics.median(loads), 2)
        serve.delete("switch")
        serve.run(AllOfThem.options(num_replicas=replicas).bind(src, kind), name="all", route_prefix="/all")
        loaded = set()
        while len(loaded) < replicas:  # until every replica holds every model: K x R loads
            loaded.add(call(port, "/all", {"load_all": True})["pid"])
        added = sum(r["anon"] for r in records(port, "/all", replicas))
        mapped = sealed if kind == "ours" else 0  # the sealed objects, once per node
        memory[kind] = round((added + mapped) / distinct, 3)
        serve.delete("all")
    return {
        "multiplex_switch_p50_ms": {**switch, "ratio": round(switch["ours"] / switch["plain"], 4)},
        "memory_ratio": memory["ours"],
        "memory_ratio_plain": memory["plain"],
    }


def objects_listed() -> str:
    from ray._private.internal_api import memory_summary

    return memory_summary(address=ray.get_runtime_context().gcs_address, units="B", num_entries=100000)


def updating(port: int, mib: int, replicas: int, x) -> dict:
    owner = rzc.Owner("bench-services")
    name = "bench-services"
    base = make_model(10, mib)
    v1 = rzc.ActorWrapper(base, owner=owner)
    tuned = make_model(10, mib)
    with torch.no_grad():
        tuned[-1].weight.add_(0.01)  # the last layer fine-tuned
    expected = {1: answer(base, x), 2: answer(tuned, x)}
    rzc.publish(name, v1)
    serve.run(Versioned.options(num_replicas=replicas).bind(name), name="versioned", route_prefix="/versioned")
    results, failed, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                results.append((time.monotonic(), call(port, "/versioned", {"x": x.tolist()})))
            except Exception as e:
                failed.append(repr(e))

    t = threading.Thread(target=loop)
    t.start()
    while len({r["pid"] for _, r in results}) < replicas:
        time.sleep(0.05)
    v2 = v1.update(tuned)
    published = time.monotonic()
    rzc.publish(name, v2)
    deadline = published + 120
    while time.monotonic() < deadline:
        newest = {r["pid"]: r["version"] for _, r in list(results)}
        if len(newest) == replicas and set(newest.values()) == {2}:
            break
        time.sleep(0.02)
    time.sleep(2.0)  # traffic after the switch too
    stop.set()
    t.join()
    first = {}
    for when, r in results:
        if r["version"] == 2:
            first.setdefault(r["pid"], when)
    converge = max(first.values()) - published if len(first) == replicas else None
    mixed = sum(1 for _, r in results if r["y"] != expected[r["version"]])
    delta, delta_ratio = v2.object_ref.hex(), v2.nbytes / v1.nbytes
    del v2
    rzc.publish(name, v1.update(make_model(10, mib)))  # version 3: the base again
    freed = False
    for _ in range(600):
        served = {call(port, "/versioned", {"x": x.tolist()})["version"] for _ in range(4)}
        if served == {3} and delta not in objects_listed():
            freed = True
            break
        time.sleep(0.1)
    serve.delete("versioned")
    owner.close()
    return {
        "update_requests": len(results),
        "update_failed": len(failed),
        "update_mixed": mixed,
        "update_converge_s": None if converge is None else round(converge, 3),
        "update_delta_ratio": round(delta_ratio, 4),
        "old_version_freed": freed,
    }


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Plain:
    def __init__(self, wrapper):
        self.model, self.pid = wrapper.load(), os.getpid()

    async def __call__(self, request: Request):
        return {"y": answer(self.model, torch.tensor((await request.json())["x"])), "pid": self.pid}


def deploy_and_exit(address: str, mib: int, replicas: int) -> None:
    """The second driver: seal with an owner, deploy, exit."""
    ray.init(address=address, log_to_driver=False)
    wrapper = rzc.ActorWrapper(make_model(20, mib), owner=rzc.Owner("bench-exit"))
    serve.run(Plain.options(num_replicas=replicas).bind(wrapper), name="exit", route_prefix="/exit")


def driver_exit(port: int, mib: int, replicas: int, x) -> dict:
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--deploy-and-exit", address,
                    "--mib", str(mib), "--replicas", str(replicas)], check=True, env=env, timeout=600)
    expected = answer(make_model(20, mib), x)
    served = all(call(port, "/exit", {"x": x.tolist()})["y"] == expected for _ in range(4))
    before = {call(port, "/exit", {"x": x.tolist()})["pid"] for _ in range(8)}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA" in a["name"] and "exit" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    restarted = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not restarted:
        try:
            r = call(port, "/exit", {"x": x.tolist()})
            restarted = r["pid"] not in before and r["y"] == expected
        except Exception:
            time.sleep(0.5)
    serve.delete("exit")
    rzc.Owner("bench-exit").close()
    return {"driver_exit_served": served, "restart_after_driver_exit_ok": restarted}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--mib", type=int, default=256, help="size of each model")
    ap.add_argument("--out", default="bench-results/services.json")
    ap.add_argument("--deploy-and-exit", metavar="ADDRESS")
    args = ap.parse_args()
    if args.deploy_and_exit:
        return deploy_and_exit(args.deploy_and_exit, args.mib, args.replicas)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    x = torch.randn(2, 1024)
    models = {f"model-{i}": make_model(i, args.mib) for i in range(args.models)}
    out = {"models": args.models, "replicas": args.replicas, "model_mib": args.mib}
    out.update(multiplexing(port, models, args.replicas, x))
    out.update(updating(port, args.mib, args.replicas, x))
    out.update(driver_exit(port, args.mib, args.replicas, x))
    serve.shutdown()
    ray.shutdown()
    line = json.dumps(out)
    print(line)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
