"""Loading a sealed pipeline: the path of a tensor's bytes from Ray's object
store to the pipeline the caller gets, top to bottom.

1. :func:`open_sealed`: ``ray.get`` gives a read-only view of the sealed
   object in shared memory; the native library validates it and builds the
   tensor table (``Weights.from_buffer``), write-protecting its pages.
   Where Ray may have read the copy back from disk, every byte of it is
   checked before the load returns or uploads (``_restored``).
2. :func:`assemble`: checks that the buffer is the one the wrapper was sealed
   with, then
3. :func:`materialize`: every tensor as an array of its framework, adopted
   zero-copy from the buffer on the CPU; on a GPU the buffer is uploaded once
   and every framework adopts its tensors from that one device allocation;
4. :func:`rebuild` (``_skeleton``): the skeleton is unpickled with each
   reference resolved to its tensor, and modules are put in eval mode.

What a load may choose travels as one :class:`LoadOptions`. Nothing here but
step 1 needs Ray, so :func:`assemble` also serves buffers that reach a
process some other way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import os
import sys
import threading
import time
import weakref
from typing import NamedTuple

from . import _restored, _seal, _telemetry
from ._device import Device, parse_device
from ._skeleton import FRAMEWORK_OF, FRAMEWORKS, TORCH_PARAM, adapter, rebuild
from .device_weights import DeviceWeights, cuda_device_count
from .errors import (
    BufferMismatchError,
    DeviceNotVisibleError,
    InvalidInputError,
    NoCudaError,
    RayNotInitializedError,
    RzcError,
    SealedObjectLostError,
)
from .weights import Weights

__all__ = [
    "FRAMEWORKS",
    "LoadOptions",
    "Loaded",
    "Part",
    "load",
    "load_parts",
    "open_sealed",
    "assemble",
    "build",
    "build_parts",
    "upload_parts",
    "materialize",
    "rebuild",
]


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Everything a load may choose, checked when made.

    ``device``: where the tensors go (``"cpu"``, ``"cuda:N"``, a
    :class:`~ray_zerocopy._device.Device`). ``framework``: every tensor as
    that framework's array (``None``: each as the kind it was sealed as).
    ``fast``: adopt all CPU tensors through one DLPack export.
    ``write_protect``: make the weights' pages read-only in this process; on
    a GPU, share a device copy only where every process maps it read-only.
    ``share_key``: on a GPU, share one device copy with the processes of this
    node that load the same content under that key onto the same GPU."""

    device: Device = Device("cpu")
    framework: str | None = None
    fast: bool = False
    write_protect: bool = True
    share_key: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "device", parse_device(self.device))
        if self.framework is not None and self.framework not in FRAMEWORKS:
            raise InvalidInputError(f"framework {self.framework!r} is not one of {FRAMEWORKS}")

    def replace(self, **changes) -> LoadOptions:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


class Loaded(NamedTuple):
    """A loaded pipeline, and its upload's ``info()`` (``None`` on the CPU;
    for a pipeline of several parts, the first part's)."""

    pipeline: object
    upload: dict | None


class Part(NamedTuple):
    """One sealed buffer that a version's tensors come from (see
    ``ActorWrapper.update``): its object, what identifies it (checked when
    opened), how many tensors it holds, and the key under which this
    cluster's processes share its device copy."""

    ref: object
    nbytes: int
    content_digest: bytes
    count: int
    share_key: str | None


# Whether a load in this process has moved its live objects to the oldest
# generation (its first load does; see _no_collection).
_promoted = False
# Loads running in this process, and whether the collector was on before the
# first of them began; both under _collection_lock.
_collection_lock = threading.Lock()
_loads_running = 0
_collector_was_on = False


