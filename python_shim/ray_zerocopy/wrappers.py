"""``ActorWrapper`` and ``TaskWrapper``: one sealed copy of a pipeline's weights
in Ray's object store, loaded zero-copy wherever the pipeline is used."""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import sys
import threading
import time

from . import _delta, _load, _owner, _seal, _skeleton, _store, _telemetry
from ._device import parse_device
from .errors import InvalidInputError, InvalidTypeError, RayNotInitializedError, SealedObjectLostError

__all__ = ["ActorWrapper", "TaskWrapper"]


def _require_ray(what: str = "wrapping a pipeline; its weights are sealed into Ray's object store"):
    """Ray, initialized as Ray's own calls (``ray.put``, ``.remote()``) do
    it: a first use before ``ray.init()`` starts a local Ray (or connects to
    the cluster ``RAY_ADDRESS`` names), unless ``RAY_ENABLE_AUTO_CONNECT=0``
    turns that off, and then the error says what to call."""
    import ray

    if not ray.is_initialized():
        try:  # Ray's own hook: its setting, and its lock (two threads start one Ray)
            from ray._private.auto_init_hook import auto_init_ray
        except ImportError:  # pragma: no cover - a Ray without the hook

            def auto_init_ray():
                if os.environ.get("RAY_ENABLE_AUTO_CONNECT", "") != "0":
                    ray.init()

        auto_init_ray()
    if not ray.is_initialized():
        raise RayNotInitializedError(
            f"ray.init() has not been called (and RAY_ENABLE_AUTO_CONNECT=0 keeps Ray from starting by itself): "
            f"call ray.init() (or connect to a cluster) before {what}"
        )
    return ray


def _check_owner(owner) -> None:
    from ._owner import Owner

    if owner is not None and not isinstance(owner, Owner):
        raise InvalidTypeError(f"owner must be None or a ray_zerocopy.Owner, not {type(owner).__name__}")


