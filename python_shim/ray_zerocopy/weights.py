"""Opened safetensors buffers (``Weights``; the packer, ``pack``, is ``packing``'s, re-exported here).

``Weights`` is a thin handle over ``rzc_weights``: it validates the buffer in
the native library, lists its tensors, and exports them zero-copy through
DLPack. Opening memory keeps the Python owner of that memory (a numpy view of
a Ray object, ``bytes``, ...) alive until the handle *and every exported
tensor* are gone: the native library calls back when the last one goes.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from typing import NamedTuple

import numpy as np

from . import device_weights as _device
from ._dlpack import DLPackTensor, export_checked
from ._native import DTYPE_NAMES, check, code_names, ffi, lib, new_struct

# The device and packing halves live in their own modules; their public names
# stay importable from here, where they were first documented.
from .device_weights import DeviceWeights, cuda_device_count
from .errors import DLPackExportError, InvalidInputError
from .packing import PackInput, PackPlan, Sealer, pack, seal_buffer, view_at

__all__ = [
    "Weights",
    "TensorInfo",
    "live_buffers",
    "DeviceWeights",
    "cuda_device_count",
    "PackInput",
    "PackPlan",
    "Sealer",
    "pack",
    "seal_buffer",
    "view_at",
]

#: ``RZC_GUARD_*`` code -> name (``"none"``, ``"sealed"``, ``"private"``, ``"mprotect"``).
GUARD_NAMES = code_names("RZC_GUARD_")

# Owners of opened memory, keyed by the integer passed to the native release
# callback. A dict entry is the only strong reference the library needs.
_owners: dict[int, object] = {}
_owner_keys = itertools.count(1)


def _info_rows() -> np.dtype:
    """``rzc_tensor_info`` as a numpy record: each field where the C
    compiler put it, pointers read as addresses."""
    types = {"name": "u8", "name_len": "u8", "dtype": "i4", "ndim": "u4", "shape": "u8", "data": "u8", "nbytes": "u8"}
    fields = dict(ffi.typeof("rzc_tensor_info").fields)
    for name, code in types.items():
        if ffi.sizeof(fields[name].type) != np.dtype(code).itemsize:
            raise ImportError(f"rzc_tensor_info.{name} is not {np.dtype(code).itemsize} bytes on this platform")
    return np.dtype(
        {
            "names": list(types),
            "formats": list(types.values()),
            "offsets": [fields[name].offset for name in types],
            "itemsize": ffi.sizeof("rzc_tensor_info"),
        }
    )


_INFO_ROWS = _info_rows()


@ffi.callback("void(void *)")
def _release(ctx):  # pragma: no cover - called from native code
    try:
        _owners.pop(int(ffi.cast("uintptr_t", ctx)), None)
    except Exception:  # interpreter shutting down: nothing left to release
        pass


# The callback must outlive every tensor: a tensor in a reference cycle may
# be freed by the interpreter's last garbage collection, after this module's
# globals (this callback among them) are gone, and calling a freed callback
# jumps into freed memory (a crash at exit). One reference that is never
# dropped keeps it, and its trampoline, to the end of the process.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_release))


def live_buffers() -> int:
    """How many opened memory buffers are still referenced (by handles or
    tensors). For tests and diagnostics."""
    return len(_owners)


class TensorInfo(NamedTuple):
    """One tensor of an opened buffer, as the native library validated it."""

    name: str
    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple
    nbytes: int
    offset: int  # from the start of the buffer


class Weights:
    """An opened, validated safetensors buffer.

    Use :meth:`open_file` (memory-maps) or :meth:`from_buffer` (any object with
    the buffer protocol, without copying). One ``Weights`` may be used from
    several threads at once, :meth:`close` included: a call in progress on
    another thread completes, and a call made after ``close()`` raises
    :class:`~ray_zerocopy.errors.InvalidInputError`.
    """

    __slots__ = ("_handle", "_base", "_data_start", "_data_end", "_table", "_columns", "_rows_read", "__weakref__")

    def __init__(self, handle):
        # Freed by the collector when the last reference to it goes: this
        # object's, or that of a call in progress on another thread (each
        # call holds the handle it passes), so close() never frees a handle
        # a native call still reads.
        self._handle = ffi.gc(handle, lib.rzc_weights_free)
        layout = ffi.new("rzc_buffer_layout *")
        check(lib.rzc_weights_get_layout(handle, layout))
        self._base = int(ffi.cast("uintptr_t", layout.bytes))
        self._data_start = layout.data_start
        self._data_end = layout.data_end
        self._table = None
        self._columns = None
        self._rows_read = None

    @classmethod
    def open_file(cls, path: str | os.PathLike) -> Weights:
        """Memory-maps and opens a safetensors file."""
        out = ffi.new("rzc_weights **")
        check(lib.rzc_weights_open_file(os.fsencode(path), out))
        return cls(out[0])

    @classmethod
    def from_buffer(cls, buffer, *, write_protect: bool = False) -> Weights:
        """Opens any contiguous buffer (numpy array, bytes, memoryview, a Ray
        object's view) without copying; it stays referenced as long as needed.

        ``write_protect``: make every whole page of the buffer (tensor data
        and header) read-only in this process while anything from the buffer
        is alive (see :attr:`guard_state`), so that an in-place
        write through a tensor faults (killing the writer) instead of changing
        memory that other processes share. Needs the page of non-tensor bytes
        around the tensors that ``pack(guard_bytes=GUARD_NBYTES)`` leaves (one page)."""
        view = ffi.from_buffer("uint8_t[]", buffer)  # keeps `buffer` alive
        if len(view) == 0:
            # Nothing to borrow; let the parser say what is wrong.
            view = ffi.new("uint8_t[1]")
            size = 0
        else:
            size = len(view)
        key = next(_owner_keys)
        _owners[key] = view
        opts = new_struct(
            "rzc_open_options",
            release=_release,
            release_ctx=ffi.cast("void *", key),
            flags=lib.RZC_OPEN_WRITE_PROTECT if write_protect else 0,
        )
        out = ffi.new("rzc_weights **")
        try:
            check(lib.rzc_weights_open_memory_ex(view, size, opts, out))
        except BaseException:
            _owners.pop(key, None)  # a failed open never calls release
            raise
        return cls(out[0])

    def close(self) -> None:
        """Lets go of the handle: it is freed now, or, when a call on another
        thread is using it, as soon as that call returns. Calls made after
        this raise :class:`~ray_zerocopy.errors.InvalidInputError`; exported
        tensors stay valid."""
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        handle = self._handle  # read once: close() may run meanwhile
        if handle is None:
            raise InvalidInputError("the Weights handle is closed")
        return handle

    def __len__(self) -> int:
        return lib.rzc_weights_len(self._live())

    def table(self) -> tuple[TensorInfo, ...]:
        """Every tensor's description, in the order of the data: the tensor
        table the native library validated, fetched in bulk the first time
        it is asked for (see :meth:`columns`)."""
        if self._table is None:
            handle = self._live()  # the names lie in its memory: held while they are read
            rows = self._rows()
            names = [
                ffi.unpack(ffi.cast("char *", at), n).decode("utf-8")
                for at, n in zip(rows["name"].tolist(), rows["name_len"].tolist(), strict=True)
            ]
            dtypes, shapes, offsets, nbytes = self.columns()
            self._table = tuple(map(TensorInfo._make, zip(names, dtypes, shapes, nbytes, offsets, strict=True)))
            del handle
        return self._table

    def columns(self) -> tuple[list, list, list, list]:
        """What a load needs of the table, as four lists in the order of the
        data: every tensor's dtype name, shape, offset from the buffer's
        start and size in bytes, without the names. Read with three native
        calls and a few vectorized steps, not one Python step per field and
        tensor (that way a table of 20,000 tensors cost about 1.5 us a
        tensor; this costs a tenth of it)."""
        if self._columns is None:
            handle, rows = self._live(), self._rows()
            ndims = lib.rzc_weights_dims_len(handle)
            dims_out = ffi.new("int64_t[]", ndims)
            check(lib.rzc_weights_get_dims(handle, dims_out, ndims))
            dims = ffi.unpack(dims_out, ndims)
            ends = np.cumsum(rows["ndim"], dtype=np.int64).tolist()
            shapes = [tuple(dims[a:b]) for a, b in zip([0, *ends][:-1], ends, strict=True)]
            names = DTYPE_NAMES
            self._columns = (
                [names[c] for c in rows["dtype"].tolist()],
                shapes,
                (rows["data"] - np.uint64(self._base)).tolist(),
                rows["nbytes"].tolist(),
            )
        return self._columns

    def dtype_codes(self) -> np.ndarray:
        """Every tensor's dtype as its native code (``_native.DTYPE_NAMES``
        names it), in the order of the data: read-only, without the work of
        :meth:`columns` (4 ms for 20,000 tensors) where only dtypes are asked."""
        codes = self._rows()["dtype"]
        codes.flags.writeable = False
        return codes

    def _rows(self) -> np.ndarray:
        """``rzc_weights_get_all`` as a numpy record array (pointers as
        addresses), read once; :meth:`table` and :meth:`columns` share it."""
        if self._rows_read is None:
            n = len(self)
            raw = ffi.new("rzc_tensor_info[]", n)
            check(lib.rzc_weights_get_all(self._live(), raw, n))
            self._rows_read = np.frombuffer(ffi.buffer(raw), dtype=_INFO_ROWS)  # keeps `raw` alive
        return self._rows_read

    def info(self, index: int) -> TensorInfo:
        """Describes tensor ``index`` (in the order of the data)."""
        return self.table()[index]

    def infos(self) -> list[TensorInfo]:
        """Every tensor's description."""
        return list(self.table())

    def names(self) -> list[str]:
        return [i.name for i in self.table()]

    def find(self, name: str) -> int:
        """Index of the tensor called ``name`` (``NotFoundError`` otherwise)."""
        raw = name.encode("utf-8")
        out = ffi.new("size_t *")
        check(lib.rzc_weights_find_n(self._live(), raw, len(raw), out))
        return out[0]

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` map."""
        h = self._live()
        e = ffi.new("rzc_metadata_entry *")
        out = {}
        for i in range(lib.rzc_weights_metadata_len(h)):
            check(lib.rzc_weights_metadata_get(h, i, e))
            out[ffi.unpack(e.key, e.key_len).decode()] = ffi.unpack(e.value, e.value_len).decode()
        return out

    @property
    def guard_state(self) -> str:
        """How firmly the weights refuse writes in this process: ``"none"``
        (not write-protected), ``"sealed"`` (shared memory mapped through a
        read-only descriptor: a write faults, and the kernel refuses
        ``mprotect(PROT_WRITE)`` and ``madvise(MADV_REMOVE)``), ``"private"``
        (this process's own memory, read-only) or ``"mprotect"`` (shared
        memory made read-only by ``mprotect`` alone: no read-only descriptor
        of its file was found)."""
        return GUARD_NAMES[lib.rzc_weights_guard_state(self._live())]

    def content_digest(self, *, trust_claim: bool = True) -> bytes:
        """The buffer's content digest (32 bytes): BLAKE3 of its header and
        of the digest of its data section. Computed from every byte
        (``trust_claim=False``), equal digests mean byte for byte equal
        buffers. With ``trust_claim`` the data digest is the one the header
        claims (``rzc.data_blake3``, written when this library sealed the
        buffer), and only the header is read: right for buffers sealed here,
        not for files from elsewhere, whose claim could be false. Without a
        claim every byte is read (on every core)."""
        out = ffi.new("rzc_digest *")
        check(lib.rzc_weights_content_digest(self._live(), int(trust_claim), out))
        return bytes(out.bytes)

    @property
    def data_start(self) -> int:
        """Offset of the data section (the end of the header)."""
        return self._data_start

    @property
    def address(self) -> int:
        """Address of the first byte of the buffer."""
        return self._base

    @property
    def nbytes(self) -> int:
        """Size of the whole buffer."""
        return self._data_end

    # DLPack ---------------------------------------------------------------
    def dlpack(self, index: int) -> DLPackTensor:
        """Tensor ``index`` as an object any DLPack consumer takes, e.g.
        ``torch.from_dlpack(w.dlpack(0))`` or ``np.from_dlpack(w.dlpack(0))``."""
        return DLPackTensor(self, index)

    def data_section(self) -> DLPackTensor:
        """The whole data section as one read-only ``uint8`` DLPack tensor;
        tensor ``i`` starts at ``info(i).offset - data_start`` in it."""
        return DLPackTensor(_SectionExporter(self._live()), 0)

    def export_versioned(self, index: int):
        return export_checked(lib.rzc_weights_to_dlpack, self._live(), index, "DLManagedTensorVersioned")

    def export_versioned_many(self, indices) -> list[int]:
        """Tensors ``indices`` exported in one native call (all or none), as
        the addresses of their ``DLManagedTensorVersioned``: each is owned by
        the caller, who hands it to a capsule or calls its deleter."""
        n = len(indices)
        out = ffi.new("uintptr_t[]", n)
        check(lib.rzc_weights_to_dlpack_many(self._live(), indices, n, ffi.cast("DLManagedTensorVersioned **", out)))
        return ffi.unpack(out, n)

    def export_legacy(self, index: int):
        return export_checked(lib.rzc_weights_to_dlpack_legacy, self._live(), index, "DLManagedTensor")

    def export_legacy_many(self, indices) -> list[int]:
        """:meth:`export_versioned_many` in the legacy DLPack form: the
        addresses of the ``DLManagedTensor`` of tensors ``indices``."""
        n = len(indices)
        out = ffi.new("uintptr_t[]", n)
        check(lib.rzc_weights_to_dlpack_legacy_many(self._live(), indices, n, ffi.cast("DLManagedTensor **", out)))
        return ffi.unpack(out, n)


    # CUDA -----------------------------------------------------------------
    def upload(
        self,
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
        """Copies every tensor to CUDA device ``ordinal`` in ONE allocation in
        the device's primary context (shared with torch, JAX and CuPy), each
        at a 256-byte aligned offset. ``staging``: ``"auto"`` (register the
        source with the driver, else pinned bounce buffers), ``"register"``,
        ``"pinned"`` or ``"pageable"``. The copy is complete on return.

        ``share``: processes of this user on this machine that upload the
        same buffer under the same key to the same physical GPU share ONE
        allocation: the first uploads, the others map it (no copy, no second
        copy in device memory), every process read-only: where the driver
        will not map it read-only, the upload stays private
        (``"not_read_only"``) unless ``share_writable`` allows sharing memory
        that one process's in-place write would change for all (such uploads
        share only with uploads that allow it too). A loader
        waits up to ``share_wait`` seconds for an upload in progress. Where
        sharing does not apply the upload is private and ``info()`` says why
        (``"fallback"``, ``"note"``).

        Processes share only buffers with equal content digests: pass
        ``share_digest`` when you know it (the digest :func:`seal_buffer` or
        :meth:`Sealer.finish` returned for a buffer you sealed), else it is
        computed here from every byte. An importer reads random windows of
        the memory it mapped back and compares them with this buffer before
        using it. ``share_dir``: a directory to meet the other processes in,
        tried after ``$XDG_RUNTIME_DIR/ray-zerocopy`` (used only if it is a
        directory of this user closed to others)."""
        return _device.upload(
            self._live(),
            ordinal,
            staging=staging,
            chunk_bytes=chunk_bytes,
            threads=threads,
            share=share,
            share_wait=share_wait,
            share_digest=share_digest,
            share_dir=share_dir,
            share_writable=share_writable,
        )


class _SectionExporter:
    """Exports the data section (versioned form only: consumers of a raw byte
    section are ones that ask with ``max_version``)."""

    __slots__ = ("_handle",)

    def __init__(self, handle):
        self._handle = handle

    def export_versioned(self, _index):
        out = ffi.new("DLManagedTensorVersioned **")
        check(lib.rzc_weights_data_to_dlpack(self._handle, out))
        return out[0]

    def export_legacy(self, _index):
        raise DLPackExportError("the data section is only exported in the versioned DLPack form")

