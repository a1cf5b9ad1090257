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

Between steps 1 and 2 no client holds the object, and a store above its
spilling threshold may pick it to spill: the copy on disk is then the
zeros (or half the fill), and once the filled copy in memory is evicted, a
load restores zeros. Sealing under pressure lost models that way (1 seal
in 16 with a full store and a busy driver). So the store's usage and its
count of spilled objects are read before step 1 and after step 3: a store
near its threshold takes the copy below instead, and one that spilled
anything meanwhile, or is near it by then, has the filled object put
again, whole, from the view still held (Ray's own put, which no spill can
see half done), and the object filled in place dropped.

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
import functools
import mmap

import numpy as np

from . import _telemetry
from .diagnostics import mapping_at
from .errors import SealedObjectCorruptedError

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
        why = _in_place_unavailable()
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
    return _put_copy(ray, nbytes, fill, owner)


def _adopted(ray, owner, ref, source):
    """``owner``'s copy of the object ``ref``, which this process put from
    ``source`` (still alive). The object is held here (mapped) while the
    owner copies it: Ray evicts no copy a process maps, so the owner reads
    what is held, never a copy Ray spilled and reads back later. Where Ray
    spilled the object before it was held (this process owns it: its own
    records say, no call), what is held may be such a copy: it is compared
    with ``source`` first. The owner's object, never spilled itself, is
    trusted by every load (see ``_restored``). Not under Ray Client, where
    ``ray.get`` would fetch the whole object here."""
    if _in_place_unavailable() is not None:
        return owner._adopt(ref)
    held = ray.get(ref)
    try:
        if spilled(ray, ref) and not np.array_equal(np.asarray(held), np.asarray(source)):
            raise SealedObjectCorruptedError(
                f"the object {ref.hex()} just put was spilled to disk by Ray's object store before the owner "
                "could copy it, and the copy read back is not what was put: something changed or damaged the "
                "spilled copy (its file under Ray's spilling directory); nothing was sealed"
            )
        return owner._adopt(ref)
    finally:
        del held


