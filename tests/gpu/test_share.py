"""One device copy per GPU, on the stand-in driver (its `cuMemCreate` memory
is shared memory, so an exported handle really shares it between processes):
processes that load one buffer under one key make ONE allocation and read
equal values; sharing survives the death of the process that uploaded; other
keys, other buffers and other users stay apart; nothing leaks."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from common import read_log

pytestmark = pytest.mark.standin

HERE = os.path.dirname(os.path.abspath(__file__))


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
        assert o == {**o, "sharing": "imported", "staging": "none", "equal": True, "note": "", "fallback": "none"}, o
        assert o["verified_nbytes"] > 0, "the importer read the memory back before using it"
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


def test_a_forked_child_does_not_keep_the_server_s_lock_and_socket(share_env):
    """A process that serves forks (multiprocessing, a DataLoader worker) and
    dies: its child must not keep the lock and the listening socket it
    inherited, or a later loader finds a socket nobody answers (silent, a
    private copy) and no process can ever serve the key again."""
    env, log = share_env
    server = Worker(env, "model-f", "1", "--fork-sleeper")
    assert server.info["sharing"] == "uploaded", server.info
    try:
        server.kill()
        later = Worker(env, "model-f")
        assert later.info["sharing"] == "uploaded" and later.info["fallback"] == "none", later.info
        later.exit()
    finally:
        os.kill(server.info["sleeper"], signal.SIGKILL)


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
    assert c.info["fallback"] == "other_content" and "another buffer" in c.info["note"], c.info
    for w in (a, b, c):
        w.exit()


def test_another_user_is_not_handed_the_descriptor(share_env):
    if os.geteuid() != 0:
        pytest.skip("skipped: switching to another user needs root")
    env, log = share_env
    server = Worker(env, "model-d")
    other = Worker(env, "model-d", "1", "--fork-unprivileged")
    # It cannot use this user's share directory: it shares in one of its own
    # (or not at all), never importing this user's memory.
    assert other.info["sharing"] != "imported" and other.info["equal"], other.info
    assert "belongs to uid 0" in other.info["dir_note"] or other.info["fallback"] == "no_directory", other.info
    assert not events(log, "import", other.info["pid"]) and not events(log, "export"), "no descriptor left the server"
    server.exit()


def test_unsupported_sharing_falls_back_to_a_private_upload(share_env):
    env, log = share_env
    w = Worker(dict(env, FAKECUDA_FAIL="cuMemCreate=CUDA_ERROR_NOT_SUPPORTED"), "model-e")
    assert w.info["sharing"] == "private" and w.info["equal"], w.info
    assert w.info["fallback"] == "not_shareable" and "CUDA_ERROR_NOT_SUPPORTED" in w.info["note"], w.info
    w.exit()
    clean, done = exits_clean(log, [w.info["pid"]])
    assert clean, done


def test_memory_one_process_could_write_is_shared_only_where_all_allow_it(share_env):
    """Where the driver will not map the uploaded memory read-only, an
    in-place write in the uploader would change every importer's weights:
    the upload stays private and says so, and the next loader is told why
    at once and uploads its own. Processes that allow writable sharing
    share it among themselves only."""
    env, log = share_env
    # An uploader's second cuMemSetAccess makes its memory read-only.
    kept = Worker(dict(env, FAKECUDA_FAIL="cuMemSetAccess@2"), "model-w")
    assert kept.info["sharing"] == "private" and kept.info["equal"] and not kept.info["read_only"], kept.info
    assert kept.info["fallback"] == "not_read_only", kept.info
    assert "in-place write" in kept.info["note"] and "cuMemSetAccess" in kept.info["note"], kept.info
    protected = Worker(env, "model-w")
    assert protected.info["sharing"] == "private" and protected.info["fallback"] == "not_read_only", protected.info
    assert "the process serving" in protected.info["note"], protected.info
    assert protected.info["seconds"] < 10, "it waited for the process that kept its copy"
    allowed = Worker(dict(env, FAKECUDA_FAIL="cuMemSetAccess@2", SHARE_WRITABLE="1"), "model-w")
    assert allowed.info["sharing"] == "uploaded" and not allowed.info["read_only"], allowed.info
    importer = Worker(dict(env, SHARE_WRITABLE="1"), "model-w")
    assert importer.info["sharing"] == "imported" and importer.info["equal"], importer.info
    assert {e["pid"] for e in events(log, "export")} == {allowed.info["pid"]}, "only the writable one was asked"
    workers = [kept, protected, allowed, importer]
    for w in workers:
        w.exit()
    clean, done = exits_clean(log, [w.info["pid"] for w in workers])
    assert clean, done


@pytest.mark.parametrize("write_protect", [True, False])
def test_a_load_s_write_protect_decides_whether_writable_memory_is_shared(share_env, case, write_protect):
    """What a load asks for reaches the upload: with the write guard on
    (the default), memory the driver will not map read-only stays private;
    with ``write_protect=False`` it is shared as it is."""
    c = case(
        f"""
