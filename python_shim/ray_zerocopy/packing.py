"""The packer: tensors laid out as one aligned safetensors buffer
(:class:`PackPlan`, :func:`pack`), and the sealer that writes the digest of
its data into its header (:class:`Sealer`, :func:`seal_buffer`). The layout
and the digest are computed by the native library; this module only passes
tensors and buffers to it.

The module is ``packing``, not ``pack``: ``ray_zerocopy.pack`` is the
function :func:`pack`, and a submodule of the same name would make
``import ray_zerocopy.pack`` hand back the function instead of the module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._native import check, ffi, lib, new_struct
from .errors import InvalidInputError

__all__ = [
    "PackInput",
    "PackPlan",
    "Sealer",
    "pack",
    "seal_buffer",
    "view_at",
    "DEFAULT_ALIGNMENT",
    "DEVICE_ALIGNMENT",
    "GUARD_NBYTES",
]

#: Alignment of every tensor's data when none is asked for.
DEFAULT_ALIGNMENT = lib.RZC_PACK_DEFAULT_ALIGNMENT
#: Alignment of every tensor in an upload: a buffer packed with it uploads as
#: one contiguous copy.
DEVICE_ALIGNMENT = lib.RZC_DEVICE_ALIGNMENT
#: Non-tensor bytes before the first and after the last tensor that opening
#: with ``write_protect`` needs (one page).
GUARD_NBYTES = lib.RZC_PACK_GUARD_NBYTES


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

    def __init__(
        self,
        tensors: Sequence[PackInput],
        metadata: Mapping[str, str] | None = None,
        *,
        alignment: int = DEFAULT_ALIGNMENT,
        guard_bytes: int = 0,
        reserve_digest: bool = False,
    ):
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
        opts = new_struct(
            "rzc_pack_options", alignment=alignment, guard_nbytes=guard_bytes, reserve_digest=int(reserve_digest)
        )
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
        """A new ``uint8`` array of :attr:`nbytes` zeros, ``alignment``-aligned
        (numpy guarantees only 16 bytes). Zeros, not whatever memory held: a
        :class:`Sealer` hashes every byte, a tensor left unfilled included
        (and zeros cost nothing until written: the pages come from the
        system zeroed)."""
        raw = np.zeros(self.nbytes + self.alignment, dtype=np.uint8)
        skip = -raw.ctypes.data % self.alignment
        return raw[skip : skip + self.nbytes]

    def write_layout(self, dst) -> None:
        """Writes the header and the padding into ``dst``, leaving each
        tensor's bytes to the caller."""
        view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        check(lib.rzc_pack_plan_write_layout(self._plan, view, len(view)))

    def write_sealing(self, dst, sealer: Sealer) -> None:
        """Copies every tensor into ``dst`` (its layout written, ``sealer``
        made on it), telling ``sealer`` as each tensor's bytes are final."""
        view = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        check(lib.rzc_pack_plan_write_sealing(self._plan, view, len(view), sealer._live()))

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
    written (:meth:`PackPlan.write_layout`); fill it with :meth:`copy` or
    :meth:`read`, or write it and call :meth:`advance` as bytes become
    final, then :meth:`finish`. The buffer must stay alive until then,
    unchanged in its header and padding, below the last ``advance`` and in
    every tensor a ``copy`` or ``read`` named, and its bytes are not read
    while they may be written."""

    __slots__ = ("_handle", "_keep")

    def __init__(self, dst):
        self._keep = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        out = ffi.new("rzc_pack_sealer **")
        check(lib.rzc_pack_sealer_new(self._keep, len(self._keep), out))
        self._handle = ffi.gc(out[0], lib.rzc_pack_sealer_free)

    def _live(self):
        handle = self._handle  # read once: close() may run meanwhile
        if handle is None:
            raise InvalidInputError("the Sealer is closed")
        return handle

    def advance(self, upto: int) -> None:
        """Bytes below ``upto`` are final: no one writes them any more.
        ``upto`` is a prefix: where several threads fill the buffer, the
        start of the first part any of them is still writing (not the end
        of one thread's own part). Several threads may call it at once; the
        largest counts."""
        check(lib.rzc_pack_sealer_advance(self._live(), upto))

    def copy(self, copies, threads: int = 0) -> None:
        """Copies whole tensors into the buffer on ``threads`` threads (0:
        one per core), hashing each block as it completes: ``copies`` is
        ``[(address, offset, nbytes)]``, each tensor's bytes at ``address``
        (alive and unchanged during the call) and its offset and size in the
        buffer's layout. A tensor is copied once, and not below ``advance``.
        The GIL is released while it runs."""
        copies = list(copies)
        arr = ffi.new("rzc_pack_copy[]", len(copies))
        for c, (address, offset, nbytes) in zip(arr, copies, strict=True):
            c.src = ffi.cast("const uint8_t *", address)
            c.dst_offset = offset
            c.nbytes = nbytes
        check(lib.rzc_pack_sealer_copy(self._live(), arr, len(copies), threads))

    def read(self, fd: int, reads, threads: int = 0) -> None:
        """Reads whole tensors from the open file ``fd`` into the buffer, as
        :meth:`copy` copies them from memory: ``reads`` is ``[(file_offset,
        offset, nbytes)]``. A file that ends before a tensor does raises
        :class:`~ray_zerocopy.errors.IoError`, and the sealer can then
        neither go on nor finish; a descriptor that cannot be read at all
        (not open, open for writing only, neither a regular file nor a
        block device) raises
        :class:`~ray_zerocopy.errors.InvalidArgumentError` before anything
        is read. The GIL is released while it runs."""
        reads = list(reads)
        arr = ffi.new("rzc_pack_read[]", len(reads))
        for r, (src, offset, nbytes) in zip(arr, reads, strict=True):
            r.src_offset = src
            r.dst_offset = offset
            r.nbytes = nbytes
        check(lib.rzc_pack_sealer_read(self._live(), fd, arr, len(reads), threads))

    def finish(self) -> bytes:
        """Hashes the rest, writes the data digest into the header, and
        returns the buffer's content digest."""
        out = ffi.new("rzc_digest *")
        check(lib.rzc_pack_sealer_finish(self._live(), out))
        return bytes(out.bytes)

    def close(self) -> None:
        """Stops the thread (when unfinished) and frees the sealer: now, or,
        when a call on another thread is using it, as soon as that call
        returns (each call holds the handle it passes). Calls made after
        this raise :class:`~ray_zerocopy.errors.InvalidInputError`."""
        self._handle = None

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
    alignment: int = DEFAULT_ALIGNMENT,
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
