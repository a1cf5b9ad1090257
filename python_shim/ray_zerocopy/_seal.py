"""Sealing an object's tensors into one buffer.

The object (an ``nn.Module``, a pipeline holding modules at any depth, a
pytree of arrays) is pickled once with every tensor or array replaced by a
reference (pickle's ``persistent_id``): the result is the small *skeleton*.
The tensors are packed into one aligned safetensors buffer, whose header is
the only table of where each tensor lies: loading (``_load``) reads it back
through the native library, which validates it, and resolves reference ``i``
to tensor ``i`` of that table. The same tensor object reached twice (tied
weights) is one reference, so it is stored once and comes back tied.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
from dataclasses import dataclass

import numpy as np

from . import _checkpoint, _numpy, _telemetry
from ._native import DTYPE_CODES
from ._skeleton import (
    FRAMEWORK_OF,
    JAX,
    NUMPY,
    TORCH,
    TORCH_PARAM,
    imported_adapters,
    items,
    referenced_modules,
    walk,
    walk_modules,
)
from .errors import InternalError, InvalidInputError, InvalidTypeError, RayZeroCopyError
from .packing import DEVICE_ALIGNMENT, GUARD_NBYTES, PackInput, PackPlan, Sealer
from .weights import Weights

__all__ = [
    "Sealed",
    "SealedParts",
    "Packing",
    "pack_object",
    "pack_checkpoint",
    "seal",
    "seal_checkpoint",
    "kind_of",
    "GUARD_BYTES",
    "ALIGNMENT",
    # The kinds of reference live with the skeleton; here too, where sealing
    # callers have always found them.
    "TORCH",
    "TORCH_PARAM",
    "NUMPY",
    "JAX",
    "FRAMEWORK_OF",
]

# Bytes of non-tensor data before the first and after the last tensor (one
# page each), so that the write guard can protect every page holding weights
# without touching memory outside the buffer.
GUARD_BYTES = GUARD_NBYTES
# Every tensor starts at the device alignment (256 bytes): JAX adopts 64-byte
# aligned host memory without copying, and with the device layout as the host
# layout an upload is one contiguous copy. It costs at most 255 bytes of
# padding per tensor.
ALIGNMENT = DEVICE_ALIGNMENT


@dataclass(frozen=True)
class Sealed:
    """What a wrapper carries to every process that loads its buffer: the
    skeleton, each tensor's framework, the modules the skeleton refers to, and
    what identifies the buffer it was sealed with (checked at load)."""

    skeleton: bytes
    kinds: tuple  # per tensor, in the buffer's order: TORCH, TORCH_PARAM, NUMPY or JAX
    modules: tuple  # imported when the wrapper arrives in a process
    nbytes: int  # size of the sealed buffer
    content_digest: bytes  # Weights.content_digest() of the sealed buffer: every byte of it
    needs_eval: bool = False  # some module was pickled in training mode: switch after loading
    # References each loading process copies for itself: tensors a module
    # writes during inference (an nn.Embedding with max_norm renormalizes
    # the rows it looks up, in place), which the shared read-only copy
    # cannot take. Empty for nearly every pipeline.
    own: tuple = ()
    # The skeleton holds torch modules (or programs): they load as torch
    # only, a module of numpy arrays would fail when run.
    holds_modules: bool = False
    # Reference i is tensor i of this buffer (see SealedParts).
    sources = None

    def share_key(self, cluster: str) -> str:
        """The key under which processes of the Ray cluster ``cluster`` (its
        session name) share one device copy of this buffer: 128 bits of
        SHA-256 over the content digest and the cluster, in hex. With the
        content digest it is the buffer's identity; both are made here only."""
        import hashlib

        return hashlib.sha256(b"ray-zerocopy share key v1\0" + self.content_digest + cluster.encode()).hexdigest()[:32]


