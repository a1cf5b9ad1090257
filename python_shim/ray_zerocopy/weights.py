"""Opened safetensors buffers (``Weights``) and the packer (``pack``).

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
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from ._dlpack import DLPackTensor, export_checked
from ._native import DTYPE_NAMES, check, ffi, lib

__all__ = ["Weights", "DeviceWeights", "TensorInfo", "PackInput", "PackPlan", "pack", "cuda_device_count"]

# Owners of opened memory, keyed by the integer passed to the native release
# callback. A dict entry is the only strong reference the library needs.
_owners: dict[int, object] = {}
_owner_keys = itertools.count(1)


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


def _new(ctype: str, **fields):
    """A new cffi struct of an extensible type, its ``struct_nbytes`` set."""
    return ffi.new(ctype + " *", {"struct_nbytes": ffi.sizeof(ctype), **fields})


class Weights:
    """An opened, validated safetensors buffer.

    Use :meth:`open_file` (memory-maps) or :meth:`from_buffer` (any object with
    the buffer protocol, without copying). Every method that reads is safe from
    several threads.
    """

    __slots__ = ("_handle", "_base", "_data_start", "_data_end", "_table", "__weakref__")

    def __init__(self, handle):
        self._handle = handle
        layout = ffi.new("rzc_buffer_layout *")
        check(lib.rzc_weights_get_layout(handle, layout))
        self._base = int(ffi.cast("uintptr_t", layout.bytes))
        self._data_start = layout.data_start
        self._data_end = layout.data_end
        self._table = None

    @classmethod
    def open_file(cls, path: str | os.PathLike) -> "Weights":
        """Memory-maps and opens a safetensors file."""
        out = ffi.new("rzc_weights **")
        check(lib.rzc_weights_open_file(os.fsencode(path), out))
        return cls(out[0])

    @classmethod
    def from_buffer(cls, buffer, *, write_protect: bool = False) -> "Weights":
        """Opens any contiguous buffer (numpy array, bytes, memoryview, a Ray
        object's view) without copying; it stays referenced as long as needed.

        ``write_protect``: make every whole page of the buffer (tensor data
        and header) read-only in this process while anything from the buffer
        is alive (see :attr:`guard_state`), so that an in-place
        write through a tensor faults (killing the writer) instead of changing
        memory that other processes share. Needs the page of non-tensor bytes
        around the tensors that ``pack(guard_bytes=4096)`` leaves."""
        view = ffi.from_buffer("uint8_t[]", buffer)  # keeps `buffer` alive
        if len(view) == 0:
            # Nothing to borrow; let the parser say what is wrong.
            view = ffi.new("uint8_t[1]")
            size = 0
        else:
            size = len(view)
        key = next(_owner_keys)
        _owners[key] = view
        opts = _new(
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
        """Frees the handle now; exported tensors stay valid."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.rzc_weights_free(handle)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if self._handle is None:
            raise ValueError("the Weights handle is closed")
        return self._handle

    def __len__(self) -> int:
        return lib.rzc_weights_len(self._live())

    def table(self) -> tuple[TensorInfo, ...]:
        """Every tensor's description, in the order of the data: the tensor
        table the native library validated, fetched with one call the first
        time it is asked for."""
        if self._table is None:
            n = len(self)
            raw = ffi.new("rzc_tensor_info[]", n)
            check(lib.rzc_weights_get_all(self._live(), raw, n))
            base, names = self._base, DTYPE_NAMES
            self._table = tuple(
                TensorInfo(
                    ffi.unpack(t.name, t.name_len).decode("utf-8"),
                    names[t.dtype],
                    tuple(ffi.unpack(t.shape, t.ndim)),
                    t.nbytes,
                    int(ffi.cast("uintptr_t", t.data)) - base,
                )
                for t in raw
            )
        return self._table

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
        return _GUARD_NAMES[lib.rzc_weights_guard_state(self._live())]

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
    ) -> "DeviceWeights":
        """Copies every tensor to CUDA device ``ordinal`` in ONE allocation in
        the device's primary context (shared with torch, JAX and CuPy), each
        at a 256-byte aligned offset. ``staging``: ``"auto"`` (register the
        source with the driver, else pinned bounce buffers), ``"register"``,
        ``"pinned"`` or ``"pageable"``. The copy is complete on return.

        ``share``: processes of this user on this machine that upload the
        same buffer under the same key to the same physical GPU share ONE
        allocation: the first uploads, the others map it (no copy, no second
        copy in device memory), read-only where the device allows it. A loader
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
        modes = {"auto": 0, "register": 1, "pinned": 2, "pageable": 3}
        if staging not in modes:
            raise ValueError(f"staging {staging!r} is not one of {sorted(modes)}")
        key = share.encode("utf-8") if share is not None else b""
        key_buf = ffi.new("char[]", key)  # alive until the call returns
        digest = ffi.NULL
        if share_digest is not None:
            if len(share_digest) != 32:
                raise ValueError(f"share_digest must be 32 bytes, not {len(share_digest)}")
            digest = ffi.new("rzc_digest *", {"bytes": list(share_digest)})
        dir_bytes = os.fsencode(share_dir) if share_dir is not None else b""
        dir_buf = ffi.new("char[]", dir_bytes)
        opts = _new(
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
        )
        out = ffi.new("rzc_device_weights **")
        check(lib.rzc_device_weights_upload(self._live(), ordinal, opts, out))
        return DeviceWeights(out[0])


def cuda_device_count() -> int:
    """CUDA devices this process sees (``NoCudaError`` when there is no driver)."""
    out = ffi.new("int32_t *")
    check(lib.rzc_cuda_count_devices(out))
    return out[0]


_STAGING_NAMES = {0: "auto", 1: "register", 2: "pinned", 3: "pageable", 4: "none"}
_SHARING_NAMES = {0: "private", 1: "uploaded", 2: "imported"}
_GUARD_NAMES = {0: "none", 1: "sealed", 2: "private", 3: "mprotect"}


def _text(ptr, n: int) -> str:
    return ffi.unpack(ptr, n).decode("utf-8", "replace") if n else ""


def _fallback_name(code: int) -> str:
    name = lib.rzc_share_fallback_name(code)
    return str(code) if name == ffi.NULL else ffi.string(name).decode()


class DeviceWeights:
    """Tensors uploaded to one CUDA device allocation. Exported tensors keep
    the allocation alive after this handle is closed."""

    __slots__ = ("_handle", "_device")

    def __init__(self, handle):
        self._handle = ffi.gc(handle, lib.rzc_device_weights_free)
        self._device = (2, self.info()["ordinal"])  # kDLCUDA

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
        i = _new("rzc_device_info")
        check(lib.rzc_device_weights_info(self._handle, i))
        return {
            "device_ptr": i.device_ptr,
            "nbytes": i.nbytes,
            "ordinal": i.ordinal,
            "staging": _STAGING_NAMES.get(i.staging, str(i.staging)),
            "seconds": i.seconds,
            "copies": i.copies,
            "sharing": _SHARING_NAMES.get(i.sharing, str(i.sharing)),
            "read_only": bool(i.read_only),
            "note": _text(i.note, i.note_len),
            "fallback": _fallback_name(i.fallback),
            "dir_note": _text(i.dir_note, i.dir_note_len),
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
        raise BufferError("the data section is only exported in the versioned DLPack form")


@dataclass
class PackInput:
    """A tensor to pack: its bytes at ``address`` stay valid during ``pack``."""

    name: str
    dtype: int  # a Dtype, e.g. Dtype.F32
    shape: Sequence[int]
    address: int
    nbytes: int


def view_at(address: int, nbytes: int) -> np.ndarray:
    """A ``uint8`` view of ``nbytes`` bytes of this process's memory at
    ``address`` (which the caller keeps alive while the view is used)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(ffi.buffer(ffi.cast("uint8_t *", address), nbytes), dtype=np.uint8)