@functools.cache
def _huge_page_size() -> int:
    """The transparent huge page's size (2 MiB on x86-64 and on arm64 with
    4 KiB pages, 512 MiB with 64 KiB pages)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def _huge_zero_page() -> bool:
    """Whether reading untouched anonymous memory marked for huge pages
    maps the kernel's shared huge zero page (no memory) rather than
    allocating zeroed huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def zero_view(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A read-only ``uint8`` view of ``nbytes`` zeros that costs no memory,
    and the mapping to close when done with it: untouched anonymous pages,
    which reading maps to the kernel's zero page.

    Where the kernel has a huge zero page, the view is marked for huge pages:
    a reader (Ray's copy in :func:`put_zero_pages`) then faults once per
    2 MiB of it instead of once per 4 KiB (2 GiB put: 0.05 s instead of 0.3 s
    into pages the store reuses, 1.05 s instead of 1.5 s into fresh ones, on
    the project's machine). Where it has none, the view is marked against
    them, so that no read allocates memory however transparent huge pages
    are configured."""
    huge = _huge_page_size()
    extra = huge if nbytes >= huge else 0
    zeros = mmap.mmap(-1, nbytes + extra, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    whole = np.frombuffer(zeros, dtype=np.uint8)
    skip = -whole.ctypes.data % huge if extra else 0
    advice = getattr(mmap, "MADV_HUGEPAGE" if _huge_zero_page() else "MADV_NOHUGEPAGE", None)
    if advice is not None and nbytes:
        try:
            zeros.madvise(advice, skip, nbytes)  # a hint: a kernel without THP says no
        except OSError:
            pass
    return zeros, whole[skip : skip + nbytes]


def put_zero_pages(ray, nbytes: int):
    """``ray.put`` of :func:`zero_view`: Ray creates an object of zeros
    without this process allocating its size. The sealer (this process, or
    an owner for it) fills the object in place."""
    zeros, view = zero_view(nbytes)
    try:
        return ray.put(view)
    finally:
        del view  # the mapping closes only once no view of it is left
        zeros.close()


def _in_place_unavailable():
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


# Ray's default object_spilling_threshold: above this share of its
# capacity, the store spills objects no client holds.
_SPILL_THRESHOLD = 0.8


def _store_state(ray) -> tuple[int, int, int] | None:
    """``(bytes used, capacity, objects spilled so far)`` of this node's
    object store, as its raylet counts them; ``None`` where it cannot say."""
    try:
        from ray._private.internal_api import node_stats

        address, port = _raylet(ray, ray.get_runtime_context().get_node_id())
        stats = node_stats(address, port, include_memory_info=False).store_stats
        return stats.object_store_bytes_used, stats.object_store_bytes_avail, stats.spilled_objects_total
    except Exception:  # noqa: BLE001 - cannot tell: the caller takes the safe way
        return None


@functools.cache
def _raylet(ray, node_id: str) -> tuple[str, int]:
    """The address and port of node ``node_id``'s raylet."""
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return node["NodeManagerAddress"], node["NodeManagerPort"]


def _near_spilling(state, nbytes: int, before=None) -> str | None:
    """Why an object of ``nbytes`` filled in place could be spilled before
    it is complete, the store's ``state`` (see :func:`_store_state`) read
    before it is made (the store near its spilling threshold with it), or
    after, ``before`` given (the store near it, or having spilled since):
    ``None`` where it could not."""
    if state is None:
        return "the object store's usage cannot be read"
    used, capacity, spilled = state
    if before is not None and spilled != before[2]:
        return "the object store spilled objects while it was filled"
    if used + (0 if before is not None else nbytes) > _SPILL_THRESHOLD * capacity:
        return (
            f"the object store is near its spilling threshold ({used / 2**20:.0f} of "
            f"{capacity / 2**20:.0f} MiB used)"
        )
    return None


# How long to wait for an object's owner to say whether it was spilled.
_OWNER_TIMEOUT_MS = 10_000


def spilled(ray, ref) -> bool:
    """Whether Ray has written the object behind ``ref`` to disk since it
    was made, so that a copy of it in memory may have been read back from
    there; ``True`` where that cannot be told (Ray Client, an owner that
    does not answer). Only the owner knows it: a process that borrowed the
    reference reads ``did_spill`` as false in its own records, spilled or
    not (measured with Ray 2.60). So the owner is asked (one call, 0.2-1.3
    ms), or this process's own records read where it owns the object."""
    known = spilled_if_owned(ray, ref)
    return ask_owner(ray, ref) if known is None else known


def spilled_if_owned(ray, ref) -> bool | None:
    """:func:`spilled` where this process owns the object (its own records,
    no call); ``None`` where another process owns it."""
    try:
        core = ray._private.worker.global_worker.core_worker
        if not _owned_here(core, ref):
            return None
        return bool(core.get_local_object_locations([ref])[ref]["did_spill"])
    except Exception:  # noqa: BLE001 - cannot tell: the caller takes the safe way
        return True


def ask_owner(ray, ref) -> bool:
    """:func:`spilled`, asked of the object's owner (one call, at most
    ``_OWNER_TIMEOUT_MS``)."""
    try:
        core = ray._private.worker.global_worker.core_worker
        return bool(core.get_object_locations([ref], _OWNER_TIMEOUT_MS)[ref]["did_spill"])
    except Exception:  # noqa: BLE001 - cannot tell: the caller takes the safe way
        return True


def _owned_here(core, ref) -> bool:
    from ray.core.generated.common_pb2 import Address

    owner = Address()
    owner.ParseFromString(core.get_owner_address(ref))
    return owner.worker_id == core.get_worker_id().binary()


def _put_zeros(ray, nbytes: int, owner):
    if owner is not None:
        return owner._put_zeros(nbytes)
    return put_zero_pages(ray, nbytes)


def _put_in_place(ray, nbytes: int, fill, owner=None):
    """The filled object's reference and ``None``, or ``None`` and why the
    fill in place was not possible (the zero object released)."""
    before = _store_state(ray)
    why = _near_spilling(before, nbytes)
    if why is not None:
        return None, why
    ref = _put_zeros(ray, nbytes, owner)
    try:
        why, again = _fill_in_place(ray, ref, nbytes, fill, before, owner)
    except BaseException:
        if owner is not None:
            owner.release(ref)  # nobody else has the reference: the owner would keep it forever
        raise
    if why is None:
        return ref, None
    if owner is not None:
        owner.release(ref)
    if again is not None:
        _telemetry.fallback("the sealed object was put again, whole, after filling it in place: %s", why)
        return again, None
    return None, why


def _fill_in_place(ray, ref, nbytes: int, fill, before, owner=None):
    """Fills the object of zeros ``ref`` in place: ``(None, None)``; or why
    not, and ``None``; or, where the store may have spilled it before it was
    complete (see the module's note), why, and a new reference to the object
    put again whole from the filled view (owned by ``owner`` where given)."""
    stored = ray.get(ref)  # held: the store cannot spill the object meanwhile
    whole = isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and stored.nbytes == nbytes
    if not (whole and stored.flags.c_contiguous):
        return "ray.get did not return the stored array itself", None
    addr = stored.__array_interface__["data"][0]
    if not _shared_writable(addr, nbytes):
        return "the object store is not mapped as writable shared memory here", None
    if spilled(ray, ref):
        return "the object was spilled before it could be filled", None
    dst = np.frombuffer(_memory_view(addr, nbytes, _PyBUF_WRITE), dtype=np.uint8)
    try:
        fill(dst)
        dst = None
        if spilled(ray, ref):
            why = "the object was spilled while it was filled"
        else:
            why = _near_spilling(_store_state(ray), nbytes, before)
        if why is None:
            return None, None
        # A spill may have started before the view was held and still be
        # writing the object's zeros to disk: the view, whole and held (not
        # evicted), is put again by Ray's own put, which no spill sees half done.
        again = ray.put(stored)
        if owner is not None:
            again = _adopted(ray, owner, again, stored)
        return why, again
    finally:
        del dst, stored


def _put_copy(ray, nbytes: int, fill, owner=None):
    """Packs into an anonymous mapping, puts it (and hands it to ``owner``,
    where given, while the mapping lasts), releases the mapping."""
    if nbytes == 0:
        buf = np.empty(0, dtype=np.uint8)
        fill(buf)
        ref = ray.put(buf)
        return ref if owner is None else owner._adopt(ref)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = np.frombuffer(area, dtype=np.uint8)
        fill(buf)
        ref = ray.put(buf)
        if owner is not None:
            ref = _adopted(ray, owner, ref, buf)  # the sealer's own copy is freed with its reference
    finally:
        buf = None
        try:
            area.close()
        except BufferError:  # views still held by a failure's frames: unmapped once they go
            pass
    return ref