class ActorWrapper:
    """Seals ``pipeline``'s weights once in Ray's object store; ``load()`` in
    each actor returns the pipeline with its tensors adopted zero-copy.

    ``pipeline``: an ``nn.Module``, any object holding modules at any depth
    (attributes, lists, dicts), or a pytree (dict/list/tuple) of torch
    tensors, numpy arrays or JAX arrays. Everything that is not a tensor is
    pickled as Ray would pickle it. ``device``: where ``load()`` puts the
    tensors (``"cpu"``, ``"cuda:N"``). ``use_fast_load``: adopt all tensors
    through one DLPack export instead of one per tensor. ``write_protect``
    (default on): in each process that loads, the pages holding the weights
    are read-only, so an in-place write through a loaded tensor kills the
    writing actor instead of silently changing the weights every actor
    shares. ``share_gpu`` (default on): on a GPU, the actors of a node that
    load onto the same GPU share ONE device copy of the weights (the first
    uploads, the others map it); where the device cannot share, each actor
    uploads its own and a warning says why. ``owner``: ``None`` (the sealed
    object belongs to this process and is lost when it exits) or an
    :class:`~ray_zerocopy.Owner` on this node, which then owns it, so the
    weights outlive this process (a script that deploys a Serve application
    and exits) until ``owner.release(wrapper.object_ref)`` or
    ``owner.close()``.
    """

    # The earlier parts (sealed buffers) this version's tensors also come
    # from, base first (see update()); its own buffer is the last part.
    _parts: tuple = ()

    def __init__(
        self,
        pipeline,
        device="cpu",
        use_fast_load: bool = False,
        *,
        write_protect: bool = True,
        share_gpu: bool = True,
        metadata=None,
        owner=None,
    ):
        ray = _require_ray()
        self._set_options(device, use_fast_load, write_protect, share_gpu, owner)
        started = time.perf_counter()
        self._put(ray, _seal.pack_object(pipeline, metadata), started, owner)

    def _set_options(self, device, use_fast_load, write_protect, share_gpu, owner) -> None:
        """The load options every version of this wrapper carries (an
        ``update`` copies them), checked."""
        self.device = str(parse_device(device))
        self.use_fast_load = bool(use_fast_load)
        self.write_protect = bool(write_protect)
        self.share_gpu = bool(share_gpu)
        _check_owner(owner)

    def _put(self, ray, packing: _seal.Packing, started: float, owner=None) -> None:
        # The buffer is packed straight into the object store (no second
        # copy in this process). What travels with the wrapper is the
        # description of the sealed buffer (skeleton, kinds, digest) and its
        # reference, never a second table of where tensors lie.
        described = []

        def fill(dst):
            described[:] = [packing.write(dst)]  # sealed, and validated by the native library

        _owner.release_dropped()  # a candidate dropped before this one: its store memory first
        self._ref = _store.put_buffer(packing.nbytes, fill, owner)
        self._owner = owner
        if owner is not None:
            self._hold = _owner.Hold(owner, self._ref.hex())  # see _holds
        self._sealed = described[0]
        # The Ray session it was sealed in: its objects live and die with it.
        self._session = ray.get_runtime_context().get_session_name()
        self._share_key = self._sealed.share_key(self._session)
        _telemetry.sealed(len(self._sealed.kinds), self._sealed.nbytes, time.perf_counter() - started, self._ref.hex())

    @classmethod
    def from_safetensors(
        cls,
        path,
        device="cpu",
        use_fast_load: bool = False,
        framework: str = "torch",
        *,
        model=None,
        write_protect: bool = True,
        share_gpu: bool = True,
        owner=None,
    ) -> ActorWrapper:
        """Seals a checkpoint on disk: a safetensors file, a list of files, a
        directory (every ``*.safetensors`` in it, following
        ``model.safetensors.index.json`` when there is one, as a sharded
        Hugging Face ``save_pretrained`` directory has it) or the index file
        itself. All shards become ONE sealed buffer, copied one shard at a
        time.

        ``load()`` returns ``{name: tensor}`` of ``framework``; or, with
        ``model`` (an ``nn.Module``, or a function that makes one), that
        module with every parameter and buffer adopted zero-copy from the
        checkpoint by its state-dict name (tied parameters stay tied; a
        tensor the model needs and the checkpoint lacks, or one of another
        shape or dtype, is an error here that names it). ``owner``: as for
        :class:`ActorWrapper`."""
        if framework not in _load.FRAMEWORKS:
            raise InvalidInputError(f"framework {framework!r} is not one of {_load.FRAMEWORKS}")
        if model is not None and framework != "torch":
            raise InvalidInputError("a checkpoint filled into a model loads as torch only")
        ray = _require_ray()
        self = cls.__new__(cls)
        self._set_options(device, use_fast_load, write_protect, share_gpu, owner)
        kind = _skeleton.KIND_OF_FRAMEWORK[framework]
        started = time.perf_counter()
        self._put(ray, _seal.pack_checkpoint(path, kind, model), started, owner)
        return self

    def _holds(self) -> tuple:
        """The holds (see ``_owner.Hold``) of this version's objects sealed
        with an owner in this process: its own, and its parts'."""
        own = self.__dict__.get("_hold")
        return (*(() if own is None else (own,)), *self.__dict__.get("_part_holds", ()))

    def _keep_holds(self) -> None:
        """This version's objects have left, or may leave, this process: their
        owner keeps them from now on (see ``_owner.Hold``)."""
        for hold in self._holds():
            hold.keep()

    def __getstate__(self):
        # Leaving this process (to an actor, a task, a Serve application,
        # ray.put, the registry).
        self._keep_holds()
        state = dict(self.__dict__)
        state.pop("_hold", None)
        state.pop("_part_holds", None)
        return state

    def __setstate__(self, state):
        # Arriving in an actor: import what the skeleton's classes live in
        # now, while Ray builds the actor, as it does for any argument's
        # classes, and make this process's metrics, so that load() only
        # assembles the pipeline.
        self.__dict__.update(state)
        _skeleton.import_modules(self._sealed.modules, self._sealed.kinds)
        _telemetry.prepare()

    def update(self, new) -> ActorWrapper:
        """A new version of the pipeline, sealed so that it stores only what
        changed: returns a new wrapper (same device and options) whose own
        sealed object, the *delta*, holds only the tensors that differ from
        this version's, and which refers to this version's objects for every
        other tensor (or copies them, from an object it would use less than
        half of: a version holds at most twice its own size, whatever chain
        of updates made it). Memory: this version plus the changed tensors.

        ``new``: a pipeline of the same form as this one (e.g. the fine-tuned
        module), or a state dict (``{name: tensor}``) applied onto this
        version's pipeline as ``load_state_dict`` applies it (for a module,
        the names of its ``state_dict()`` and of its non-persistent buffers;
        a value in another memory order takes the base's; a name it lacks, or another
        dtype or shape, is an error naming the tensor; names not given keep
        their tensors; a new value shows in every tensor of the state dict
        that shares its tensor's memory in the base: tied weights, a buffer
        that views a weight). A dict whose keys all name tensors of this
        version (or whose values are all tensors) is a state dict; one that
        names some beside other entries is refused as it could be either
        (see "State dict or whole pipeline?" in docs/serving.md).

        A tensor is this version's when its dtype, shape and bytes are equal:
        one whose memory is this version's tensor (this pipeline loaded here,
        some tensors replaced) without reading it, any other by comparing its
        bytes with this version's tensor of the same name. An update of an
        update refers to every part it still uses (the first version, earlier
        deltas) and to no other, so a part no version uses any more is freed
        once the versions that used it are dropped. Both versions load side
        by side; on a GPU the parts they share share their device copy."""
        ray = _require_ray()
        _check_session(self)
        started = time.perf_counter()
        parts = _delta.parts_of(self)
        opened = [_load.open_sealed(p.ref, self.write_protect, p.content_digest) for p in parts]
        packing, parts = _delta.pack_update(parts, opened, self._sealed, new, self.load_options(device="cpu"))
        out = type(self).__new__(type(self))
        # Its options (and a subclass's own attributes) are this version's;
        # what names its buffer is set by _put.
        out.__dict__.update(
            (k, v) for k, v in self.__dict__.items() if k not in ("_ref", "_sealed", "_share_key", "_hold", "version")
        )
        out._parts = parts
        out._part_holds = self._holds()  # its parts stay while it lives here, and leave with it
        out._put(ray, packing, started, self._owner)  # a new version has its base's owner
        return out

    # ------------------------------------------------------------------
    _owner = None  # wrappers sealed without an owner
    #: The number this version is published under, on a wrapper
    #: :func:`~ray_zerocopy.latest` returned (``None`` on any other).
    version: int | None = None

    @property
    def owner(self):
        """The :class:`~ray_zerocopy.Owner` of the sealed objects, or ``None``
        when the process that sealed them owns them."""
        return self._owner

    @property
    def object_ref(self):
        """The ``ObjectRef`` of this version's own sealed buffer (after
        :meth:`update`, the delta). Handed out, it is kept by the owner as a
        wrapper sent elsewhere is (see :class:`~ray_zerocopy.Owner`)."""
        self._keep_holds()
        return self._ref

    @property
    def object_refs(self) -> tuple:
        """The ``ObjectRef`` of every sealed buffer this version's tensors
        come from, base first, this version's own last (one, unless made by
        :meth:`update`)."""
        self._keep_holds()
        return (*(p.ref for p in self._parts), self._ref)

    @property
    def share_key(self) -> str | None:
        """The key under which the actors of a node share ONE device copy of
        these weights per GPU (``None`` with ``share_gpu=False``). It is
        derived from :attr:`content_digest` and the Ray cluster's session:
        wrappers of different weights never share a key, and neither do two
        clusters, even with equal weights (see docs/internals.md, "Trust
        model"). A version made by :meth:`update` shares each of its sealed
        buffers under that buffer's own key (so versions share the device
        copy of the parts they have in common); this key names the version."""
        if not self.share_gpu:
            return None
        if not self._parts:
            return self._share_key
        # The own buffer's key already holds the cluster's session.
        mixed = b"ray-zerocopy version key v1\0" + self.content_digest + self._share_key.encode()
        return hashlib.sha256(mixed).hexdigest()[:32]

    @property
    def content_digest(self) -> bytes:
        """What names these weights (32 bytes): the BLAKE3-based digest of
        every byte of the sealed buffer (see
        :meth:`ray_zerocopy.Weights.content_digest`); for a version made by
        :meth:`update`, a SHA-256 over the digests of every buffer its
        tensors come from and which tensor comes from which, since its own
        buffer (the delta) is equal for two models given the same change."""
        if not self._parts:
            return self._sealed.content_digest
        digests = [p.content_digest for p in self._parts] + [self._sealed.content_digest]
        return _seal.version_digest(digests, self._sealed.sources)

    @property
    def nbytes(self) -> int:
        """Size of this version's own sealed buffer (weights, header and
        alignment padding); after :meth:`update`, of the delta only."""
        return self._sealed.nbytes

    @property
    def total_nbytes(self) -> int:
        """Size of every sealed buffer this version's tensors come from."""
        return sum(p.nbytes for p in self._parts) + self._sealed.nbytes

    @property
    def num_tensors(self) -> int:
        return len(self._sealed.kinds)

    def __repr__(self) -> str:
        parts = f" ({self.total_nbytes / 2**20:.1f} MiB in {len(self._parts) + 1} parts)" if self._parts else ""
        return (
            f"ActorWrapper({self.num_tensors} tensors, {self.nbytes / 2**20:.1f} MiB sealed{parts}, "
            f"device={self.device!r}, use_fast_load={self.use_fast_load}, write_protect={self.write_protect}, "
            f"share_gpu={self.share_gpu})"
        )

    # ------------------------------------------------------------------
    def load(self, device=None, framework: str | None = None):
        """Returns the pipeline with every tensor adopted from the sealed
        buffer: zero-copy on the CPU. Call once per actor (in ``__init__``).

        ``device`` overrides the wrapper's device. ``framework`` (``"torch"``,
        ``"numpy"``, ``"jax"``) returns every tensor as that framework's array;
        by default each comes back as the kind it was. Torch modules come back
        in eval mode with ``requires_grad=False``.
        """
        _check_session(self)
        if self._sealed.sources is None:
            return _load.load(self._ref, self._sealed, self.load_options(device, framework))
        return _load.load_parts(_delta.parts_of(self), self._sealed, self.load_options(device, framework))

    def load_options(self, device=None, framework: str | None = None) -> _load.LoadOptions:
        """The options :meth:`load` loads with: the wrapper's, with
        ``device`` (when given) and ``framework``."""
        return _load.LoadOptions(
            device=self.device if device is None else device,
            framework=framework,
            fast=self.use_fast_load,
            write_protect=self.write_protect,
            share_key=self.share_key,
        )

    def as_udf(self, predict_fn, *, device=None, framework: str | None = None):
        """A callable class for ``Dataset.map_batches``: each actor loads the
        pipeline once, then every batch goes to ``predict_fn(pipeline, batch)``
        (under ``torch.no_grad()`` when torch is in use)::

            ds.map_batches(wrapper.as_udf(predict), batch_size=32,
                           compute=ActorPoolStrategy(size=4))
        """
        return _make_udf(self, predict_fn, device, framework)


