"""DLPack producer objects over tensors of an opened buffer.

A consumer (``torch.from_dlpack``, ``np.from_dlpack``, ``jax.dlpack.from_dlpack``)
calls ``__dlpack__``; we return a capsule holding a ``DLManagedTensorVersioned``
when it asks with ``max_version >= (1, 0)`` and a legacy ``DLManagedTensor``
otherwise (JAX asks without ``max_version``). The capsule's destructor calls
the tensor's deleter only if no consumer took it (the protocol renames a taken
capsule to ``used_dltensor*``). Capsules are made with the CPython API through
ctypes: the native library stays free of Python.
"""

from __future__ import annotations

import ctypes
from itertools import repeat

from ._native import check, ffi, lib
from .errors import DLPackExportError

# The DLPack device types, from the header's copy of dlpack.h.
kDLCPU = lib.kDLCPU
kDLCUDA = lib.kDLCUDA

_VERSIONED = b"dltensor_versioned"
_LEGACY = b"dltensor"

_api = ctypes.pythonapi
_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _DESTRUCTOR]
# The same function with no destructor (a NULL pointer), for capsules that
# are consumed at once (see consume_versioned).
_new_bare = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", _api)
)
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


@_DESTRUCTOR
def _free_versioned(capsule):  # pragma: no cover - runs inside capsule dealloc
    if _api.PyCapsule_IsValid(capsule, _VERSIONED):
        ptr = _api.PyCapsule_GetPointer(capsule, _VERSIONED)
        lib.rzc_dlpack_versioned_free(ffi.cast("DLManagedTensorVersioned *", ptr))


@_DESTRUCTOR
def _free_legacy(capsule):  # pragma: no cover - runs inside capsule dealloc
    if _api.PyCapsule_IsValid(capsule, _LEGACY):
        ptr = _api.PyCapsule_GetPointer(capsule, _LEGACY)
        lib.rzc_dlpack_legacy_free(ffi.cast("DLManagedTensor *", ptr))


def versioned_capsule(managed) -> object:
    """Wraps a ``DLManagedTensorVersioned *`` (a cffi pointer, or its address
    as an int) in a capsule."""
    address = managed if isinstance(managed, int) else int(ffi.cast("uintptr_t", managed))
    return _api.PyCapsule_New(address, _VERSIONED, _free_versioned)


def consume_versioned(addresses, consumer) -> list:
    """``consumer(capsule)`` for a bare capsule around each of
    ``addresses`` (``DLManagedTensorVersioned *``), for a consumer that takes
    every capsule it is given (``torch.from_dlpack``). The capsules have no
    destructor: a ctypes callback per capsule, run even for a consumed one,
    cost a quarter of a millisecond per load of a few hundred tensors. All
    capsules are made first, then consumed, each step one ``map`` with no
    Python bytecode per tensor (a loop appending each result cost 0.07 us a
    tensor more: 1.4 of 10 ms for 20,000). If anything fails, every tensor
    whose capsule was not taken (a taken one is renamed by its consumer) is
    freed here, and the error propagates."""
    return _consume(addresses, consumer, _VERSIONED, "DLManagedTensorVersioned *", lib.rzc_dlpack_versioned_free)


def consume_legacy_all(addresses, consumer) -> list:
    """:func:`consume_versioned` for legacy capsules (``DLManagedTensor *``),
    for a consumer that takes them all or fails (JAX's import, where the
    arrays are known to suit it); see :func:`consume_legacy` for one that
    may refuse some."""
    return _consume(addresses, consumer, _LEGACY, "DLManagedTensor *", lib.rzc_dlpack_legacy_free)


def _consume(addresses, consumer, name: bytes, ctype: str, free) -> list:
    try:
        capsules = list(map(_new_bare, addresses, repeat(name), repeat(None)))
    except BaseException:
        for address in addresses:  # none was handed out: every one is still ours
            free(ffi.cast(ctype, address))
        raise
    try:
        return list(map(consumer, capsules))
    except BaseException:
        for capsule, address in zip(capsules, addresses, strict=True):
            if _is_capsule(capsule, name):
                free(ffi.cast(ctype, address))
        raise


_is_capsule = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_IsValid", _api))


def consume_legacy(addresses, consumer) -> list:
    """``consumer(capsule)`` for a bare legacy capsule around each of
    ``addresses`` (``DLManagedTensor *``), as :func:`consume_versioned`, for
    a consumer that may refuse one (JAX refuses what it cannot adopt): where
    it raises, the capsule it left unconsumed is freed and ``None`` stands
    for it, for the caller to take another way. Anything but an
    ``Exception`` frees every tensor not taken, and propagates."""
    new, free = _new_bare, lib.rzc_dlpack_legacy_free
    out, i, capsule = [], 0, None
    try:
        while i < len(addresses):
            capsule = new(addresses[i], _LEGACY, None)
            try:
                out.append(consumer(capsule))
            except Exception:
                if _is_capsule(capsule, _LEGACY):  # not taken: still ours
                    free(ffi.cast("DLManagedTensor *", addresses[i]))
                out.append(None)
            capsule = None
            i += 1
    except BaseException:
        # Tensor i is in hand: ours unless its outcome is recorded or the
        # consumer took its capsule.
        if len(out) == i and i < len(addresses) and (capsule is None or _is_capsule(capsule, _LEGACY)):
            free(ffi.cast("DLManagedTensor *", addresses[i]))
        for address in addresses[i + 1 :]:
            free(ffi.cast("DLManagedTensor *", address))
        raise
    return out


def legacy_capsule(managed) -> object:
    """Wraps a ``DLManagedTensor *`` (cffi pointer) in a capsule."""
    return _api.PyCapsule_New(int(ffi.cast("uintptr_t", managed)), _LEGACY, _free_legacy)


class DLPackTensor:
    """One tensor of an opened buffer, ready for any DLPack consumer.

    Export is zero-copy and read-only; the tensor a consumer builds keeps the
    underlying buffer alive for as long as it lives.
    """

    __slots__ = ("_exporter", "_index", "_device")

    def __init__(self, exporter, index: int, device=(kDLCPU, 0)):
        self._exporter = exporter
        self._index = index
        self._device = device

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise DLPackExportError("ray-zerocopy exports shared memory without copying; copy=True is not supported")
        if dl_device is not None and tuple(dl_device) != tuple(self._device):
            raise DLPackExportError(f"tensor lives on DLPack device {self._device}, not {tuple(dl_device)}")
        if max_version is not None and max_version[0] >= 1:
            return versioned_capsule(self._exporter.export_versioned(self._index))
        return legacy_capsule(self._exporter.export_legacy(self._index))


def export_checked(fn, handle, index: int, ctype: str):
    """Calls an ``rzc_*_to_dlpack``-shaped function and returns the pointer."""
    out = ffi.new(ctype + " **")
    check(fn(handle, index, out))
    return out[0]
