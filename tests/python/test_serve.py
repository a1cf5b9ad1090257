"""A long-running service on Ray Serve, served over HTTP on localhost: the
replicas of the example deployment answer as the model does, and hold about
one copy of the weights between them (each loads zero-copy from the sealed
object; none adds the weights to its private memory)."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
serve = pytest.importorskip("ray.serve")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python"))
import serve_deployment as example  # noqa: E402
from ports import free_port  # noqa: E402
from ray_zerocopy import ActorWrapper  # noqa: E402


def test_replicas_serve_over_http_from_one_copy(ray_cluster):
    torch.manual_seed(0)
    model = example.Classifier(dim=512).eval()  # 8.4 MiB of weights
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapper = ActorWrapper(model)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(example.build_app(wrapper, replicas=2), route_prefix="/classify")
        x = torch.randn(8, 512)
        with torch.no_grad():
            expected = model(x).argmax(-1).tolist()
        pids = set()
        for _ in range(12):
            answer = example.ask(port, x.tolist())
            assert answer["labels"] == expected
            pids.add(answer["pid"])
        stats = {}
        for _ in range(30):
            s = example.ask(port)
            stats[s["pid"]] = s
            if len(stats) == 2:
                break
        assert len(stats) == 2, f"both replicas answered: {stats}"
        private = sum(s["private_mib"] for s in stats.values())
        assert private < 0.5 * nbytes / 2**20, (
            f"the replicas copied the weights: {stats}, model {nbytes / 2**20:.1f} MiB"
        )
    finally:
        serve.shutdown()