def _check_session(wrapper) -> None:
    """A wrapper loads in the Ray session it was sealed in: its objects are
    gone with that session. One kept (or unpickled) after ``ray.shutdown()``
    and a new ``ray.init()`` met a new session's object store, where
    ``ray.get`` of an unpickled one waited for ever."""
    sealed_in = getattr(wrapper, "_session", None)
    if sealed_in is None or "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return  # the load says so
    try:
        now = ray.get_runtime_context().get_session_name()
    except Exception:  # a Ray that cannot say (Ray Client): the load finds out
        return
    if now != sealed_in:
        raise SealedObjectLostError(
            f"this wrapper was sealed in the Ray session {sealed_in!r}, and this process is in {now!r}: its "
            "sealed weights went with that session (ray.shutdown() ends a session's objects). Wrap the "
            "pipeline again in this session"
        )


def _make_udf(wrapper: ActorWrapper, predict_fn, device, framework):
    class ZeroCopyUDF:
        """Loads the pipeline once per actor; calls ``predict_fn(pipeline, batch)``."""

        def __init__(self):
            self.pipeline = wrapper.load(device=device, framework=framework)

        def __call__(self, batch):
            torch = sys.modules.get("torch")
            if torch is None:
                return predict_fn(self.pipeline, batch)
            with torch.no_grad():
                return predict_fn(self.pipeline, batch)

    ZeroCopyUDF.__name__ = ZeroCopyUDF.__qualname__ = f"ZeroCopyUDF_{getattr(predict_fn, '__name__', 'predict')}"
    return ZeroCopyUDF