@contextlib.contextmanager
def _no_collection():
    """No garbage collection during a load, and, in a process's first load,
    none due right after it.

    A load allocates thousands of objects that all stay alive (the model), so
    a collection during it finds nothing to free; in a fresh actor one is
    usually due by then, and scanning the young objects (many of them, just
    after imports) cost 1.3-1.6 ms of a 6 ms load. In the first load of a
    process, ``gc.freeze()`` followed by ``gc.unfreeze()`` moves every live
    object to the oldest generation in constant time, so the due collection
    has nothing young to scan; done again at the end, the model's objects
    join the oldest generation too, where they would end up anyway.

    Only the first: every load did it, and each moved the garbage cycles of
    the pipelines dropped since (a multiplexed model evicted, a module with
    ``weight_norm``) to the oldest generation, uncounted, where only a full
    collection frees them, and such moves make full collections rare: a
    replica that loaded and evicted models kept dozens of them, their
    sealed objects in the store (hundreds of MB, past the store's size),
    until one came. A later load only holds collection off while it runs;
    its objects are scanned by a young collection after it, as anything
    else made.

    Loads in several threads of one process (an actor with
    ``max_concurrency``) share one hold, counted under a lock: the first to
    begin turns the collector off, the last to end puts it back as it was.
    Each load reading and restoring the collector on its own left it off
    for good when one read it off (another load running), the other
    restored it, and then the first turned it off."""
    global _promoted, _loads_running, _collector_was_on
    # One try around all of it, the count and its flag set side by side: an
    # exception arriving in between (Ctrl-C in a notebook) still ends the
    # hold, rather than leaving the count, and the collector off, for good.
    counted = first = False
    try:
        with _collection_lock:
            if _loads_running == 0:
                _collector_was_on = gc.isenabled()
                gc.disable()
            _loads_running, counted = _loads_running + 1, True
            first = not _promoted
            if first:
                _promoted = True
                gc.freeze()
                gc.unfreeze()
        yield
    finally:
        if counted:
            with _collection_lock:
                _loads_running -= 1
                if first:
                    gc.freeze()
                    gc.unfreeze()
                if _loads_running == 0 and _collector_was_on:
                    gc.enable()


def load(ref, sealed: _seal.Sealed, options: LoadOptions):
    """What ``ActorWrapper.load`` does: open the sealed object behind
    ``ref`` and assemble the pipeline ``sealed`` describes from it."""
    started = time.perf_counter()
    with _no_collection():
        w, check = _open(ref, options.write_protect, sealed.content_digest)
        if options.device.kind != "cpu":
            check.wait(w)  # nothing leaves the host before it is known to be the copy sealed
        loaded = build(w, sealed, options)
        check.wait(w)
    seconds = time.perf_counter() - started
    _telemetry.loaded(str(options.device), len(sealed.kinds), seconds, options.write_protect, loaded.upload)
    return loaded.pipeline


def load_parts(parts, sealed: _seal.Sealed, options: LoadOptions):
    """:func:`load` for a pipeline whose tensors come from several sealed
    objects, ``parts`` (``sealed.sources`` says which tensor of which part
    each reference is): each part is opened (once per process, however many
    versions use it), checked, and on a GPU uploaded with its own share key."""
    started = time.perf_counter()
    with _no_collection():
        opened, checks = zip(*(_open(p.ref, options.write_protect, p.content_digest) for p in parts), strict=True)
        if options.device.kind != "cpu":
            _wait_all(checks, opened)
        loaded = build_parts(list(opened), parts, sealed, options)
        _wait_all(checks, opened)
    seconds = time.perf_counter() - started
    _telemetry.loaded(str(options.device), len(sealed.kinds), seconds, options.write_protect, loaded.upload)
    return loaded.pipeline


def _wait_all(checks, opened) -> None:
    for check, w in zip(checks, opened, strict=True):
        check.wait(w)


# -- 1. open ------------------------------------------------------------------
# Opened buffers, per process, by object ID. Weak: the handle goes when no
# load is in progress; tensors keep the buffer itself alive on their own.
_opened: weakref.WeakValueDictionary[tuple, Weights] = weakref.WeakValueDictionary()
_opened_lock = threading.Lock()
# The object store's buffer of each object opened here, by the same key:
# alive (held by the native owner of the opened buffer) as long as a handle
# or a host tensor of it is.
_buffers: weakref.WeakValueDictionary[tuple, object] = weakref.WeakValueDictionary()
# The check still running of each opened copy (``_restored``), by the copy:
# weak, so that a load that fails before it waits leaves nothing behind.
_checks: weakref.WeakKeyDictionary[Weights, _restored.Check] = weakref.WeakKeyDictionary()


def holds(object_hex: str) -> bool:
    """Whether this process still holds the sealed object ``object_hex``
    open: a handle or a host tensor of it alive (device copies aside)."""
    return (object_hex, True) in _buffers or (object_hex, False) in _buffers


def _owner_unknown(ray, ref) -> bool:
    """Whether no process could be asked for ``ref``'s object: the reference
    came without its owner's address, and this process does not know it
    (it knows its own objects' owner, itself)."""
    carried = getattr(ref, "owner_address", None)
    if carried is None or carried():
        return False
    try:
        ray._private.worker.global_worker.core_worker.get_owner_address(ref)
    except ValueError:
        return True
    except Exception:  # noqa: BLE001 - cannot tell (Ray Client, another Ray): ray.get decides
        return False
    return False