import torch
from ray_zerocopy import _load, _seal
sealed, buf = _seal.seal({{"w": torch.arange(10000, dtype=torch.float32)}})
w = rzc.Weights.from_buffer(shared_buffer(buf, "wp"), write_protect={write_protect})
options = _load.LoadOptions(device="cuda:0", write_protect={write_protect}, share_key="k")
# torch here has no CUDA to make tensors of the upload with: what is tested
# is what reaches the upload, so the framework step takes nothing.
class NoTensors:
    adopt = staticmethod(lambda source, indices, fast: [None] * len(indices))
_load.adapter = lambda framework: NoTensors
tensors, info = _load.materialize(w, sealed, options)
print(json.dumps({{k: info[k] for k in ("sharing", "read_only", "fallback")}}))
""",
        RZC_SHARE_DIR=share_env[0]["RZC_SHARE_DIR"],
        FAKECUDA_FAIL="cuMemSetAccess@2",  # the upload's mapping made read-only
    )
    assert c.proc.returncode == 0, c
    expected = (
        {"sharing": "private", "read_only": False, "fallback": "not_read_only"}
        if write_protect
        else {"sharing": "uploaded", "read_only": False, "fallback": "none"}
    )
    assert c.result == expected, c


def test_one_process_loading_twice_uses_its_own_mapping(share_env, case):
    share_dir = share_env[0]["RZC_SHARE_DIR"]
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
        RZC_SHARE_DIR=share_dir,
    )
    assert c.proc.returncode == 0, c
    assert c.result == {"same": True, "a": "uploaded", "b": "uploaded"}, c
    assert sum(e["op"] == "create" for e in c.events) == 1 and c.leaks == 0, c


# -- trust: what an importer is told, and what it maps ------------------------
def test_a_checkpoint_that_differs_in_one_row_never_shares(share_env):
    """Two checkpoints of one model that differ in one value (outside any
    sample a cheap identity would take) have different content digests: the
    second uploads its own copy and computes with its own weights."""
    env, log = share_env
    a = Worker(env, "model-f")
    b = Worker(env, "model-f", "1", "--patch")
    assert a.info["sharing"] == "uploaded"
    assert a.info["digest"] != b.info["digest"]
    assert b.info["sharing"] == "private" and b.info["fallback"] == "other_content", b.info
    assert b.info["equal"], "its own values, the patched row included"
    assert not events(log, "import", b.info["pid"])
    for w in (a, b):
        w.exit()


def _rogue(env, share_env_dir, mode, like):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "rogue_server.py"), share_env_dir, mode, str(like["nbytes"]),
         like["digest"]],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _stop(proc):
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    proc.wait(timeout=60)


@contextlib.contextmanager
def _against_rogue(env, key, mode):
    """A loader of ``key`` whose rendezvous a same-user rogue server
    (``rogue_server.py`` ``mode``) took first; yields the loader, which exits
    after the block."""
    probe = Worker(env, key)  # leaves the key's lock and socket files behind
    probe.exit()
    rogue = _rogue(env, env["RZC_SHARE_DIR"], mode, probe.info)
    try:
        victim = Worker(env, key)
        yield victim
        victim.exit()
    finally:
        _stop(rogue)


def test_memory_a_server_hands_over_is_read_back_before_use(share_env):
    """A same-user process that takes the key's socket first and hands over
    other memory of the right size, with the right size and digest in its
    offer: the importer reads windows of it back, finds they differ from its
    own buffer, and uploads privately with the reason."""
    env, log = share_env
    with _against_rogue(env, "model-g", "zeros") as victim:
        assert victim.info["sharing"] == "private" and victim.info["fallback"] == "mismatch", victim.info
        assert "differs from this process's weights" in victim.info["note"], victim.info
        assert victim.info["equal"], "computes with its own weights"
        assert events(log, "import", victim.info["pid"]), "it did map the rogue memory, then dropped it"
    clean, done = exits_clean(log, [victim.info["pid"]])
    assert clean, done


def test_a_server_that_never_answers_is_named(share_env):
    env, log = share_env
    with _against_rogue(env, "model-h", "silent") as victim:
        assert victim.info["seconds"] < 10, "not the whole share_wait (20 s)"
        assert victim.info["sharing"] == "private" and victim.info["fallback"] == "silent", victim.info
        assert "did not answer within" in victim.info["note"], victim.info


def test_a_server_whose_queue_is_full_is_named_not_waited_on_forever(share_env):
    """A listener that accepts no one (stopped, stuck in the driver, or a
    neighbour's) fills its queue of connections; a blocking connect would
    then wait forever, holding every later shared load of the process."""
    env, log = share_env
    with _against_rogue(env, "model-q", "full") as victim:
        assert victim.info["seconds"] < 10, victim.info
        assert victim.info["sharing"] == "private" and victim.info["fallback"] == "silent", victim.info


def test_an_answer_in_another_protocol_is_named_at_once(share_env):
    env, log = share_env
    with _against_rogue(env, "model-p", "foreign") as victim:
        assert victim.info["seconds"] < 5, "it looked again and again instead of stopping"
        assert victim.info["sharing"] == "private" and victim.info["fallback"] == "rendezvous", victim.info
        assert "another version" in victim.info["note"], victim.info
        assert not events(log, "import", victim.info["pid"]), "it mapped what a foreign server handed over"


def test_a_server_that_cannot_export_says_so(share_env):
    """The uploader's driver refuses to export the memory: it answers with
    the reason, and the loader uploads its own at once, instead of taking
    the closed connection for a server that went away and looking again
    until its whole wait (20 s) has passed."""
    env, log = share_env
    server = Worker(dict(env, FAKECUDA_FAIL="cuMemExportToShareableHandle"), "model-x")
    assert server.info["sharing"] == "uploaded", server.info
    loader = Worker(env, "model-x")
    assert loader.info["seconds"] < 5, loader.info
    assert loader.info["sharing"] == "private" and loader.info["fallback"] == "import_failed", loader.info
    assert "could not export it" in loader.info["note"] and "CUDA_ERROR_NOT_SUPPORTED" in loader.info["note"]
    for w in (server, loader):
        w.exit()


def test_clients_that_never_read_hold_up_no_one(share_env):
    """Three same-user clients connect to the server and never read; a
    loader right after them still imports at once. The buffer has a large
    header (3000 more tensors), larger than a socket's buffer."""
    import socket

    env, log = share_env
    server = Worker(env, "model-i", "1", "--many")
    share_dir = env["RZC_SHARE_DIR"]
    (sock_path,) = [os.path.join(share_dir, f) for f in os.listdir(share_dir) if f.endswith(".sock")]
    stalled = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        stalled.append(s)
    try:
        loader = Worker(env, "model-i", "1", "--many")
        assert loader.info["sharing"] == "imported" and loader.info["equal"], loader.info
        assert loader.info["seconds"] < 5, f"the upload call took {loader.info['seconds']:.1f} s"
        loader.exit()
    finally:
        for s in stalled:
            s.close()
        server.exit()


@pytest.mark.parametrize("squat", ["symlink", "open_mode", "other_owner"])
def test_a_squatted_directory_never_turns_sharing_off(tmp_path, squat):
    """The runtime directory's (and Ray's session directory's) entry is taken
    by someone else first: a symbolic link, a directory open to others, or
    one of another user. Sharing goes on in a private directory elsewhere,
    and the note says so."""
    if squat == "other_owner" and os.geteuid() != 0:
        pytest.skip("skipped: making a directory of another user needs root")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rzc-"))  # short: socket paths hold 107 bytes
    xdg, session, home, tmp = (base / d for d in ("xdg", "session", "home", "tmp"))
    for d in (xdg, session, home, tmp):
        d.mkdir(mode=0o700)
    for taken in (xdg / "ray-zerocopy", session / "ray-zerocopy"):
        if squat == "symlink":
            (base / f"elsewhere-{taken.parent.name}").mkdir(mode=0o700)
            taken.symlink_to(base / f"elsewhere-{taken.parent.name}")
        else:
            taken.mkdir()
            if squat == "open_mode":
                taken.chmod(0o777)
            else:
                os.chown(taken, 65534, 65534)
    log = tmp_path / "driver.jsonl"
    dropped = ("RZC_SHARE_DIR", "XDG_CACHE_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_") and k not in dropped}
    env.update(XDG_RUNTIME_DIR=str(xdg), SHARE_DIR=str(session / "ray-zerocopy"), HOME=str(home), TMPDIR=str(tmp),
               FAKECUDA_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    a, b = Worker(env, "model-j"), Worker(env, "model-j")
    try:
        assert (a.info["sharing"], b.info["sharing"]) == ("uploaded", "imported"), (a.info, b.info)
        expected = {"symlink": "symbolic link", "open_mode": "open to others",
                    "other_owner": "belongs to uid 65534"}[squat]
        assert expected in a.info["dir_note"] and str(tmp) in a.info["dir_note"], a.info
        (fallback,) = [p for p in tmp.iterdir() if p.name.startswith(f"ray-zerocopy-{os.geteuid()}-")]
        assert len(fallback.name.rsplit("-", 1)[1]) == 32, "a name no one else can guess"
        assert oct(fallback.stat().st_mode & 0o777) == "0o700"
    finally:
        a.exit()
        b.exit()
        shutil.rmtree(base, ignore_errors=True)
