"""One device copy per GPU, on the stand-in driver (its `cuMemCreate` memory
is shared memory, so an exported handle really shares it between processes):
processes that load one buffer under one key make ONE allocation and read
equal values; sharing survives the death of the process that uploaded; other
keys, other buffers and other users stay apart; nothing leaks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common import read_log

pytestmark = pytest.mark.standin

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def share_env(tmp_path):
    """A private share directory and a driver log for this test's processes."""
    share_dir = tmp_path / "share"
    share_dir.mkdir(mode=0o700)
    log = tmp_path / "driver.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
    env.update(RZC_SHARE_DIR=str(share_dir), FAKECUDA_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    return env, log


class Worker:
    def __init__(self, env, key, *args):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "share_worker.py"), key, *args],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker failed: {self.proc.stderr.read()}")
        self.info = json.loads(line)

    def exit(self):
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


def events(log, op, pid=None):
    return [e for e in read_log(log) if e["op"] == op and (pid is None or e["pid"] == pid)]


def exits_clean(log, pids):
    done = {e["pid"]: e["leaks"] for e in read_log(log) if e["op"] == "exit"}
    return all(done.get(p) == 0 for p in pids), done


def test_processes_with_one_key_share_one_allocation(share_env):
    env, log = share_env
    workers = [Worker(env, "model-a") for _ in range(3)]
    first, *others = [w.info for w in workers]
    assert first["sharing"] == "uploaded" and first["equal"], first
    for o in others:
        assert o == {**o, "sharing": "imported", "staging": "none", "equal": True, "note": ""}, o
        assert o["read_only"], "importers map the memory read-only where the device allows"
    assert len(events(log, "create")) == 1, "ONE allocation for three processes"
    assert {e["pid"] for e in events(log, "import")} == {o["pid"] for o in others}
    for w in workers:
        w.exit()
    clean, done = exits_clean(log, [w.info["pid"] for w in workers])
    assert clean, done


def test_the_uploader_killed_a_later_process_still_imports(share_env):
    env, log = share_env
    first, second = Worker(env, "model-b"), Worker(env, "model-b")
    assert (first.info["sharing"], second.info["sharing"]) == ("uploaded", "imported")
    first.kill()  # the server dies; the second process still maps the memory
    third = Worker(env, "model-b")
    assert third.info == {**third.info, "sharing": "imported", "equal": True}, third.info
    assert len(events(log, "create")) == 1, "still the one allocation"
    for w in (second, third):
        w.exit()
    clean, done = exits_clean(log, [second.info["pid"], third.info["pid"]])
    assert clean, done


def test_two_first_loaders_at_once_make_one_allocation(share_env):
    env, log = share_env
    env = dict(env, FAKECUDA_COPY_DELAY_US="20000")  # a slow upload: the second waits for it
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "share_worker.py"), "model-c"], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    infos = [json.loads(p.stdout.readline() or "{}") for p in procs]
    assert sorted(i.get("sharing") for i in infos) == ["imported", "uploaded"], infos
    assert all(i["equal"] for i in infos)
    assert len(events(log, "create")) == 1
    for p in procs:
        p.stdin.write("exit\n")
        p.stdin.flush()
        p.wait(timeout=60)


def test_different_keys_and_different_buffers_stay_apart(share_env):
    env, log = share_env
    a, b = Worker(env, "key-1"), Worker(env, "key-2")
    assert a.info["sharing"] == b.info["sharing"] == "uploaded"
    assert len(events(log, "create")) == 2
    # Another buffer under a key in use: a private upload, and a note why.
    c = Worker(env, "key-1", "7")
    assert c.info["sharing"] == "private" and c.info["equal"], c.info
    assert "another buffer is shared under the key" in c.info["note"]
    for w in (a, b, c):
        w.exit()


def test_another_user_is_not_handed_the_descriptor(share_env):
    if os.geteuid() != 0:
        pytest.skip("skipped: switching to another user needs root")
    env, log = share_env
    server = Worker(env, "model-d")
    other = Worker(env, "model-d", "1", "--fork-unprivileged")
    assert other.info["sharing"] == "private" and other.info["equal"], other.info
    # It cannot enter this user's share directory (or finds it is not its own).
    assert "share directory" in other.info["note"], other.info
    assert not events(log, "import", other.info["pid"]) and not events(log, "export"), "no descriptor left the server"
    server.exit()


def test_unsupported_sharing_falls_back_to_a_private_upload(share_env):
    env, log = share_env
    w = Worker(dict(env, FAKECUDA_FAIL="cuMemCreate=CUDA_ERROR_NOT_SUPPORTED"), "model-e")
    assert w.info["sharing"] == "private" and w.info["equal"], w.info
    assert "shareable device memory could not be made" in w.info["note"] and "CUDA_ERROR_NOT_SUPPORTED" in w.info["note"]
    w.exit()
    clean, done = exits_clean(log, [w.info["pid"]])
    assert clean, done


def test_one_process_loading_twice_uses_its_own_mapping(tmp_path, case):
    share_dir = tmp_path / "share"
    share_dir.mkdir(mode=0o700)
    c = case(
        """
import gc, torch
from ray_zerocopy import _seal
_, buf = _seal.seal({"w": torch.arange(10000, dtype=torch.float32)})
a = rzc.Weights.from_buffer(shared_buffer(buf, "a"))
b = rzc.Weights.from_buffer(shared_buffer(buf, "b"))
da, db = a.upload(0, share="k"), b.upload(0, share="k")
out = {"same": da.data_ptr(0) == db.data_ptr(0), "a": da.info()["sharing"], "b": db.info()["sharing"]}
del da, db, a, b
gc.collect()
print(json.dumps(out))
""",
        RZC_SHARE_DIR=str(share_dir),
    )
    assert c.proc.returncode == 0, c
    assert c.result == {"same": True, "a": "uploaded", "b": "uploaded"}, c
    assert sum(e["op"] == "create" for e in c.events) == 1 and c.leaks == 0, c