def open_sealed(ref, write_protect: bool, content_digest: bytes) -> Weights:
    """The sealed object behind ``ref``, opened (once per process while in
    use) and validated, its pages read-only when ``write_protect``; where
    Ray may have read this copy back from disk, every byte checked against
    ``content_digest``, the digest it was sealed with (``_restored``)."""
    w, check = _open(ref, write_protect, content_digest)
    check.wait(w)
    return w


def _open(ref, write_protect: bool, content_digest: bytes) -> tuple[Weights, _restored.Check]:
    """:func:`open_sealed` with its check of a copy Ray may have read back
    from disk still running: call ``check.wait(w)`` before anything built
    from ``w`` is returned or leaves the host."""
    key = (ref.hex(), write_protect)
    with _opened_lock:
        w = _opened.get(key)
        if w is not None:
            return w, _checks.get(w, _restored.CHECKED)
    import ray

    if not ray.is_initialized():
        # ray.get would start a new, empty Ray, where this object cannot be:
        # a wrapper is loaded in the cluster it was sealed in (a
        # subscription's thread loading as the program shuts Ray down).
        raise RayNotInitializedError(
            "Ray is not initialized in this process: a wrapper loads inside the Ray cluster that sealed it "
            "(in its actors and tasks, or after ray.init() connects to it)"
        )
    if _owner_unknown(ray, ref):
        # Ray's reference knows its owner only when Ray pickled it (as it
        # pickles actor and task arguments, ray.put, ray.cloudpickle):
        # through pickle or the cloudpickle package, it comes without, and
        # ray.get of it waited for ever, even with the owner alive.
        raise SealedObjectLostError(
            f"the sealed weights (object {key[0]}) cannot be found: this wrapper was pickled by a pickler that "
            "drops where Ray's objects live (pickle, the cloudpickle package). Pass wrappers to actors and tasks "
            "as arguments, by ray.put, or pickle them with ray.cloudpickle; to keep weights across sessions, "
            "save a checkpoint and seal it with ActorWrapper.from_safetensors"
        )
    # Fetched without the lock: an object coming from another node must not
    # hold up the loads of other objects in this process (a multiplexed
    # service, a subscription loading a new version).
    try:
        buffer = ray.get(ref)
    except (ray.exceptions.ObjectLostError, ray.exceptions.ObjectFreedError, ray.exceptions.OwnerDiedError) as e:
        raise SealedObjectLostError(
            f"the sealed weights (object {key[0]}) are no longer in Ray's object store ({type(e).__name__}): "
            "their owner let go of them or died. Without an Owner, the process that sealed them owns them and "
            "must stay alive while actors load them; with owner=ray_zerocopy.Owner(...), the owner must not be "
            "closed (nor the version unpublished) while they are in use"
        ) from e
    invalid = None
    with _opened_lock:
        w = _opened.get(key)
        if w is not None:  # another thread opened it meanwhile
            return w, _checks.get(w, _restored.CHECKED)
        try:
            w = Weights.from_buffer(buffer, write_protect=write_protect)
        except RzcError as e:
            invalid = e
        else:
            try:
                _buffers[key] = buffer
            except TypeError:  # not weakly referable (Ray Client's copies): not followed
                pass
            if write_protect and w.guard_state == "mprotect":
                _telemetry.fallback(
                    "the shared weights are read-only by mprotect only in this process: no read-only descriptor "
                    "of the object store's file was found (this worker is not a child of the raylet, or /proc is "
                    "restricted), so a write still faults, but madvise(MADV_REMOVE) here would reach every actor"
                )
            _opened[key] = w
            asked = _restored.ask(ray, ref)  # with the copy held (see _restored)
            check = _restored.Check(asked, content_digest, key[0], functools.partial(_settled, key, weakref.ref(w)))
            _checks[w] = check
            return w, check
    if _restored.spilled(_restored.ask(ray, ref)):  # a header read back from disk, broken there
        raise _restored.corrupted(key[0], f"it is no longer a valid buffer ({invalid.message})") from invalid
    raise invalid


def _settled(key: tuple, opened: weakref.ref, check: _restored.Check, sealed: bool) -> None:
    """``check`` of the copy ``opened`` is done: its copy is the one sealed,
    or (``sealed`` false) it is dropped from the opened copies, so that the
    next load maps the object again (and checks it again)."""
    w = opened()
    with _opened_lock:
        if w is not None and _checks.get(w) is check:
            del _checks[w]
        if not sealed and w is not None and _opened.get(key) is w:
            del _opened[key]


