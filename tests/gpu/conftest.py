"""The GPU tests of ray-zerocopy's own device code (no framework's CUDA):
they run on the stand-in driver in `make test` (every test, none skipped)
and on a real GPU in `run_gpu_checks.sh`. Without either, every test here is
skipped with "skipped: no CUDA device" (pytest -rs shows it)."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
from common import backend, read_log, shared_buffer

_HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = backend()


def pytest_report_header(config):
    return f"GPU tests run on: {BACKEND}"


def pytest_collection_modifyitems(config, items):
    # pytest calls this hook with every collected item, whichever conftest
    # defines it: mark only the tests in this directory.
    mine = [i for i in items if os.path.dirname(os.path.abspath(str(i.path))) == _HERE]
    for item in mine:
        if BACKEND == "none":
            item.add_marker(pytest.mark.skip(reason="skipped: no CUDA device"))
        elif BACKEND == "cuda" and item.get_closest_marker("standin"):
            item.add_marker(pytest.mark.skip(reason="skipped: needs the stand-in driver (fault injection)"))


def pytest_configure(config):
    config.addinivalue_line("markers", "standin: needs the stand-in driver's fault injection and log")


@pytest.fixture
def shm():
    return shared_buffer


@pytest.fixture
def driver_log(tmp_path):
    """The stand-in's resource log for what this test does in this process:
    a function returning the events logged since the test started."""
    path = os.environ.get("FAKECUDA_LOG")
    if not path:
        return lambda: []
    start = len(read_log(path))
    return lambda: [e for e in read_log(path)[start:] if e.get("pid") == os.getpid()]


class Case:
    """A Python snippet run in a fresh process on the stand-in driver, with
    its own FAKECUDA_* settings; `.result` is what it printed last (JSON),
    `.events` its driver log, `.leaks` the log's exit count."""

    def __init__(self, tmp_path, code: str, env: dict):
        log = tmp_path / f"driver-{len(list(tmp_path.iterdir()))}.jsonl"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
        full_env.update({k: str(v) for k, v in env.items()}, FAKECUDA_LOG=str(log))
        full_env["PYTHONPATH"] = os.pathsep.join([_HERE, full_env.get("PYTHONPATH", "")])
        prelude = "import json, numpy as np, ray_zerocopy as rzc\nfrom common import shared_buffer\n"
        self.proc = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            env=full_env, capture_output=True, text=True, timeout=300,
        )
        lines = [ln for ln in self.proc.stdout.splitlines() if ln.strip()]
        import json

        self.result = json.loads(lines[-1]) if lines else None
        self.events = read_log(log)
        exits = [e for e in self.events if e.get("op") == "exit"]
        self.leaks = exits[-1]["leaks"] if exits else None

    def __repr__(self):
        out, err = self.proc.stdout[-2000:], self.proc.stderr[-3000:]
        return f"Case(rc={self.proc.returncode}, stdout={out!r}, stderr={err!r})"


@pytest.fixture
def case(tmp_path):
    """Runs a snippet on the stand-in: ``case(code, FAKECUDA_FAIL=...)``."""
    return lambda code, **env: Case(tmp_path, code, env)


@pytest.fixture
def share_env(tmp_path):
    """A private share directory and a driver log for this test's processes.

    The directory is a short path of its own (mode 0700): a socket's path
    holds at most 107 bytes, and a directory too long for one (pytest's
    tmp_path can be) is passed over for the user's shared fallback, where
    other tests' processes would meet this test's."""
    share_dir = tempfile.mkdtemp(prefix="rzc-")
    assert len(share_dir) + len("/0123456789abcdef0123456789abcdef.sock") < 108, share_dir
    log = tmp_path / "driver.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
    env.update(RZC_SHARE_DIR=share_dir, FAKECUDA_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([_HERE, env.get("PYTHONPATH", "")])
    yield env, log
    shutil.rmtree(share_dir, ignore_errors=True)
