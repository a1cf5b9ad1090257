"""Shared fixtures: a real local Ray cluster (token auth off, as for any local
test cluster) started once per test session."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray workers inherit this environment: they can import the test models, as a
# deployed job's workers import its code.
_here = os.path.dirname(os.path.abspath(__file__))
_examples = os.path.join(_here, "..", "..", "examples", "python")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_here, os.path.abspath(_examples), os.environ.get("PYTHONPATH")) if p
)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")
