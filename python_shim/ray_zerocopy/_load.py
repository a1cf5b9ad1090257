"""Loading a sealed pipeline: the path of a tensor's bytes from Ray's object
store to the pipeline the caller gets, top to bottom.

1. :func:`open_sealed`: ``ray.get`` gives a read-only view of the sealed
   object in shared memory; the native library validates it and builds the
   tensor table (``Weights.from_buffer``), write-protecting its pages.
2. :func:`assemble`: checks that the buffer is the one the wrapper was sealed
   with, then
3. :func:`materialize`: every tensor as an array of its framework, adopted
   zero-copy from the buffer on the CPU; on a GPU the buffer is uploaded once
   and every framework adopts its tensors from that one device allocation;
4. :func:`rebuild`: the skeleton is unpickled with each reference resolved to
   its tensor, and modules are put in eval mode.

Nothing here but step 1 needs Ray, so :func:`assemble` also serves buffers
that reach a process some other way.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import os
import pickle
import sys
import threading
import time
import weakref

from . import _seal, _telemetry
from ._device import Device, parse_device
from .errors import NoCudaError
from .device_weights import cuda_device_count
from .weights import Weights

__all__ = ["FRAMEWORKS", "load", "open_sealed", "assemble", "materialize", "rebuild"]

FRAMEWORKS = ("torch", "numpy", "jax")


@contextlib.contextmanager
def _no_collection():
    """No garbage collection during a load, nor one due right after it.

    A load allocates thousands of objects that all stay alive (the model), so
    a collection during it finds nothing to free; in a fresh actor one is
    usually due by then, and scanning the young objects (many of them, just
    after imports) cost 1.3-1.6 ms of a 6 ms load. ``gc.freeze()`` followed
    by ``gc.unfreeze()`` moves every live object to the oldest generation in
    constant time, so the due collection has nothing young to scan; done
    again at the end, the model's objects join the oldest generation too,
    where they would end up anyway. The cost: garbage cycles that exist at
    that moment are freed by the next full collection instead of a young
    one."""
    was_enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def load(ref, sealed: "_seal.Sealed", write_protect: bool, device, framework=None, fast: bool = False, share_key=None):
    """What ``ActorWrapper.load`` does: open the sealed object behind
    ``ref`` and assemble the pipeline ``sealed`` describes from it. On a GPU,
    with a ``share_key``, the processes on the node that load the same
    content under that key onto the same GPU share one device copy."""
    started = time.perf_counter()
    report: dict = {}
    with _no_collection():
        pipeline = assemble(open_sealed(ref, write_protect), sealed, device, framework, fast, share_key, report)
    seconds = time.perf_counter() - started
    _telemetry.loaded(str(parse_device(device)), len(sealed.kinds), seconds, write_protect, report.get("upload"))
    return pipeline


# -- 1. open ------------------------------------------------------------------
# Opened buffers, per process, by object ID. Weak: the handle goes when no
# load is in progress; tensors keep the buffer itself alive on their own.
_opened: "weakref.WeakValueDictionary[tuple, Weights]" = weakref.WeakValueDictionary()
_opened_lock = threading.Lock()


def open_sealed(ref, write_protect: bool) -> Weights:
    """The sealed object behind ``ref``, opened (once per process while in
    use) and validated, its pages read-only when ``write_protect``."""
    key = (ref.hex(), write_protect)
    with _opened_lock:
        w = _opened.get(key)
        if w is not None:
            return w
        import ray

        try:
            buffer = ray.get(ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.ObjectFreedError, ray.exceptions.OwnerDiedError) as e:
            raise RuntimeError(
                f"the sealed weights (object {key[0]}) are no longer in Ray's object store ({type(e).__name__}); "
                "the driver that created the wrapper must keep it (and Ray) alive while actors load it"
            ) from e
        w = Weights.from_buffer(buffer, write_protect=write_protect)
        if write_protect and w.guard_state == "mprotect":
            _telemetry.fallback(
                "the shared weights are read-only by mprotect only in this process: no read-only descriptor of "
                "the object store's file was found (this worker is not a child of the raylet, or /proc is "
                "restricted), so a write still faults, but madvise(MADV_REMOVE) here would reach every actor"
            )
        _opened[key] = w
        return w


# -- 2. check and assemble ----------------------------------------------------
def assemble(
    weights: Weights, sealed: "_seal.Sealed", device="cpu", framework=None, fast: bool = False, share=None, report=None
):
    """Builds the pipeline described by ``sealed`` from its opened buffer (on
    a GPU, sharing the device copy under the key ``share`` when given; the
    upload's ``info()`` goes to ``report["upload"]`` when a dict is given)."""
    dev = parse_device(device)
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(f"framework {framework!r} is not one of {FRAMEWORKS}")
    if framework not in (None, "torch") and _seal.TORCH_PARAM in sealed.kinds:
        raise ValueError("this pipeline holds torch modules; it loads with framework='torch' (or None) only")
    if len(weights) != len(sealed.kinds) or weights.content_digest() != sealed.content_digest:
        raise RuntimeError(
            f"the buffer ({len(weights)} tensors) is not the one this wrapper was sealed with "
            f"({len(sealed.kinds)} tensors): its header (tensor table or content digest) differs"
        )
    share = (share, sealed.content_digest) if share is not None else None
    with _no_collection():
        tensors = materialize(weights, sealed.kinds, framework, dev, fast, share, report)
        if "torch" in sys.modules and (framework == "torch" or (framework is None and _seal.TORCH_PARAM in sealed.kinds)):
            from ._torch import as_parameter

            # Frozen parameters where the pipeline had parameters (one object
            # per reference, so tied parameters stay one parameter).
            tensors = [as_parameter(t) if k == _seal.TORCH_PARAM else t for t, k in zip(tensors, sealed.kinds)]
        return rebuild(sealed.skeleton, tensors, sealed.needs_eval)


# -- 3. materialize -----------------------------------------------------------
def _adapter(framework: str):
    if framework == "torch":
        from . import _torch as adapter
    elif framework == "jax":
        from . import _jax as adapter
    else:
        from . import _numpy as adapter
    return adapter


def materialize(weights: Weights, kinds, framework, dev: Device, fast: bool = False, share=None, report=None) -> list:
    """Tensor ``i`` of ``weights`` as an array of its framework (or of
    ``framework`` for all), for every ``i``.

    On a GPU the whole buffer is uploaded once, before any framework adopts
    its tensors: torch and JAX tensors of one pipeline share the allocation."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[framework or _seal.FRAMEWORK_OF[kind]].append(i)
    if dev.kind != "cpu" and "numpy" in groups:
        raise ValueError(f"numpy arrays live in host memory; load with device='cpu', not {str(dev)!r}")
    source = weights if dev.kind == "cpu" else upload(weights, dev, share, report)
    out: list = [None] * len(kinds)
    for fw, indices in groups.items():
        for i, a in zip(indices, _adapter(fw).adopt(source, indices, fast)):
            out[i] = a
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


def upload(weights: Weights, dev: Device, share=None, report=None):
    """The buffer on GPU ``dev`` (one allocation; with ``share = (key,
    content_digest)``, shared with the other processes of this node that load
    the same content under that key onto that GPU), or an error that says
    what to do. Its ``info()`` goes to ``report["upload"]`` when a dict is
    given."""
    try:
        count = cuda_device_count()
    except NoCudaError as e:
        count, why = 0, e.message
    else:
        why = f"this process sees {count} CUDA device(s)"
    if dev.index >= count:
        raise NoCudaError(
            "RZC_NO_CUDA",
            f"device {str(dev)!r} was requested, but this process sees no CUDA device {dev.index} ({why}). "
            "On Ray, give the actor a GPU (num_gpus=1 in map_batches or @ray.remote), or load with device='cpu'.",
        )
    if share is None:
        device_weights = weights.upload(dev.index)
    else:
        key, digest = share
        device_weights = weights.upload(dev.index, share=key, share_digest=digest, share_dir=_ray_share_dir())
    info = device_weights.info()
    if report is not None:
        report["upload"] = info
    if info["dir_note"]:
        _telemetry.log.info("sharing the device copy on %s: %s", dev, info["dir_note"])
    if share is not None and info["fallback"] != "none":
        _telemetry.fallback(
            "the device copy on %s is private to this process (%s): %s", dev, info["fallback"], info["note"]
        )
    if info["staging"] == "pinned":
        _telemetry.fallback(
            "the driver refused to register the sealed buffer on %s; it was copied through pinned bounce buffers "
            "(slower; registration needs page-lockable shared memory, see docs/performance.md)", dev
        )
    return device_weights


# -- 4. rebuild ---------------------------------------------------------------
def rebuild(skeleton: bytes, objects: list, needs_eval: bool = True) -> object:
    """Unpickles ``skeleton`` with reference ``i`` resolved to ``objects[i]``.
    Sealing pickles modules in eval mode; ``needs_eval`` (some module could
    not be) walks the result and switches every module to eval mode."""
    unpickler = pickle.Unpickler(io.BytesIO(skeleton))
    unpickler.persistent_load = lambda pid: objects[pid[0]]
    obj = unpickler.load()
    if needs_eval:
        for _, module in _seal.walk_modules(obj):
            if any(m.training for m in module.modules()):
                module.eval()
    return obj
