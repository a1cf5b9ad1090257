"""Every error path of an upload, driven through the stand-in driver's fault
injection (`FAKECUDA_FAIL`, `FAKECUDA_MEM_MB`, ...): each failure is an
error that names the problem, and the process holds nothing afterwards (the
driver log's `leaks` at exit is 0). Each case runs in its own process, whose
driver reads its settings when it loads."""

import pytest

pytestmark = pytest.mark.standin


def upload_case(staging="auto", ordinal=0, chunk=1 << 16, tensors=8, size=1000):
    """A snippet that seals `tensors` float32 tensors into shared memory,
    uploads them and prints what happened as JSON."""
    return f"""
import gc, torch
from ray_zerocopy import _seal
state = {{f"w{{i}}": torch.arange({size} * (i + 1), dtype=torch.float32) * (i + 1) for i in range({tensors})}}
_, buf = _seal.seal(state)
w = rzc.Weights.from_buffer(shared_buffer(buf, "case"))
out = {{}}
try:
    dev = w.upload({ordinal}, staging={staging!r}, chunk_bytes={chunk})
except rzc.RzcError as e:
    out.update(error=type(e).__name__, status=e.status, message=e.message)
else:
    info = dev.info()
    out.update(staging=info["staging"], ordinal=info["ordinal"], ptr=info["device_ptr"],
               equal=all(dev.read(i).tobytes() == t.numpy().tobytes() for i, t in enumerate(state.values())))
    del dev
del w
gc.collect()
print(json.dumps(out))
"""


def check_clean(c):
    assert c.proc.returncode == 0, c
    assert c.leaks == 0, f"the process still held driver resources at exit: {c}"
    return c.result


def test_registration_refused_falls_back_to_pinned_buffers(case):
    c = case(upload_case("auto"), FAKECUDA_FAIL="cuMemHostRegister=CUDA_ERROR_NOT_PERMITTED")
    r = check_clean(c)
    assert r == {**r, "staging": "pinned", "equal": True}, c
    assert any(e["op"] == "host_alloc" for e in c.events) and not any(e["op"] == "register" for e in c.events)


def test_without_read_only_registration_the_source_is_registered_writable(case):
    """A device without read-only registration gets plain registration (the
    read-only flag would be refused and force the slower fallback)."""
    c = case(upload_case("auto"), FAKECUDA_NO_READONLY_REGISTER=1)
    r = check_clean(c)
    assert r == {**r, "staging": "register", "equal": True}, c


def test_registration_failing_midway_undoes_the_others(case):
    c = case(upload_case("register", chunk=8192, size=4000),
             FAKECUDA_FAIL="cuMemHostRegister@3=CUDA_ERROR_INVALID_VALUE")
    r = check_clean(c)
    assert r["error"] == "CudaError", c
    assert "cuMemHostRegister" in r["message"] and "CUDA_ERROR_INVALID_VALUE" in r["message"], c
    assert sum(e["op"] == "register" for e in c.events) >= 2, "earlier chunks were registered, then undone"


def test_out_of_device_memory(case):
    c = case(upload_case("auto", tensors=4, size=200_000), FAKECUDA_MEM_MB=2)
    r = check_clean(c)
    assert r["error"] == "OutOfMemoryError" and r["status"] == "RZC_OUT_OF_MEMORY", c
    assert "bytes of device memory on cuda:0" in r["message"] and "CUDA_ERROR_OUT_OF_MEMORY" in r["message"], c


@pytest.mark.parametrize("staging, nth", [("register", 3), ("pinned", 3), ("pageable", 1)])
def test_a_copy_failing_midway(case, staging, nth):
    # Registered and pinned uploads copy in chunks; a pageable one is a
    # single copy of the whole (contiguous) buffer.
    fail = f"cuMemcpyHtoDAsync@{nth}=CUDA_ERROR_ILLEGAL_ADDRESS"
    c = case(upload_case(staging, chunk=8192, size=4000), FAKECUDA_FAIL=fail)
    r = check_clean(c)
    assert r["error"] == "CudaError" and "cuMemcpyHtoDAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS" in r["message"], c


def test_auto_recovers_from_a_failed_registered_copy_with_pinned_buffers(case):
    c = case(upload_case("auto", chunk=8192, size=4000), FAKECUDA_FAIL="cuMemcpyHtoDAsync@2")
    r = check_clean(c)
    assert r == {**r, "staging": "pinned", "equal": True}, c


@pytest.mark.parametrize("staging", ["register", "pinned", "pageable"])
def test_a_failing_synchronize(case, staging):
    c = case(upload_case(staging), FAKECUDA_FAIL="cuStreamSynchronize@1=CUDA_ERROR_LAUNCH_FAILED")
    r = check_clean(c)
    assert "cuStreamSynchronize failed: CUDA_ERROR_LAUNCH_FAILED" in r.get("message", ""), c


@pytest.mark.parametrize(
    "symbol", ["cuMemAlloc", "cuStreamCreate", "cuMemHostAlloc@2", "cuEventCreate@2", "cuEventSynchronize@2"]
)
def test_a_failing_setup_call(case, symbol):
    staging = "pinned" if "Host" in symbol or "Event" in symbol else "auto"
    c = case(upload_case(staging, chunk=8192, size=8000), FAKECUDA_FAIL=f"{symbol}=CUDA_ERROR_UNKNOWN")
    r = check_clean(c)
    assert r.get("error") == "CudaError" and symbol.split("@")[0] in r["message"], c


def test_copies_that_complete_late_are_waited_for(case):
    """The stand-in's copies run later on its own thread: an upload that
    returned, unregistered or freed its bounce buffers before they ran would
    read back wrong values or a reported error."""
    for staging in ("register", "pinned", "pageable"):
        c = case(upload_case(staging, chunk=8192, size=4000), FAKECUDA_COPY_DELAY_US=2000)
        r = check_clean(c)
        assert r == {**r, "staging": staging, "equal": True}, c


def test_a_bad_ordinal_and_a_second_device(case):
    r = check_clean(case(upload_case("auto", ordinal=1)))
    assert r["error"] == "BadDeviceError" and "this process sees 1 CUDA device" in r["message"]
    two = case(upload_case("auto", ordinal=1), FAKECUDA_DEVICES=2)
    r = check_clean(two)
    assert r == {**r, "ordinal": 1, "equal": True}, two
    assert {e["dev"] for e in two.events if e["op"] == "alloc"} == {1}


def test_two_uploads_of_one_buffer_at_once(case):
    """Two threads upload one buffer at the same time (two models on one
    GPU, or one on two GPUs): they register the same pages, and neither may
    unregister them while the other's late copies still read them."""
    c = case(
        """
import gc, threading, torch
from ray_zerocopy import _seal
state = {f"w{i}": torch.arange(20000, dtype=torch.float32) * i for i in range(6)}
_, buf = _seal.seal(state)
w = rzc.Weights.from_buffer(shared_buffer(buf, "twice"))
results = [None, None]
def go(k):
    try:
        dev = w.upload(k % 2, staging="register", chunk_bytes=16384)
        results[k] = all(dev.read(i).tobytes() == t.numpy().tobytes() for i, t in enumerate(state.values()))
        del dev
    except rzc.RzcError as e:
        results[k] = e.message
threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
del w
gc.collect()
print(json.dumps(results))
""",
        FAKECUDA_COPY_DELAY_US=20000,
        FAKECUDA_DEVICES=2,
    )
    assert check_clean(c) == [True, True], c