def version_digest(part_digests, sources) -> bytes:
    """What names a version made of several sealed buffers: SHA-256 over
    each buffer's content digest (base first, its own last) and which tensor
    comes from which buffer. Two versions with equal digests load the same
    tensors; a version's own buffer alone (its delta) does not say that, as
    two different models given the same change have equal deltas."""
    import hashlib

    h = hashlib.sha256(b"ray-zerocopy version v1\0")
    for d in part_digests:
        h.update(d)
    h.update(repr(tuple(tuple(s) for s in sources)).encode())
    return h.digest()


@dataclass(frozen=True)
class SealedParts(Sealed):
    """A :class:`Sealed` whose tensors come from several sealed buffers (a
    version made by ``ActorWrapper.update``; this buffer is the last part):
    ``sources[i]`` is ``(part, index)`` of reference ``i``."""

    sources: tuple = ()


@dataclass
class Packing:
    """A pickled skeleton and how to write the buffer it refers to: a
    buffer of ``nbytes`` bytes laid out by ``plan``, whose tensors
    ``fill(dst, progress)`` copies in through ``progress.copy`` (or
    ``progress.sealer`` itself), wherever
    ``dst`` lives (straight into Ray's object store, see ``_store``, or a
    new array: :meth:`to_array`)."""

    skeleton: bytes
    kinds: tuple
    needs_eval: bool
    plan: PackPlan
    fill: object  # fill(dst: np.ndarray, progress: _Progress) -> None
    label: str = "sealing"  # the progress bar's
    keep: object = None  # what the fill reads, alive until it has run
    sources: tuple | None = None  # see Sealed.sources
    own: tuple = ()  # see Sealed.own
    holds_modules: bool = False  # see Sealed.holds_modules

    @property
    def count(self) -> int:
        """How many tensors the buffer holds."""
        return len(self.kinds) if self.sources is None else len(self.plan)

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def write(self, dst) -> Sealed:
        """Writes and seals the buffer into ``dst``: the digest of every byte
        is computed on a native thread while the tensors are copied, then
        written into the header. Returns the description a wrapper carries,
        checked against the buffer by the native library."""
        self.plan.write_layout(dst)
        with Sealer(dst) as sealer:
            progress = _Progress(self.plan, sealer, _telemetry.progress(self.plan.nbytes, self.label))
            try:
                self.fill(dst, progress)
            finally:
                progress.bar.close()
            digest = sealer.finish()
        with Weights.from_buffer(dst) as w:
            if len(w) != self.count:
                raise InternalError(f"packed {len(w)} tensors for {self.count} references")
        modules = referenced_modules(self.skeleton)
        made = dict(
            skeleton=self.skeleton,
            kinds=tuple(self.kinds),
            modules=modules,
            nbytes=int(dst.nbytes),
            content_digest=digest,
            needs_eval=self.needs_eval,
            own=self.own,
            holds_modules=self.holds_modules,
        )
        return Sealed(**made) if self.sources is None else SealedParts(**made, sources=self.sources)

    def to_array(self) -> tuple[Sealed, np.ndarray]:
        """The buffer as a new array (no Ray needed), and its description."""
        buffer = self.plan.allocate()  # zeros, as the sealer wants them, and aligned
        return self.write(buffer), buffer


class _Progress:
    """How a fill copies tensors in: through the sealer, on every core, each
    block of the buffer hashed as soon as its bytes are final. While a
    progress bar shows, in groups of about :attr:`GROUP` bytes, the bar
    advancing after each."""

    GROUP = 256 << 20

    def __init__(self, plan: PackPlan, sealer: Sealer, bar):
        self.plan, self.sealer, self.bar = plan, sealer, bar

    @property
    def shows(self) -> bool:
        """Whether a progress bar shows (else a fill copies in one native call)."""
        return not isinstance(self.bar, _telemetry._NoProgress)

    def copy(self, copies) -> None:
        """``copies``: ``[(address, offset, nbytes)]`` as for :meth:`Sealer.copy`."""
        self._grouped(copies, self.sealer.copy)

    def read(self, fd: int, reads) -> None:
        """``reads``: ``[(file_offset, offset, nbytes)]`` of the open file
        ``fd``, as for :meth:`Sealer.read`."""
        self._grouped(reads, lambda group: self.sealer.read(fd, group))

    def _grouped(self, pieces, fill) -> None:
        if not self.shows:
            fill(pieces)
            return
        group, size = [], 0
        for c in pieces:
            group.append(c)
            size += c[2]
            if size >= self.GROUP:
                fill(group)
                self.bar.update(size)
                group, size = [], 0
        if group:
            fill(group)
            self.bar.update(size)


