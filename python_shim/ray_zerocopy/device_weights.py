"""Tensors on a CUDA device: the upload of an opened buffer
(:meth:`Weights.upload <ray_zerocopy.Weights.upload>` calls :func:`upload`)
and the handle over its one device allocation (:class:`DeviceWeights`).
The codes the native library reports (staging, sharing, fallbacks) are named
from its own header, never from a copy kept here.
"""

from __future__ import annotations

import os

import numpy as np

from ._dlpack import DLPackTensor, export_checked, kDLCUDA
from ._native import check, code_names, ffi, lib, new_struct, text
from .errors import InvalidInputError

__all__ = ["DeviceWeights", "cuda_device_count", "upload", "STAGING_NAMES", "SHARING_NAMES"]

#: ``RZC_STAGING_*`` code -> name (``"auto"``, ``"register"``, ...).
STAGING_NAMES = code_names("RZC_STAGING_")
#: ``RZC_SHARING_*`` code -> name (``"private"``, ``"uploaded"``, ``"imported"``).
SHARING_NAMES = code_names("RZC_SHARING_")
# What a caller may ask for: every staging mode but the one only reported.
_STAGING_CODES = {name: code for code, name in STAGING_NAMES.items() if code != lib.RZC_STAGING_NONE}


def cuda_device_count() -> int:
    """CUDA devices this process sees (``NoCudaError`` when there is no driver)."""
    out = ffi.new("int32_t *")
    check(lib.rzc_cuda_count_devices(out))
    return out[0]


def upload(
    handle,
    ordinal: int = 0,
    *,
    staging: str = "auto",
    chunk_bytes: int = 0,
    threads: int = 0,
    share: str | None = None,
    share_wait: float = 30.0,
    share_digest: bytes | None = None,
    share_dir: str | None = None,
    share_writable: bool = False,
) -> DeviceWeights:
    """Uploads the opened buffer ``handle`` (an ``rzc_weights *``) to device
    ``ordinal``; the arguments are those of :meth:`Weights.upload
    <ray_zerocopy.Weights.upload>`, which documents them."""
    modes = _STAGING_CODES
    if staging not in modes:
        raise InvalidInputError(f"staging {staging!r} is not one of {sorted(modes)}")
    key = share.encode("utf-8") if share is not None else b""
    key_buf = ffi.new("char[]", key)  # alive until the call returns
    digest = ffi.NULL
    if share_digest is not None:
        if len(share_digest) != 32:
            raise InvalidInputError(f"share_digest must be 32 bytes, not {len(share_digest)}")
        digest = ffi.new("rzc_digest *", {"bytes": list(share_digest)})
    dir_bytes = os.fsencode(share_dir) if share_dir is not None else b""
    dir_buf = ffi.new("char[]", dir_bytes)
    opts = new_struct(
        "rzc_upload_options",
        chunk_nbytes=chunk_bytes,
        staging=modes[staging],
        threads=threads,
        share_key=key_buf if share is not None else ffi.NULL,
        share_key_len=len(key),
        share_wait_ms=max(1, int(share_wait * 1000)),
        share_digest=digest,
        share_dir=dir_buf if share_dir is not None else ffi.NULL,
        share_dir_len=len(dir_bytes),
        share_writable=int(bool(share_writable)),
    )
    out = ffi.new("rzc_device_weights **")
    check(lib.rzc_device_weights_upload(handle, ordinal, opts, out))
    return DeviceWeights(out[0])


class DeviceWeights:
    """Tensors uploaded to one CUDA device allocation. Exported tensors keep
    the allocation alive after this handle is gone. Every method may be
    called from several threads at once; the handle is freed when the last
    reference to it goes."""

    __slots__ = ("_handle", "_device")

    def __init__(self, handle):
        self._handle = ffi.gc(handle, lib.rzc_device_weights_free)
        self._device = (kDLCUDA, self.info()["ordinal"])

    def __len__(self) -> int:
        return lib.rzc_device_weights_len(self._handle)

    def info(self) -> dict:
        """Allocation address and size, ordinal, the staging this process
        used (``"none"`` when it imported another's upload), seconds taken,
        how many host-to-device copies it was planned as (1: one contiguous
        copy), ``sharing`` (``"private"``, ``"uploaded"``, ``"imported"``),
        whether the device maps it ``read_only``; when a requested share did
        not happen, ``fallback`` (a name: ``"mismatch"``, ``"other_content"``,
        ``"silent"``, ... see ``RZC_SHARE_FALLBACK_*`` in ``rzc.h``; ``"none"``
        otherwise) and the ``note`` saying why; ``dir_note`` (rendezvous
        directories passed over, and why); ``verified_nbytes`` and
        ``verified_copies`` (what this process read back to check memory it
        imported)."""
        i = new_struct("rzc_device_info")
        check(lib.rzc_device_weights_info(self._handle, i))
        return {
            "device_ptr": i.device_ptr,
            "nbytes": i.nbytes,
            "ordinal": i.ordinal,
            "staging": STAGING_NAMES.get(i.staging, str(i.staging)),
            "seconds": i.seconds,
            "copies": i.copies,
            "sharing": SHARING_NAMES.get(i.sharing, str(i.sharing)),
            "read_only": bool(i.read_only),
            "note": text(i.note, i.note_len),
            "fallback": _fallback_name(i.fallback),
            "dir_note": text(i.dir_note, i.dir_note_len),
            "verified_nbytes": i.verified_nbytes,
            "verified_copies": i.verified_copies,
        }

    def data_ptr(self, index: int) -> int:
        """Device address of tensor ``index`` (a ``CUdeviceptr``)."""
        t = ffi.new("rzc_device_tensor_info *")
        check(lib.rzc_device_weights_get(self._handle, index, t))
        return t.device_ptr

    def read(self, index: int) -> np.ndarray:
        """A host copy of tensor ``index``'s bytes (``uint8``), read back from
        the device: for checking what an upload wrote."""
        t = ffi.new("rzc_device_tensor_info *")
        check(lib.rzc_device_weights_get(self._handle, index, t))
        out = np.empty(t.nbytes, dtype=np.uint8)
        check(lib.rzc_device_weights_read(self._handle, index, ffi.from_buffer("uint8_t[]", out), out.nbytes))
        return out

    def dlpack(self, index: int) -> DLPackTensor:
        """Tensor ``index`` as a kDLCUDA DLPack producer (torch, JAX, CuPy)."""
        return DLPackTensor(self, index, self._device)

    def export_versioned(self, index: int):
        return export_checked(lib.rzc_device_weights_to_dlpack, self._handle, index, "DLManagedTensorVersioned")

    def export_legacy(self, index: int):
        return export_checked(lib.rzc_device_weights_to_dlpack_legacy, self._handle, index, "DLManagedTensor")


def _fallback_name(code: int) -> str:
    name = lib.rzc_share_fallback_name(code)
    return str(code) if name == ffi.NULL else ffi.string(name).decode()