# ----------------------------------------------------------------------
# TaskWrapper: each call runs in a Ray task; a worker keeps the pipelines it
# loaded (a few, most recent first), so later calls on it skip loading.
_task_cache: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_task_cache_lock = threading.Lock()  # a worker may run tasks on several threads
_TASK_CACHE_SIZE = 4


def _cached_pipeline(wrapper: ActorWrapper):
    key = (wrapper._ref.hex(), wrapper.device)
    with _task_cache_lock:
        pipeline = _task_cache.get(key)
        if pipeline is not None:
            _task_cache.move_to_end(key)
            return pipeline
    pipeline = wrapper.load()  # not under the lock: loads of others go on
    with _task_cache_lock:
        _task_cache[key] = pipeline
        while len(_task_cache) > _TASK_CACHE_SIZE:
            _task_cache.popitem(last=False)
    return pipeline


def _run_method(wrapper: ActorWrapper, method: str, args, kwargs):
    pipeline = _cached_pipeline(wrapper)
    fn = pipeline if method == "__call__" else getattr(pipeline, method)
    torch = sys.modules.get("torch")
    if torch is None:
        return fn(*args, **kwargs)
    with torch.no_grad():
        return fn(*args, **kwargs)


@functools.cache
def _remote_run():
    import ray

    return ray.remote(_run_method)


