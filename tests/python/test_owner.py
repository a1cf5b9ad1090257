"""Sealed weights that outlive the driver that sealed them (``Owner``).

The tests run their own Ray cluster (``ray start --head`` in a temporary
directory, on free ports) because what they check needs drivers that EXIT:
each driver is a separate process (``owner_driver.py``). The test process
itself never connects to Ray; it talks to the Serve application over HTTP
and reads the object store's usage from the raylet's node stats.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("torch")
pytest.importorskip("ray.serve")

import owner_driver  # noqa: E402
from ports import free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "owner_driver.py")
OWNER = "owned-app"


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)  # a cluster this test process may be connected to is not ours
    return env


@dataclass
class Cluster:
    address: str
    raylet_port: int
    http_port: int
    temp_dir: str

    def drive(self, *args, timeout: float = 240) -> dict:
        """Runs one driver to its end; its JSON line."""
        run = subprocess.run(
            [sys.executable, DRIVER, self.address, *args],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert run.returncode == 0, f"driver {args} failed:\n{run.stdout}\n{run.stderr[-4000:]}"
        return json.loads(run.stdout.strip().splitlines()[-1])

    def store_used(self) -> int:
        """Bytes in use in the node's object store, as its raylet counts them
        (its own plasma accounting: exact, and independent of how the shared
        memory file's pages are reused)."""
        from ray._private.internal_api import node_stats

        return node_stats("127.0.0.1", self.raylet_port, include_memory_info=False).store_stats.object_store_bytes_used


def _cluster_pids(temp_dir: str) -> list[int]:
    """The processes of the cluster started in ``temp_dir`` (each names it
    on its command line, or is a child of one that does)."""
    parents, found = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if temp_dir.encode() in cmd:
            found.add(int(entry))
    grown = True
    while grown:
        children = {p for p, pp in parents.items() if pp in found} - found
        grown = bool(children)
        found |= children
    return sorted(found)


def _stop_cluster(temp_dir: str) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        pids = _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _cluster_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start_node(temp_dir: str, head: str | None, raylet_port: int, *flags: str) -> None:
    """``ray start`` of one node whose processes name ``temp_dir``: the head
    (``head`` None) or one joining the head at ``head``."""
    ports = {
        "--node-manager-port": raylet_port,
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    if head is None:
        where = ["--head", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
    else:
        where = [f"--address={head}"]
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", *where, "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items()), *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"ray start failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


@contextlib.contextmanager
def _cluster(far_node: bool = False):
    """A cluster of its own: one head node (4 CPUs, a 200 MiB object store)
    and, with ``far_node``, a second node with no CPU and the resource
    ``far``; every process of it stopped at the end."""
    temp_dirs = [tempfile.mkdtemp(prefix="rzo", dir="/tmp")]  # short: Ray's socket paths live under it
    try:
        port, raylet_port = free_port(), free_port()
        _start_node(
            temp_dirs[0], None, raylet_port, f"--port={port}", "--num-cpus=4",
            f"--object-store-memory={200 * 2**20}",
        )  # fmt: skip
        if far_node:
            temp_dirs.append(tempfile.mkdtemp(prefix="rzo", dir="/tmp"))
            _start_node(
                temp_dirs[1], f"127.0.0.1:{port}", free_port(), "--num-cpus=0", '--resources={"far": 1}',
                f"--object-store-memory={80 * 2**20}",
            )  # fmt: skip
        yield Cluster(f"127.0.0.1:{port}", raylet_port, free_port(), temp_dirs[0])
    finally:
        for temp_dir in reversed(temp_dirs):
            _stop_cluster(temp_dir)


@pytest.fixture(scope="module")
def cluster():
    with _cluster() as c:
        yield c


@pytest.fixture(scope="module")
def deployed(cluster):
    """The app deployed by a driver that has exited, its weights owned by OWNER."""
    sealed = cluster.drive("deploy", str(cluster.http_port), OWNER)
    return sealed


def _answers(port: int, n: int) -> dict:
    """``n`` answers of the app; pid -> outputs."""
    out = {}
    for _ in range(n):
        a = owner_driver.ask(port)
        out.setdefault(a["pid"], []).append(a["out"])
    return out


def _poll(what: str, check, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass  # the proxy answers 5xx or refuses while a replica restarts
        if time.monotonic() > deadline:
            raise AssertionError(f"within {seconds} s: {what}")
        time.sleep(0.5)


def test_app_deployed_by_an_exited_driver_keeps_answering(cluster, deployed):
    expected = owner_driver.expected_output()
    answers = _answers(cluster.http_port, 8)
    for pid, outs in answers.items():
        assert all(o == expected for o in outs), f"replica {pid} answered {outs[0]}, expected {expected}"


def test_replicas_killed_after_driver_exit_restart_and_reload_zero_copy(cluster, deployed):
    expected = owner_driver.expected_output()
    before = set(_answers(cluster.http_port, 12))
    assert len(cluster.drive("kill-replicas")["killed"]) == 2

    def restarted():
        got = {}
        for _ in range(8):
            stats = owner_driver.ask(cluster.http_port, post=False)
            got[stats["pid"]] = stats
        return got if len(got) == 2 and not set(got) & before else None

    replicas = _poll("both replicas answer from new processes", restarted)
    for stats in replicas.values():
        # Zero-copy: a replica's private memory did not grow by the weights.
        assert stats["private_mib"] < 0.5 * deployed["nbytes"] / 2**20, stats
    for pid, outs in _answers(cluster.http_port, 8).items():
        assert pid in replicas and all(o == expected for o in outs), (pid, outs[0])


def test_deleting_the_app_and_closing_the_owner_frees_the_weights(cluster, deployed):
    used = cluster.store_used()
    assert used >= deployed["nbytes"], f"the store holds {used} bytes, less than the weights"
    held = cluster.drive("teardown", OWNER)["held"]
    assert held == [deployed["object_id"]]
    _poll(
        f"the store returns the weights' {deployed['nbytes']} bytes (was {used})",
        lambda: used - cluster.store_used() >= deployed["nbytes"],
    )


def test_owner_pickles_into_an_actor_that_releases(cluster):
    used = cluster.store_used()
    got = cluster.drive("release-in-actor", "releasing")
    assert got["before"] == got["object_ids"], "the owner holds the model's and the checkpoint's objects"
    assert got["released"] == 2 and got["after"] == []
    # Released, and the sealing driver gone: nothing holds them any more.
    _poll(
        f"the store returns the {got['nbytes']} bytes released",
        lambda: cluster.store_used() - used < 0.1 * got["nbytes"],
    )


def test_drivers_get_the_same_owner(cluster):
    env = _env()
    runs = [
        subprocess.Popen(
            [sys.executable, DRIVER, cluster.address, "owner-id", "shared"], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    ids = []
    for run in runs:
        out, _ = run.communicate(timeout=240)
        assert run.returncode == 0
        ids.append(json.loads(out.strip().splitlines()[-1])["actor_id"])
    assert ids[0] == ids[1], "two drivers at once made two owners"
    assert cluster.drive("owner-id", "shared")["actor_id"] == ids[0]


def test_misuse_gets_clear_errors(cluster):
    got = cluster.drive("errors", "misused")
    assert got["name"][0] == "InvalidTypeError" and "string" in got["name"][1]
    assert got["owner_type"][0] == "InvalidTypeError" and "Owner" in got["owner_type"][1]
    for key in ("seal_closed", "objects_closed_elsewhere"):
        assert got[key][0] == "InvalidInputError", got[key]
        assert "'misused' is closed" in got[key][1]
        assert "RayZeroCopyError" in got[key][2]
    assert got["close_twice"] is None


def test_sealing_through_a_copy_leaves_the_owner_one_copy(cluster):
    used = cluster.store_used()
    got = cluster.drive("seal-through-a-copy", "copied")
    assert got["right"], "a task loaded other weights than the model's"
    assert got["held"] == [got["object_id"]]
    assert got["warnings"] == [
        "sealing through two copies, the weights held three times while handing them to the owner 'copied': "
        "the object store is not mapped as writable shared memory here"
    ]
    # The driver dropped its own copy (and has exited): the owner's stays.
    nbytes = got["nbytes"]
    _poll(f"the store holds one copy of {nbytes} bytes more", lambda: cluster.store_used() - used < 1.5 * nbytes)
    grown = cluster.store_used() - used
    assert grown >= 0.9 * nbytes, f"the store grew by {grown} bytes"


def test_an_owner_on_another_node_is_refused():
    with _cluster(far_node=True) as c:
        got = c.drive("far-owner", "far")
    assert got["error"][0] == "InvalidInputError", got
    assert (
        "'far' runs on node" in got["error"][1]
        and "an owner must be on the node of the process that seals" in got["error"][1]
    )
    assert got["held"] == [], "a refused seal left an object with the owner"
