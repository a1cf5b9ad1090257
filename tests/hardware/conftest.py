"""Framework checks on a real GPU: torch, JAX and CuPy adopt uploaded
tensors, models give the outputs `.to("cuda")` gives. They need a CUDA
device and torch built with CUDA; elsewhere (and on the stand-in driver)
every test here is skipped with "skipped: no CUDA device"."""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "gpu"))

from common import backend, shared_buffer  # noqa: E402

torch = pytest.importorskip("torch")


def pytest_collection_modifyitems(config, items):
    mine = [i for i in items if os.path.dirname(os.path.abspath(str(i.path))) == _HERE]
    if mine and (backend() != "cuda" or not torch.cuda.is_available()):
        for item in mine:
            item.add_marker(pytest.mark.skip(reason="skipped: no CUDA device"))


@pytest.fixture
def shm():
    return shared_buffer
