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


def pytest_configure(config):
    """The tests (and the Ray workers they start) import the installed
    package, as a user's job does, not ``python_shim/``: an edit there not
    yet installed (``make python``) would be tested as the old code, and
    pass or fail for the wrong reason. Refused here, naming the files.
    ``RZC_TEST_INSTALLED=1`` tests the installed package as it is (e.g. an
    older file put back, to see a new test fail without its fix)."""
    if os.environ.get("RZC_TEST_INSTALLED") == "1":
        return
    import filecmp
    import importlib.util

    spec = importlib.util.find_spec("ray_zerocopy")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: the tests that need it say so
    installed = list(spec.submodule_search_locations)[0]
    source = os.path.join(_here, "..", "..", "python_shim", "ray_zerocopy")
    if not os.path.isdir(source) or os.path.samefile(installed, source):
        return
    names = sorted(n for n in os.listdir(source) if n.endswith(".py"))

    def differs(n):
        there = os.path.join(installed, n)
        return not os.path.exists(there) or not filecmp.cmp(os.path.join(source, n), there, shallow=False)

    stale = [n for n in names if differs(n)]
    if stale:
        pytest.exit(
            f"the installed ray_zerocopy ({installed}) differs from python_shim/ in {', '.join(stale)}: "
            "run `make python` (the tests import the installed package), or set RZC_TEST_INSTALLED=1 "
            "to test it as it is",
            returncode=4,
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
