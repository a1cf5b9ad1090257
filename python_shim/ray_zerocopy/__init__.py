"""ray-zerocopy: one copy of a model's weights per machine, however many Ray
actors use it.

    from ray_zerocopy import ActorWrapper
    wrapper = ActorWrapper(pipeline, device="cpu")      # once, on the driver
    pipeline = wrapper.load()                           # in each actor: zero-copy

Importing this package needs only numpy and the native library; torch, JAX
and Ray are imported when used.
"""

from ._native import Dtype
from ._native import version as _native_version
from .errors import (
    BadDeviceError,
    BadFormatError,
    BufferTooSmallError,
    CudaError,
    InvalidArgumentError,
    IOFailure,
    IoError,
    NoCudaError,
    NotFoundError,
    NullArgumentError,
    OutOfMemoryError,
    OutOfRangeError,
    PanicError,
    RzcError,
    UnsupportedDtypeError,
)
from .device_weights import DeviceWeights
from .pack import PackInput, PackPlan, Sealer, pack, seal_buffer
from .weights import TensorInfo, Weights

__version__ = _native_version()

__all__ = [
    "ActorWrapper",
    "TaskWrapper",
    "Weights",
    "DeviceWeights",
    "TensorInfo",
    "Dtype",
    "PackInput",
    "PackPlan",
    "pack",
    "seal_buffer",
    "Sealer",
    "RzcError",
    "BadFormatError",
    "InvalidArgumentError",
    "NullArgumentError",
    "OutOfRangeError",
    "BufferTooSmallError",
    "NotFoundError",
    "UnsupportedDtypeError",
    "IoError",
    "IOFailure",
    "NoCudaError",
    "BadDeviceError",
    "CudaError",
    "OutOfMemoryError",
    "PanicError",
]


def __getattr__(name):
    # The wrappers need Ray only when used; resolve them on first access.
    if name in ("ActorWrapper", "TaskWrapper"):
        from . import wrappers

        return getattr(wrappers, name)
    raise AttributeError(f"module 'ray_zerocopy' has no attribute {name!r}")
