"""Many models per node with Ray Serve model multiplexing, over HTTP on
localhost: every model answers as itself from every replica, the replicas
map the sealed copies instead of copying them, and a model one replica
evicts stays whole for the replica still using it."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
serve = pytest.importorskip("ray.serve")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python"))
import serve_many_models as example  # noqa: E402
from ports import free_port  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402

K = 5  # models
R = 2  # replicas, each holding at most 2: 4 places for 5 models, so some replica evicts


def test_many_models_on_replicas_share_one_copy_each(ray_cluster):
    models = {f"m{i}": example.make_model(i, dim=1024) for i in range(K)}
    nbytes = sum(p.numel() * p.element_size() for p in models["m0"].parameters())  # 16 MiB each
    wrappers = {model_id: ActorWrapper(m) for model_id, m in models.items()}
    x = torch.randn(2, 1024)
    with torch.no_grad():
        expected = {model_id: m(x).tolist() for model_id, m in models.items()}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(example.build_app(wrappers, R), name="many", route_prefix="/models")
        wrong, pids = [], set()
        # Every model, again and again: more models than the replicas hold,
        # so replicas evict; every answer after an eviction, from either
        # replica, must still come from the right, whole weights.
        for _ in range(4):
            for model_id in ["m0", "m1", "m2", "m3", "m4", "m2", "m0"]:
                answer = example.ask(port, model_id, x.tolist())
                pids.add(answer["pid"])
                if answer["scores"] != expected[model_id]:
                    wrong.append((model_id, answer["pid"]))
        assert not wrong, f"answers from the wrong weights: {wrong[:5]}"
        records = {}
        for _ in range(40):
            r = example.ask(port, None)
            records[r["pid"]] = r
            if len(records) == len(pids):
                break
        loads = [load for r in records.values() for load in r["loads"]]
        loaded_ids = [model_id for model_id, _ in loads]
        assert set(loaded_ids) == set(models), records
        reloads = len(loaded_ids) - len(set((r["pid"], m) for r in records.values() for m, _ in r["loads"]))
        assert reloads > 0, f"no replica evicted a model: {records}"
        # The replicas map the sealed copies: what they added to their
        # private memory is far below one copy per model they loaded.
        private = sum(r["private_mib"] for r in records.values()) * 2**20
        held = sum(min(2, len({m for m, _ in r["loads"]})) for r in records.values())
        assert private < 0.3 * held * nbytes, (private / 2**20, held, records)
    finally:
        serve.delete("many")
        serve.shutdown()
