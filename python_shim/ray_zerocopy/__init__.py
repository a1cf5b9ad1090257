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
from .device_weights import DeviceWeights, cuda_device_count
from .errors import (
    BadDeviceError,
    BadFormatError,
    BufferMismatchError,
    BufferTooSmallError,
    CheckpointChangedError,
    CheckpointNotFoundError,
    CudaError,
    DeviceNotVisibleError,
    DLPackExportError,
    InternalError,
    InvalidArgumentError,
    InvalidInputError,
    InvalidTypeError,
    IoError,
    IOFailure,
    MissingTensorError,
    NoCudaError,
    NotFoundError,
    NullArgumentError,
    OutOfMemoryError,
    OutOfRangeError,
    OwnerUnavailableError,
    PanicError,
    RayNotInitializedError,
    RayZeroCopyError,
    RegistryUnavailableError,
    RzcError,
    SealedObjectCorruptedError,
    SealedObjectLostError,
    UnshareableTensorError,
    UnsupportedDtypeError,
    UnsupportedObjectError,
    VersionConflictError,
    VersionNotFoundError,
)
from .packing import PackInput, PackPlan, Sealer, pack, seal_buffer
from .weights import TensorInfo, Weights

__version__ = _native_version()

__all__ = [
    "ActorWrapper",
    "TaskWrapper",
    "Owner",
    "Weights",
    "DeviceWeights",
    "cuda_device_count",
    "TensorInfo",
    "Dtype",
    "PackInput",
    "PackPlan",
    "pack",
    "seal_buffer",
    "Sealer",
    "LoadOptions",
    "RayZeroCopyError",
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
    "InvalidInputError",
    "InvalidTypeError",
    "UnshareableTensorError",
    "DeviceNotVisibleError",
    "CheckpointChangedError",
    "CheckpointNotFoundError",
    "MissingTensorError",
    "UnsupportedObjectError",
    "DLPackExportError",
    "RayNotInitializedError",
    "SealedObjectLostError",
    "SealedObjectCorruptedError",
    "BufferMismatchError",
    "InternalError",
    "VersionConflictError",
    "VersionNotFoundError",
    "RegistryUnavailableError",
    "OwnerUnavailableError",
    "publish",
    "unpublish",
    "latest",
    "versions",
    "Subscription",
    "Version",
]


def __getattr__(name):
    # The wrappers need Ray only when used, and the load options come with
    # the loader, which a process that only opens buffers never needs; resolve
    # them on first access.
    if name in ("ActorWrapper", "TaskWrapper"):
        from . import wrappers

        return getattr(wrappers, name)
    if name in ("publish", "unpublish", "latest", "versions", "Subscription", "Version"):
        from . import _versions

        return getattr(_versions, name)
    if name == "Owner":
        from ._owner import Owner

        return Owner
    if name == "LoadOptions":
        from ._load import LoadOptions

        return LoadOptions
    raise AttributeError(f"module 'ray_zerocopy' has no attribute {name!r}")