def _names(obj, adapters, found: dict | None = None) -> dict[int, str]:
    """id(tensor) -> a readable name: the state-dict path for tensors of
    modules, the attribute/key path for other tensors and arrays. Each one
    is also put in ``found`` (by id), where given."""
    torch = sys.modules.get("torch")

    def is_leaf(o):
        return (torch is not None and isinstance(o, torch.nn.Module)) or any(a.accepts(o) for _, a in adapters)

    names = {}
    found = {} if found is None else found
    for path, leaf in walk(obj, is_leaf):
        if torch is not None and isinstance(leaf, torch.nn.Module):
            from . import _torch_seal

            for name, t in _torch_seal.named_tensors(leaf, path):
                names.setdefault(id(t), name)
                found[id(t)] = t
        else:
            names.setdefault(id(leaf), path or "tensor")
            found[id(leaf)] = leaf
    return names


def _torch_reducer():
    """``_torch_seal.reduce`` where torch is imported, else ``None``: a pipeline
    without torch never imports it."""
    if "torch" not in sys.modules:
        return None
    from . import _torch_seal

    return _torch_seal.reduce


def _base_pickler():
    """Ray's cloudpickle (what Ray uses for actor arguments: classes and
    functions defined in ``__main__`` pickle by value); without Ray (a GPU
    check machine has none), the standalone cloudpickle, else plain pickle."""
    try:
        from ray import cloudpickle
    except ImportError:
        try:
            import cloudpickle
        except ImportError:
            return pickle.Pickler
    return cloudpickle.Pickler


@functools.cache
def _pickler_class(base):
    """The sealing pickler over ``base``, made once: the sealer rides on the
    instance. (A class made per call, closing over the sealer, is a reference
    cycle: it kept the sealer, and with it the opened buffers of an update's
    base, alive until a full garbage collection.)"""

    class _Pickler(base):
        def __init__(self, file, sealer, torch_reduce):
            super().__init__(file, protocol=5)
            self.sealer, self.torch_reduce = sealer, torch_reduce

        def persistent_id(self, o):
            return self.sealer.persistent_id(o)

        def reducer_override(self, o):
            rv = self.torch_reduce(o, self.sealer, self.proto) if self.torch_reduce is not None else None
            if rv is not None:
                return rv
            inherited = getattr(base, "reducer_override", None)
            return inherited(self, o) if inherited is not None else NotImplemented

    return _Pickler


