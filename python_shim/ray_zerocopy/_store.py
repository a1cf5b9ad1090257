"""Putting a sealed buffer into Ray's object store without a second copy of
it in the driver.

``ray.put(array)`` copies the array into the object store: the driver holds
the array and the store's copy at once (twice the model). Ray 2.60 has no
public call that creates a writable object and seals it afterwards, so
:func:`put_buffer` does the equivalent with public calls:

1. ``ray.put`` a read-only view of an untouched anonymous mapping of the
   buffer's size: reading it maps the kernel's zero page, which costs no
   memory, so Ray creates and seals an object of zeros for free (the same
   ``uint8`` array object ``ray.put`` of a real array makes);
2. ``ray.get`` it in the driver: a view into the object store's shared
   mapping; while the driver holds it, the store cannot spill the object
   (Ray spills only objects no client holds);
3. write the buffer into that view (packing straight into the store, shard
   by shard for a checkpoint), drop the view, and only then hand out the
   reference: no reader can see the object before it is complete.

This writes into an object after Ray sealed it, which Ray's immutability
rule allows only because no other process has the reference yet. Every
assumption is checked, and when one does not hold (Ray Client, a store
mapping that is not writable shared memory, a spill before the fill) the
buffer is packed into an anonymous mapping and ``ray.put`` as usual, the
mapping released right after: twice the model for the length of the put.

With an :class:`~ray_zerocopy._owner.Owner`, the owner actor (on this node)
does step 1, so it owns the object, and the sealer fills it as above. Where
the fill in place is not possible, the sealer puts its copy and the owner
puts a copy of that (which it then owns); the sealer drops its own.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from . import _telemetry
from ._owner import put_zero_pages
from .diagnostics import mapping_at

# ray.put keeps objects up to 100 KiB in the owner's memory instead of the
# object store; small buffers gain nothing from this anyway.
_MIN_IN_PLACE = 1 << 20

_PyBUF_WRITE = 0x200
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def put_buffer(nbytes: int, fill, owner=None):
    """A reference to a new ``uint8`` array object of ``nbytes`` bytes that
    ``fill(dst)`` wrote (``dst`` a writable ``uint8`` array; ``fill`` keeps
    no reference to it). ``fill`` may be called twice (a fallback starts
    over). ``owner``: ``None`` (this process owns the object) or an
    :class:`~ray_zerocopy._owner.Owner` on this node, which then owns it."""
    import ray

    if owner is not None:
        owner._check_node(ray.get_runtime_context().get_node_id())
    if nbytes >= _MIN_IN_PLACE:
        why = _in_place_unavailable(ray)
        if why is None:
            ref, why = _put_in_place(ray, nbytes, fill, owner)
            if ref is not None:
                return ref
        if owner is None:
            _telemetry.fallback("sealing through a copy, the weights held twice while sealing: %s", why)
        else:
            _telemetry.fallback(
                "sealing through two copies, the weights held three times while handing them to the owner %r: %s",
                owner.name,
                why,
            )
    ref = _put_copy(ray, nbytes, fill)
    if owner is None:
        return ref
    owned = owner._adopt(ref)
    del ref  # the owner holds its copy: ours is freed
    return owned


def _in_place_unavailable(ray):
    try:
        from ray.util.client import ray as client

        if client.is_connected():
            return "Ray Client: ray.get returns a local copy"
    except ImportError:
        pass
    return None


def _shared_writable(addr: int, nbytes: int) -> bool:
    """Whether ``[addr, addr + nbytes)`` lies in one writable shared mapping."""
    m = mapping_at(addr)
    return m is not None and addr + nbytes <= m.end and m.perms.startswith("rw") and m.shared


def _spilled(ray, ref) -> bool:
    try:
        return bool(ray.experimental.get_object_locations([ref]).get(ref, {}).get("did_spill", False))
    except Exception:
        return True  # cannot tell: do not write


def _put_zeros(ray, nbytes: int, owner):
    if owner is not None:
        return owner._put_zeros(nbytes)
    return put_zero_pages(ray, nbytes)


def _put_in_place(ray, nbytes: int, fill, owner=None):
    """The filled object's reference and ``None``, or ``None`` and why the
    fill in place was not possible (the zero object released)."""
    ref = _put_zeros(ray, nbytes, owner)
    try:
        why = _fill_in_place(ray, ref, nbytes, fill)
    except BaseException:
        if owner is not None:
            owner.release(ref)  # nobody else has the reference: the owner would keep it forever
        raise
    if why is None:
        return ref, None
    if owner is not None:
        owner.release(ref)
    return None, why


def _fill_in_place(ray, ref, nbytes: int, fill) -> str | None:
    """Fills the object of zeros ``ref`` in place: ``None``, or why not."""
    stored = ray.get(ref)  # held: the store cannot spill the object meanwhile
    whole = isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and stored.nbytes == nbytes
    if not (whole and stored.flags.c_contiguous):
        return "ray.get did not return the stored array itself"
    addr = stored.__array_interface__["data"][0]
    if not _shared_writable(addr, nbytes):
        return "the object store is not mapped as writable shared memory here"
    if _spilled(ray, ref):
        return "the object was spilled before it could be filled"
    dst = np.frombuffer(_memory_view(addr, nbytes, _PyBUF_WRITE), dtype=np.uint8)
    try:
        fill(dst)
    finally:
        del dst, stored
    if _spilled(ray, ref):
        return "the object was spilled while it was filled"
    return None


def _put_copy(ray, nbytes: int, fill):
    """Packs into an anonymous mapping, puts it, releases the mapping."""
    if nbytes == 0:
        buf = np.empty(0, dtype=np.uint8)
        fill(buf)
        return ray.put(buf)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = np.frombuffer(area, dtype=np.uint8)
        fill(buf)
        ref = ray.put(buf)
        del buf
    finally:
        area.close()
    return ref
