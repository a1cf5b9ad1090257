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


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # pytest calls this hook with every collected item, whichever conftest
    # defines it: mark only the tests in this directory.
    mine = [i for i in items if os.path.dirname(os.path.abspath(str(i.path))) == _HERE]
    if mine and (_cuda_count() == 0 or not torch.cuda.is_available()):
        skip = pytest.mark.skip(reason="skipped: no CUDA device")
        for item in mine:
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