class TensorData:
    """Stands, while sealing, for the data of a tensor that is more than
    its data: the sealer makes it a reference (see ``_Sealer.persistent_id``)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


# A skeleton this large (everything but the shared tensors, which every
# loading process receives) says that something big travels by value: a
# 300-tensor model's is a few tens of KB.
SKELETON_WARN_BYTES = 8 << 20


class _Sealer:
    """Pickles an object into a skeleton, turning every tensor or array it
    reaches into a reference (pickle's ``persistent_id``) to an entry of the
    buffer to be packed: reference ``i`` is ``inputs[i]``. ``preset`` maps
    tensors (by ``id``) to entries decided beforehand, e.g. a checkpoint's."""

    def __init__(self, obj, preset: dict | None = None, inputs=(), kinds=()):
        self.adapters = imported_adapters()
        found: dict = {}
        self.known = _names(obj, self.adapters, found)
        self.refs: dict[int, int] = dict(preset or {})  # id(tensor) -> index
        self.inputs: list = list(inputs)
        self.kinds: list[str] = list(kinds)
        self.keep: list[object] = []  # originals and contiguous copies, alive until packed
        # "__metadata__" names the header's metadata in safetensors: a tensor
        # at that key of a pytree is given another name.
        self.used_names: set[str] = {getattr(i, "name", "") for i in self.inputs} | {"__metadata__"}
        self.training_left: list[object] = []  # modules pickled in training mode that we could not switch
        self.own_ids: set[int] = set()  # id() of tensors each loading process copies (Sealed.own)
        self.own_notes: list[tuple] = []  # (module path, class, why, bytes) of the modules that write them
        self.holds_modules = False  # a torch module or program was pickled (Sealed.holds_modules)
        self.reduced: set[int] = set()  # id() of tensors pickled through the torch reducer
        self.unshared: list = []  # numpy arrays of numbers safetensors cannot hold: pickled
        self.obj = obj
        self._module_paths: dict | None = None
        # Tensors that lie inside another's memory (tied weights that are
        # two objects, as in a state dict; a transposed or sliced view kept
        # beside its base): sealed as views of that base, not again. A
        # tensor given its entry beforehand (a checkpoint's) is its own.
        self.views: dict = {}
        if "torch" in sys.modules and found:
            from . import _torch, _torch_seal

            self.views = _torch_seal.views([t for i, t in found.items() if i not in self.refs])
            self.keep.extend(t for i, t in found.items() if i in self.views)  # their ids stay theirs
            # A tensor given its entry beforehand keeps its class and
            # attributes all the same (its values are the entry's).
            self.reduced.update(
                i
                for i, t in found.items()
                if i in self.refs and _torch.has_extras(t) and not _torch.is_wrapper_subclass(t)
            )
            # A tensor its module writes in inference: each loading process
            # copies it, or, where it is a view, its base (so that the
            # write reaches what shares its memory, as in torch).
            for w in _torch_seal.written_tensors(walk_modules(obj)):
                self.mark_own(w)

    def module_path(self, module) -> str:
        """The dotted path of ``module`` in the object being sealed."""
        if self._module_paths is None:
            self._module_paths = {}
            for path, top in walk_modules(self.obj):
                for name, m in top.named_modules(prefix=path):
                    self._module_paths.setdefault(id(m), name or "the pipeline itself")
        return self._module_paths.get(id(module), type(module).__name__)

    def mark_own(self, t) -> None:
        """Tensor ``t`` is copied by each process that loads (``Sealed.own``);
        its base where it is a view, so that a write reaches what shares its
        memory, as in torch."""
        if id(t) in self.views:
            t = self.views[id(t)][0]
        self.own_ids.add(id(t))
        self.keep.append(t)  # its id stays its own until packed

    def own_written(self, path: str, kind: str, why: str, tensors) -> None:
        """Module (or program) ``path`` of class ``kind`` writes ``tensors``
        in place in inference (``why``): each is copied by every process
        that loads (:meth:`mark_own`), and the wrap says so once pickled."""
        for t in tensors:
            self.mark_own(t)
        self.own_notes.append((path, kind, why, sum(t.numel() * t.element_size() for t in tensors)))

    def own_refs(self) -> tuple:
        """The references of the tensors :meth:`mark_own` named."""
        return tuple(sorted({self.refs[i] for i in self.own_ids if i in self.refs}))

    def persistent_id(self, o):
        """Reference ``i`` for a tensor or array (its data, in the buffer),
        ``None`` for what pickles as usual. A tensor that is more than its
        data (a subclass, attributes of its own, a layout of its own, a view
        of another: see ``_reducible`` and ``_torch_seal.views``) pickles as
        usual, through the torch reducer, which hands its data back here
        wrapped in a :class:`TensorData`; its other uses then meet pickle's
        memo, so that they stay one object."""
        if type(o) is TensorData:
            o = o.tensor
            i = self.refs.get(id(o))
            return i if i is not None else self._take(o, self._adapter(o))
        if id(o) in self.reduced or id(o) in self.views:
            return None  # pickled through the torch reducer (see _torch_seal.reduce)
        i = self.refs.get(id(o))
        if i is not None:
            return i
        entry = self._adapter(o)
        if entry is None:
            if _numpy.unshareable(o):
                self.unshared.append(o)  # announced once pickled
            return None
        if entry[0] == "torch" and self._reducible(o, entry[1]):
            self.reduced.add(id(o))
            self.keep.append(o)  # its id stays its own until packed
            return None
        return self._take(o, entry)

    def value_of(self, t):
        """What tensor ``t`` is sealed as: itself (an update's sealer gives
        the new value where there is one)."""
        return t

    def _reducible(self, t, adapter) -> bool:
        """Whether torch tensor ``t`` pickles through the torch reducer: it
        has extras (its own, whatever it is sealed as), or what it is sealed
        as (``value_of``: an update's new value) has a layout of its own,
        except a tensor each process copies (sealed as it is: its reference
        must be its own)."""
        if adapter.has_extras(t):
            return True
        return id(t) not in self.own_ids and adapter.relays(self.value_of(t))

    def _adapter(self, o):
        """``(framework, adapter)`` of the first adapter that takes ``o``, or ``None``."""
        for entry in self.adapters:
            if entry[1].accepts(o):
                return entry
        return None

    def _take(self, o, entry) -> int:
        """A new reference for tensor ``o``: a new entry of the buffer."""
        fw, adapter = entry
        name = self.known.get(id(o)) or f"tensor.{len(self.inputs)}"
        while name in self.used_names:
            name += "_"
        self.used_names.add(name)
        inp, alive = adapter.pack_input(o, name)
        self.refs[id(o)] = len(self.inputs)
        self.inputs.append(inp)
        self.kinds.append(kind_of(o, fw))
        self.keep.extend((o, alive))
        return len(self.inputs) - 1

    def _reducer(self):
        """What the pickler asks first of every object: the torch reducer
        (``None`` without torch)."""
        return _torch_reducer()

    def _dump(self, obj, f) -> None:
        pickler = _pickler_class(_base_pickler())(f, self, self._reducer())
        try:
            pickler.dump(obj)
            if self.training_left:
                # The modules pickled in training mode (a train() of their
                # own), for the load to switch with eval(): a second pickle
                # after the skeleton's, made with the same memo, so that each
                # is the module the first one makes, wherever it lies (in a
                # functools.partial, a deque, an object with __slots__: where
                # no walk of the loaded pipeline reaches). None where one of
                # them is not in the memo: the load then walks what it finds.
                memo = pickler.memo.copy()
                left = list(self.training_left)
                pickler.dump(left if all(id(m) in memo for m in left) else None)
        finally:
            pickler.sealer = pickler.torch_reduce = None

    def pickle(self, obj) -> bytes:
        f = io.BytesIO()
        try:
            self._dump(obj, f)
        except RayZeroCopyError:
            raise  # a tensor we cannot take: its own message says which and why
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as e:
            path, culprit = _unpicklable(obj)
            raise InvalidTypeError(
                f"the pipeline cannot be pickled: {path} (a {type(culprit).__module__}.{type(culprit).__qualname__}) "
                f"does not pickle ({e}). Everything besides tensors must be picklable by cloudpickle, as for any "
                "object Ray sends to an actor: leave it out of what you wrap (build it in the actor instead), "
                "or make it picklable (__reduce__, or __getstate__/__setstate__)"
            ) from e
        if not self.refs:
            raise InvalidInputError(
                "the pipeline holds no tensors or arrays to share (is it an empty model, or are its weights "
                "held by something other than torch tensors, numpy or JAX arrays? A TorchScript module frozen "
                "with torch.jit.freeze keeps its weights in its code, where the small ones (under 4 KiB each) "
                "stay: so small a model has nothing to share)"
            )
        skeleton = f.getvalue()
        if self.own_notes:
            shown = "; ".join(f"{p!r} ({k} {why}: {n} bytes)" for p, k, why, n in self.own_notes[:5])
            more = len(self.own_notes) - 5
            _telemetry.log.warning(
                "%d module(s) write tensors of their own in place as they run, in eval mode too: %s%s. Each process "
                "that loads gets its own copy of those tensors (%d bytes in all), not the shared read-only one",
                len(self.own_notes), shown, f"; and {more} more" if more > 0 else "",
                sum(n for *_, n in self.own_notes),
            )
        if self.unshared:
            _telemetry.log.warning(
                "%d numpy array(s) of %s (%.1f MiB in all) travel pickled, a copy in each process that loads: "
                "safetensors cannot hold their dtype; convert them to one it holds to share them (complex128: "
                ".astype(np.complex64); float128: np.float64; ml_dtypes' int4 or float4: int8, float16)",
                len(self.unshared), ", ".join(sorted({str(a.dtype) for a in self.unshared})),
                sum(a.nbytes for a in self.unshared) / 2**20,
            )
        if len(skeleton) >= SKELETON_WARN_BYTES:
            _telemetry.log.warning(
                "besides its %d shared tensors, the pipeline pickles to %.1f MiB, which every process that loads "
                "it receives and unpickles, unshared: large data among what is not a tensor (an ndarray subclass "
                "such as np.matrix or a masked array, a list of numbers, a DataFrame) is copied into each process; "
                "hold it as numpy arrays or torch tensors to share it",
                len(self.inputs), len(skeleton) / 2**20,
            )
        return skeleton


def _children(obj):
    """``(name, child)`` for what ``obj`` holds: a module's submodules and
    public attributes (not its internal tables), else :func:`_skeleton.items`."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        yield from obj._modules.items()
        yield from ((k, v) for k, v in vars(obj).items() if not k.startswith("_"))
    else:
        yield from items(obj)


def _unpicklable(obj) -> tuple[str, object]:
    """The dotted path in ``obj`` of the deepest object that does not pickle
    (as sealing pickles it), and that object: what an error names."""

    def fails(o) -> bool:
        try:
            _Sealer(o)._dump(o, io.BytesIO())
        except RayZeroCopyError:
            return False
        except Exception:
            return True
        return False

    path, cur = [], obj
    for _ in range(64):
        for name, child in _children(cur):
            if not isinstance(child, (str, bytes, int, float, bool, type(None))) and fails(child):
                path.append(name)
                cur = child
                break
        else:
            break
    return (".".join(path) or "the pipeline itself"), cur

def kind_of(o, framework: str) -> str:
    """The kind of reference a tensor of ``framework`` becomes."""
    if framework == "torch":
        from . import _torch

        return _torch.kind_of(o)
    return NUMPY if framework == "numpy" else JAX


def plan_of(inputs, metadata=None) -> PackPlan:
    """The layout of a sealed buffer of ``inputs``: aligned, guarded, with
    room for its content digest (every sealed buffer's)."""
    return PackPlan(inputs, metadata, alignment=ALIGNMENT, guard_bytes=GUARD_BYTES, reserve_digest=True)


def packing_of(sealer: _Sealer, skeleton: bytes, label: str = "sealing", sources=None, metadata=None) -> Packing:
    """The packing of what ``sealer`` pickled into ``skeleton``: its inputs
    copied from where they are when filled. (The fill holds the inputs and
    the plan, not the sealer: an update's sealer holds the base's opened
    buffers.)"""
    inputs = sealer.inputs
    plan = plan_of(inputs, metadata)

    def fill(dst, progress):
        if progress.shows:
            _copy_inputs(plan, inputs, 0, progress)  # in groups, to show progress
        else:
            plan.write_sealing(dst, progress.sealer)  # one native call

    return Packing(
        skeleton=skeleton,
        kinds=tuple(sealer.kinds),
        needs_eval=bool(sealer.training_left),
        plan=plan,
        fill=fill,
        label=label,
        keep=sealer.keep,
        sources=sources,
        own=sealer.own_refs(),
        holds_modules=sealer.holds_modules,
    )


def pack_object(obj, metadata=None) -> Packing:
    """Pickles ``obj`` into a skeleton and plans the buffer of every
    tensor/array it reaches (copied from where they are when filled)."""
    sealer = _Sealer(obj)
    return packing_of(sealer, sealer.pickle(obj), metadata=metadata)


def _copy_inputs(plan: PackPlan, inputs, first: int, progress: _Progress) -> None:
    """Copies ``inputs`` (tensors ``first``, ``first + 1``, ... of ``plan``)
    from their addresses into the buffer through ``progress``."""
    progress.copy([(inp.address, plan.offset(i), inp.nbytes) for i, inp in enumerate(inputs, start=first)])


def seal(obj, metadata=None) -> tuple[Sealed, np.ndarray]:
    """Packs every tensor/array reachable from ``obj`` into a new buffer and
    pickles the rest: the description a wrapper carries, and the buffer."""
    return pack_object(obj, metadata).to_array()


class _Ref:
    """Stands for tensor ``index`` in a skeleton built without an object graph."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def pack_checkpoint(path, kind: str, model=None) -> Packing:
    """Plans a checkpoint on disk (see ``_checkpoint``) as ONE buffer, filled
    one shard at a time. Without ``model`` it loads as ``{name: tensor}`` of
    ``kind``; with ``model`` (an ``nn.Module``, or a function that makes one)
    it loads as that module, every parameter and buffer adopted from the
    checkpoint by its state-dict name."""
    ckpt = _checkpoint.read(path)
    if model is None:
        entries = list(ckpt.entries)

        class _Pickler(pickle.Pickler):
            def persistent_id(self, o):
                return o.index if isinstance(o, _Ref) else None

        f = io.BytesIO()
        _Pickler(f, protocol=5).dump({e.name: _Ref(i) for i, e in enumerate(entries)})
        skeleton, kinds, extras, needs_eval, keep, own = f.getvalue(), (kind,) * len(entries), [], False, None, ()
    else:
        from . import _torch_seal

        entries, model, preset, preset_kinds = _torch_seal.checkpoint_model(ckpt, model)
        sealer = _Sealer(model, preset=preset, inputs=entries, kinds=preset_kinds)
        skeleton = sealer.pickle(model)
        kinds, extras, needs_eval = sealer.kinds, sealer.inputs[len(entries) :], bool(sealer.training_left)
        keep, own = sealer.keep, sealer.own_refs()
    inputs = [PackInput(e.name, DTYPE_CODES[e.dtype], e.shape, 0, e.nbytes) for e in entries] + extras
    plan = plan_of(inputs, ckpt.metadata)
    offsets = [plan.offset(i) for i in range(len(inputs))]

    def fill(dst, progress):
        _checkpoint.copy_into(ckpt, entries, offsets, progress.read)
        _copy_inputs(plan, extras, len(entries), progress)

    return Packing(
        skeleton=skeleton,
        kinds=tuple(kinds),
        needs_eval=needs_eval,
        plan=plan,
        fill=fill,
        label="sealing checkpoint",
        keep=keep,
        own=own,
        holds_modules=model is not None,
    )


def seal_checkpoint(path, kind: str, model=None) -> tuple[Sealed, np.ndarray]:
    """:func:`pack_checkpoint` into a new array, and its description."""
    return pack_checkpoint(path, kind, model).to_array()