class PackPlan:
    """The layout of a safetensors buffer for ``tensors`` (their names,
    dtypes and shapes; addresses are needed only by :meth:`write`): every
    tensor's data at a multiple of ``alignment`` from the buffer start, and
    ``guard_bytes`` of non-tensor bytes before the first tensor and after the
    last one; with ``reserve_digest``, room in the header for the data
    digest that :func:`seal_buffer` writes once the buffer is filled. Fill a
    buffer of :attr:`nbytes` bytes either at once
    (:meth:`write`) or piece by piece (:meth:`write_layout`, then each
    tensor's bytes at :meth:`offset`), e.g. streaming shards of a checkpoint
    one at a time."""

    def __init__(self, tensors: Sequence[PackInput], metadata: Mapping[str, str] | None = None, *,
                 alignment: int = 64, guard_bytes: int = 0, reserve_digest: bool = False):
        self._keep = []
        arr = ffi.new("rzc_pack_tensor[]", max(len(tensors), 1))
        for i, t in enumerate(tensors):
            name = ffi.new("char[]", t.name.encode("utf-8"))
            shape = ffi.new("int64_t[]", list(t.shape) or [0])
            self._keep += [name, shape]
            arr[i].name = name
            arr[i].name_len = len(name) - 1
            arr[i].dtype = t.dtype
            arr[i].ndim = len(t.shape)
            arr[i].shape = shape
            arr[i].data = ffi.cast("const uint8_t *", t.address)
            arr[i].nbytes = t.nbytes
        meta = list((metadata or {}).items())
        marr = ffi.new("rzc_metadata_entry[]", max(len(meta), 1))
        for i, (k, v) in enumerate(meta):
            kb, vb = ffi.new("char[]", k.encode()), ffi.new("char[]", v.encode())
            self._keep += [kb, vb]
            marr[i].key, marr[i].key_len = kb, len(kb) - 1
            marr[i].value, marr[i].value_len = vb, len(vb) - 1
        opts = _new("rzc_pack_options", alignment=alignment, guard_nbytes=guard_bytes, reserve_digest=int(reserve_digest))
        out = ffi.new("rzc_pack_plan **")
        check(lib.rzc_pack_plan_new(arr, len(tensors), marr, len(meta), opts, out))
        self._plan = ffi.gc(out[0], lib.rzc_pack_plan_free)
        self.alignment = alignment
        self._sizes = [t.nbytes for t in tensors]
        #: Size of the buffer in bytes.
        self.nbytes = lib.rzc_pack_plan_nbytes(self._plan)

    def __len__(self) -> int:
        return len(self._sizes)

    def size(self, index: int) -> int:
        """Bytes of tensor ``index``."""
        return self._sizes[index]

    def offset(self, index: int) -> int:
        """Where tensor ``index``'s bytes go, from the buffer start."""
        out = ffi.new("uint64_t *")
        check(lib.rzc_pack_plan_offset(self._plan, index, out))
        return out[0]

    def allocate(self) -> np.ndarray:
        """A new ``uint8`` array of :attr:`nbytes` bytes, ``alignment``-aligned
        (numpy guarantees only 16 bytes)."""
        raw = np.empty(self.nbytes + self.alignment, dtype=np.uint8)
        skip = -raw.ctypes.data % self.alignment
        return raw[skip : skip + self.nbytes]

    def write_layout(self, dst) -> None:
        """Writes the header and the padding into ``dst``, leaving each
        tensor's bytes to the caller."""
        view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        check(lib.rzc_pack_plan_write_layout(self._plan, view, len(view)))

    def write_sealing(self, dst, sealer: "Sealer") -> None:
        """Copies every tensor into ``dst`` (its layout written, ``sealer``
        made on it), telling ``sealer`` as each tensor's bytes are final."""
        view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        check(lib.rzc_pack_plan_write_sealing(self._plan, view, len(view), sealer._handle))

    def write(self, dst) -> None:
        """Writes the whole buffer into ``dst``, copying every tensor from the
        address it was planned with. The copy releases the GIL (cffi does for
        every call): other Python threads keep running while a large model is
        packed."""
        view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        check(lib.rzc_pack_plan_write(self._plan, view, len(view)))


