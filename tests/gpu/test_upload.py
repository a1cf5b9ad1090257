"""Uploads on a CUDA driver, checked through the library's own API (values
read back from the device, addresses, sizes): on the stand-in in `make test`,
on a GPU in `run_gpu_checks.sh`."""

import gc

import numpy as np
import pytest
import ray_zerocopy as rzc
from common import sample_tensors, sealed_in_shm
from ray_zerocopy.weights import cuda_device_count

torch = pytest.importorskip("torch")

def sealed(obj, shm, name):
    return sealed_in_shm(obj, shm, name)[1]


def as_bytes(t):
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("staging", ["auto", "register", "pinned", "pageable"])
def test_every_dtype_bit_for_bit(shm, staging, driver_log):
    tensors = sample_tensors()
    w = sealed(tensors, shm, staging)
    dev = w.upload(0, staging=staging, chunk_bytes=1 << 16)  # small chunks: many pieces
    info = dev.info()
    assert info["staging"] == ("register" if staging == "auto" else staging)
    assert info["copies"] == 1, "a sealed buffer is uploaded as one contiguous copy"
    lo, hi = info["device_ptr"], info["device_ptr"] + info["nbytes"]
    for i, (name, ref) in enumerate(tensors.items()):
        assert w.info(i).name == name
        ptr = dev.data_ptr(i)
        assert lo <= ptr <= hi and (ptr - lo) % 256 == 0, "inside the one allocation, 256-aligned"
        assert dev.read(i).tobytes() == as_bytes(ref), name
    del dev, w
    gc.collect()
    assert not _held(driver_log), "everything released"


def _held(driver_log):
    from common import held

    return held(driver_log())


def test_device_memory_is_model_plus_padding(shm):
    tensors = {f"w{i}": torch.randn(1000 + i) for i in range(50)}
    w = sealed(tensors, shm, "mem")
    payload = sum(t.numel() * 4 for t in tensors.values())
    dev = w.upload(0)
    assert payload <= dev.info()["nbytes"] <= payload + 256 * len(tensors)


def test_a_buffer_not_packed_by_us_is_placed_tensor_by_tensor(shm, tmp_path):
    """Tensors of a file written by the official library lie at any offset:
    each is placed at a 256-byte boundary on the device and copied alone."""
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float16), "c": torch.arange(7.0)}
    path = tmp_path / "official.safetensors"
    save_file(tensors, str(path))
    w = rzc.Weights.from_buffer(shm(np.fromfile(path, dtype=np.uint8), "official"))
    dev = w.upload(0)
    assert dev.info()["copies"] == len(tensors)
    for i, t in enumerate(w.table()):
        assert (dev.data_ptr(i) - dev.info()["device_ptr"]) % 256 == 0
        assert dev.read(i).tobytes() == as_bytes(tensors[t.name])


def test_tensors_keep_the_allocation_after_the_handle_goes(shm, driver_log):
    """An exported DLPack tensor keeps the device allocation alive after the
    handle is freed; the allocation is freed with the last tensor."""
    from ray_zerocopy._native import lib

    w = sealed({"a": torch.arange(4096, dtype=torch.float32)}, shm, "order")
    dev = w.upload(0)
    tensor = dev.export_versioned(0)
    del dev, w
    gc.collect()
    frees = lambda: [e for e in driver_log() if e["op"] == "free"]  # noqa: E731
    if driver_log():  # the stand-in logs
        assert not frees(), "the tensor still holds the allocation"
    lib.rzc_dlpack_versioned_free(tensor)
    if driver_log():
        assert len(frees()) == 1


def test_errors_are_statuses(shm):
    w = sealed({"a": torch.ones(4)}, shm, "err")
    with pytest.raises(rzc.BadDeviceError, match="out of range") as e:
        w.upload(cuda_device_count())
    assert e.value.status == "RZC_BAD_DEVICE" and isinstance(e.value, rzc.NoCudaError)
    with pytest.raises(ValueError, match="staging"):
        w.upload(0, staging="teleport")
    dev = w.upload(0)
    with pytest.raises(rzc.OutOfRangeError):
        dev.data_ptr(1)