# -- 2. check and assemble ----------------------------------------------------
def assemble(weights: Weights, sealed: _seal.Sealed, options: LoadOptions | None = None, **choices):
    """Builds the pipeline described by ``sealed`` from its opened buffer,
    as ``options`` say (or a :class:`LoadOptions` made of ``choices``:
    ``assemble(w, sealed, device="cuda:0")``)."""
    return build(weights, sealed, _options(options, choices)).pipeline


def _options(options: LoadOptions | None, choices: dict) -> LoadOptions:
    if options is None:
        return LoadOptions(**choices)
    return options.replace(**choices) if choices else options


def build(weights: Weights, sealed: _seal.Sealed, options: LoadOptions) -> Loaded:
    """:func:`assemble`, also returning the upload's ``info()``."""
    _check(weights, sealed, options)
    with _no_collection():
        tensors, upload_info = materialize(weights, sealed, options)
        return Loaded(_rebuild(tensors, sealed, options), upload_info)


def build_parts(opened: list, parts, sealed: _seal.Sealed, options: LoadOptions) -> Loaded:
    """:func:`build` for a pipeline of several parts: ``opened[k]`` is
    ``parts[k]``'s buffer, opened."""
    _check_options(sealed, options)
    for k, (w, p) in enumerate(zip(opened, parts, strict=True)):
        _check_buffer(w, p.count, p.content_digest, f"part {k + 1} of {len(parts)} (object {p.ref.hex()})")
    with _no_collection():
        tensors, upload_info = _materialize_parts(opened, parts, sealed, options)
        return Loaded(_rebuild(tensors, sealed, options), upload_info)


def _rebuild(tensors: list, sealed: _seal.Sealed, options: LoadOptions):
    if sealed.own:
        # Tensors a module writes during inference (Sealed.own): this
        # process's own copy (where the tensors were loaded), writable, in
        # place of the shared read-only one, for every use of that reference.
        for i in sealed.own:
            tensors[i] = tensors[i].clone()
    if "torch" in sys.modules and (
        options.framework == "torch" or (options.framework is None and TORCH_PARAM in sealed.kinds)
    ):
        from ._torch import make_parameters

        # Frozen parameters where the pipeline had parameters (one object
        # per reference, so tied parameters stay one parameter). Every torch
        # tensor but a fast load's views is its own from_dlpack's leaf.
        make_parameters(tensors, sealed.kinds, fresh=not options.fast)
    return rebuild(sealed.skeleton, tensors, sealed.needs_eval)


def _check(weights: Weights, sealed: _seal.Sealed, options: LoadOptions) -> None:
    """The buffer is the one ``sealed`` describes, and loads as ``options`` say."""
    _check_options(sealed, options)
    _check_buffer(weights, len(sealed.kinds), sealed.content_digest)


def _check_options(sealed: _seal.Sealed, options: LoadOptions) -> None:
    if options.framework not in (None, "torch") and sealed.holds_modules:
        raise InvalidInputError("this pipeline holds torch modules; it loads with framework='torch' (or None) only")


def _check_buffer(weights: Weights, count: int, content_digest: bytes, what: str = "the buffer") -> None:
    if len(weights) != count or weights.content_digest() != content_digest:
        why = (
            f"it holds {len(weights)} tensors, not {count}"
            if len(weights) != count
            else "its content digest differs"
        )
        raise BufferMismatchError(f"{what} is not the one this wrapper was sealed with: {why}")


# -- 3. materialize -----------------------------------------------------------
def materialize(weights: Weights, sealed: _seal.Sealed, options: LoadOptions) -> tuple[list, dict | None]:
    """Tensor ``i`` of ``weights`` as an array of its framework (or of
    ``options.framework`` for all), for every ``i``; and the upload's
    ``info()`` on a GPU (else ``None``).

    On a GPU the whole buffer is uploaded once, before any framework adopts
    its tensors: torch and JAX tensors of one pipeline share the allocation."""
    groups = _by_framework(sealed.kinds, options.framework)
    dev = options.device
    if dev.kind != "cpu" and "numpy" in groups:
        raise InvalidInputError(f"numpy arrays live in host memory; load with device='cpu', not {str(dev)!r}")
    source, upload_info = weights, None
    if dev.kind != "cpu":
        source = upload(weights, dev, options.share_key, sealed.content_digest, not options.write_protect)
        upload_info = source.info()
        _report_upload(dev, upload_info, options.share_key is not None)
    if len(groups) == 1:  # the usual case: no reordering
        ((fw, indices),) = groups.items()
        return adapter(fw).adopt(source, indices, options.fast), upload_info
    out: list = [None] * len(sealed.kinds)
    for fw, indices in groups.items():
        for i, a in zip(indices, adapter(fw).adopt(source, indices, options.fast), strict=True):
            out[i] = a
    return out, upload_info