class Sealer:
    """The digest of a buffer's data section, computed on a native thread
    while the buffer is filled. Make it once the buffer's layout (header) is
    written (:meth:`PackPlan.write_layout`); call :meth:`advance` as bytes
    become final, then :meth:`finish`. The buffer must stay alive and
    unchanged (below the last ``advance``) until then."""

    __slots__ = ("_handle", "_keep")

    def __init__(self, dst):
        self._keep = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        out = ffi.new("rzc_pack_sealer **")
        check(lib.rzc_pack_sealer_new(self._keep, len(self._keep), out))
        self._handle = ffi.gc(out[0], lib.rzc_pack_sealer_free)

    def advance(self, upto: int) -> None:
        """Bytes below ``upto`` are final."""
        check(lib.rzc_pack_sealer_advance(self._handle, upto))

    def finish(self) -> bytes:
        """Hashes the rest, writes the data digest into the header, and
        returns the buffer's content digest."""
        out = ffi.new("rzc_digest *")
        check(lib.rzc_pack_sealer_finish(self._handle, out))
        return bytes(out.bytes)

    def close(self) -> None:
        """Stops the thread (when unfinished) and frees the sealer."""
        h, self._handle = self._handle, None
        if h is not None:
            ffi.gc(h, None)  # freed here, not again by the collector
            lib.rzc_pack_sealer_free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def seal_buffer(dst) -> bytes:
    """Seals a filled buffer planned with ``reserve_digest=True``: writes the
    BLAKE3 digest of its data section into its header (``rzc.data_blake3``)
    and returns its content digest (see :meth:`Weights.content_digest`)."""
    view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
    out = ffi.new("rzc_digest *")
    check(lib.rzc_pack_seal(view, len(view), out))
    return bytes(out.bytes)


def pack(
    tensors: Iterable[PackInput],
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = 64,
    guard_bytes: int = 0,
) -> np.ndarray:
    """Lays ``tensors`` out as one standard safetensors buffer (a new ``uint8``
    numpy array, itself ``alignment``-aligned): every tensor's data starts at
    an address that is a multiple of ``alignment``;
    ``guard_bytes`` of non-tensor bytes precede the first tensor and follow the
    last one. The official safetensors library reads the result as is."""
    plan = PackPlan(list(tensors), metadata, alignment=alignment, guard_bytes=guard_bytes)
    out = plan.allocate()
    plan.write(out)
    return out
