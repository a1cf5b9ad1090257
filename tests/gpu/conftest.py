"""GPU tests need a CUDA device; without one every test here is skipped with
the reason "skipped: no CUDA device" (pytest -rs shows it)."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _cuda_count() -> int:
    from ray_zerocopy.errors import NoCudaError
    from ray_zerocopy.weights import cuda_device_count

    try:
        return cuda_device_count()
    except NoCudaError:
        return 0


def pytest_collection_modifyitems(config, items):
    if _cuda_count() == 0 or not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="skipped: no CUDA device")
        for item in items:
            item.add_marker(skip)


def shared_buffer(data: np.ndarray, name: str) -> np.ndarray:
    """A copy of ``data`` in a /dev/shm file (shared, pageable memory, as
    Ray's object store is), mapped by this process."""
    path = os.path.join("/dev/shm", f"rzc-test-{os.getpid()}-{name}")
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=data.shape)
    mm[:] = data
    os.unlink(path)  # the mapping stays valid
    return mm


@pytest.fixture
def shm():
    return shared_buffer