def _by_framework(kinds, framework: str | None) -> dict[str, list[int]]:
    """The indices of the references each framework adopts: all of them by
    ``framework`` when given, else each by the framework it was sealed from."""
    frameworks = {framework} if framework else {FRAMEWORK_OF[k] for k in set(kinds)}
    if len(frameworks) == 1:
        return {frameworks.pop(): list(range(len(kinds)))}
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[FRAMEWORK_OF[kind]].append(i)
    return groups


def _materialize_parts(opened: list, parts, sealed: _seal.Sealed, options: LoadOptions) -> tuple[list, dict | None]:
    """:func:`materialize` for several parts: each part's tensors are adopted
    from that part's buffer, or on a GPU from that part's upload."""
    wanted: dict[int, dict[str, list[tuple[int, int]]]] = {}  # part -> framework -> [(reference, index)]
    for i, ((p, j), kind) in enumerate(zip(sealed.sources, sealed.kinds, strict=True)):
        wanted.setdefault(p, collections.defaultdict(list))[options.framework or FRAMEWORK_OF[kind]].append((i, j))
    dev = options.device
    if dev.kind != "cpu" and any("numpy" in groups for groups in wanted.values()):
        raise InvalidInputError(f"numpy arrays live in host memory; load with device='cpu', not {str(dev)!r}")
    sources, first_info = opened, None
    if dev.kind != "cpu":
        sources = upload_parts(opened, parts, dev, options.share_key is not None, not options.write_protect)
        first_info = sources[0].info()
    out: list = [None] * len(sealed.kinds)
    for p, groups in wanted.items():
        for fw, pairs in groups.items():
            adopted = adapter(fw).adopt(sources[p], [j for _, j in pairs], options.fast)
            for (i, _), a in zip(pairs, adopted, strict=True):
                out[i] = a
    return out, first_info


def upload_parts(opened: list, parts, dev: Device, share: bool, writable: bool = False) -> list[DeviceWeights]:
    """Each part's buffer ``opened[k]`` on GPU ``dev``; with ``share``, each
    shared under its part's own key, so versions that have a part in common
    share its device copy too (``writable``: as for :func:`upload`)."""
    out = []
    for w, part in zip(opened, parts, strict=True):
        key = part.share_key if share else None
        d = upload(w, dev, key, part.content_digest, writable)
        _report_upload(dev, d.info(), key is not None)
        out.append(d)
    return out


def _ray_share_dir():
    """A rendezvous directory for sharing device copies inside this Ray
    cluster's session directory, or None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        rc = ray.get_runtime_context()
        return os.path.join(rc.get_temp_dir(), rc.get_session_name(), "ray-zerocopy")
    except Exception:
        return None


def upload(
    weights: Weights, dev: Device, share_key: str | None, content_digest: bytes, writable: bool = False
) -> DeviceWeights:
    """The buffer on GPU ``dev`` (one allocation; with a ``share_key``,
    shared with the other processes of this node that load the same content
    under that key onto that GPU, each mapping it read-only, or with
    ``writable`` each as the driver allows), or an error that says what to do."""
    try:
        count = cuda_device_count()
    except NoCudaError as e:
        count, why = 0, e.message
    else:
        why = f"this process sees {count} CUDA device(s)"
    if dev.index >= count:
        raise DeviceNotVisibleError(
            f"device {str(dev)!r} was requested, but this process sees no CUDA device {dev.index} ({why}). "
            "On Ray, give the actor a GPU (num_gpus=1 in map_batches or @ray.remote), or load with device='cpu'."
        )
    if share_key is None:
        return weights.upload(dev.index)
    return weights.upload(
        dev.index,
        share=share_key,
        share_digest=content_digest,
        share_dir=_ray_share_dir(),
        share_writable=writable,
    )


def _report_upload(dev: Device, info: dict, shared: bool) -> None:
    """Logs what an upload did not do the fast way."""
    if info["dir_note"]:
        _telemetry.log.info("sharing the device copy on %s: %s", dev, info["dir_note"])
    if shared and info["fallback"] != "none":
        _telemetry.fallback(
            "the device copy on %s is private to this process (%s): %s", dev, info["fallback"], info["note"]
        )
    if info["staging"] == "pinned":
        _telemetry.fallback(
            "the driver refused to register the sealed buffer on %s; it was copied through pinned bounce buffers "
            "(slower; registration needs page-lockable shared memory, see docs/performance.md)",
            dev,
        )