class TaskWrapper:
    """Runs the pipeline in Ray tasks: ``wrapped(x)`` and ``wrapped.method(x)``
    each run in a task that loads the pipeline zero-copy (a worker that has
    loaded it already reuses it) and return the result. ``ray_options``
    (``num_cpus``, ``num_gpus``, ...) go to every task.

    A worker keeps the last four pipelines it loaded, and with them their
    sealed objects in the store, after the ``TaskWrapper`` is dropped, until
    it loads others or exits: a driver that makes many short-lived
    ``TaskWrapper`` s of large models holds up to four of them per worker
    (an :class:`ActorWrapper` in actors frees them with the actors)."""

    def __init__(
        self,
        pipeline,
        device="cpu",
        use_fast_load: bool = False,
        *,
        write_protect: bool = True,
        share_gpu: bool = True,
        **ray_options,
    ):
        ray = _require_ray()
        self._wrapper = ActorWrapper(
            pipeline, device=device, use_fast_load=use_fast_load, write_protect=write_protect, share_gpu=share_gpu
        )
        # One small object the tasks resolve, instead of the skeleton in every call.
        self._wrapper_ref = ray.put(self._wrapper)
        self._options = ray_options

    @property
    def actor_wrapper(self) -> ActorWrapper:
        return self._wrapper

    def remote(self, method: str, *args, **kwargs):
        """Submits ``pipeline.method(*args, **kwargs)`` and returns its ``ObjectRef``."""
        fn = _remote_run()
        if self._options:
            fn = fn.options(**self._options)
        return fn.remote(self._wrapper_ref, method, args, kwargs)

    def __call__(self, *args, **kwargs):
        import ray

        return ray.get(self.remote("__call__", *args, **kwargs))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        import ray

        def call(*args, **kwargs):
            return ray.get(self.remote(name, *args, **kwargs))

        call.__name__ = name
        return call
