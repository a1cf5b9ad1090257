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

import copyreg
import io
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import _checkpoint, _telemetry
from .errors import RzcError, UnsupportedDtypeError
from .pack import PackInput, PackPlan, Sealer, view_at
from .weights import Weights

# Bytes of non-tensor data before the first and after the last tensor: one
# page each, so the write guard can protect every page holding weights
# without touching memory outside the buffer.
GUARD_BYTES = 4096
# Every tensor starts at a multiple of 256 bytes: JAX adopts 64-byte aligned
# host memory without copying, and with tensors 256 bytes apart the device
# layout (256-byte aligned, for cuBLAS) is the host layout, so an upload is
# one contiguous copy. It costs at most 255 bytes of padding per tensor.
ALIGNMENT = 256

TORCH, TORCH_PARAM, NUMPY, JAX = "torch", "torch.param", "numpy", "jax"
FRAMEWORK_OF = {TORCH: "torch", TORCH_PARAM: "torch", NUMPY: "numpy", JAX: "jax"}


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
    digest_seconds: float = 0.0  # what computing the digest cost while sealing


@dataclass
class Packing:
    """A pickled skeleton and how to write the buffer it refers to: a
    buffer of ``nbytes`` bytes laid out by ``plan``, whose tensors
    ``fill(dst, progress)`` copies in, calling ``progress.done(i)`` after
    tensor ``i`` (or writing them all through ``progress.sealer``), wherever
    ``dst`` lives (straight into Ray's object store, see ``_store``, or a
    new array: :meth:`to_array`)."""

    skeleton: bytes
    kinds: tuple
    needs_eval: bool
    plan: PackPlan
    fill: object  # fill(dst: np.ndarray, progress: _Progress) -> None
    label: str = "sealing"  # the progress bar's
    keep: object = None  # what the fill reads, alive until it has run

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
            started = time.perf_counter()
            digest = sealer.finish()
            waited = time.perf_counter() - started
        with Weights.from_buffer(dst) as w:
            if len(w) != len(self.kinds):
                raise AssertionError(f"packed {len(w)} tensors for {len(self.kinds)} references")
        modules = referenced_modules(self.skeleton)
        return Sealed(self.skeleton, tuple(self.kinds), modules, int(dst.nbytes), digest, self.needs_eval, waited)

    def to_array(self) -> tuple[Sealed, "np.ndarray"]:
        """The buffer as a new array (no Ray needed), and its description."""
        buffer = np.empty(self.nbytes, dtype=np.uint8)
        return self.write(buffer), buffer


class _Progress:
    """What the fill reports as tensors land, in whatever order: the
    progress bar advances, and the sealer learns how far the buffer is final
    (up to the first tensor not yet copied; the layout is written first)."""

    def __init__(self, plan: PackPlan, sealer: Sealer, bar):
        self.plan, self.sealer, self.bar = plan, sealer, bar
        self._done = bytearray(len(plan))
        self._next = 0

    def done(self, i: int) -> None:
        self._done[i] = 1
        self.bar.update(self.plan.size(i))
        if i != self._next:
            return
        while self._next < len(self._done) and self._done[self._next]:
            self._next += 1
        self.sealer.advance(self.plan.offset(self._next) if self._next < len(self._done) else self.plan.nbytes)


def _adapters():
    """The framework adapters whose frameworks are already imported: a
    framework the caller does not use is never imported."""
    out = []
    if "torch" in sys.modules:
        from . import _torch

        out.append(("torch", _torch))
    if "jax" in sys.modules:
        from . import _jax

        out.append(("jax", _jax))
    from . import _numpy

    out.append(("numpy", _numpy))
    return out


def walk(obj, is_leaf, prefix: str = "", seen=None, depth: int = 0):
    """Yields ``(path, leaf)`` for every object reachable from ``obj``
    through attributes, lists, tuples and dicts for which ``is_leaf`` holds
    (without descending into leaves). Paths are dotted: ``encoder.layers.0``."""
    if seen is None:
        seen = set()
    if depth > 64 or isinstance(obj, (str, bytes, int, float, bool, type(None))) or id(obj) in seen:
        return
    seen.add(id(obj))
    if is_leaf(obj):
        yield prefix.rstrip("."), obj
        return
    for k, v in _items(obj):
        yield from walk(v, is_leaf, f"{prefix}{k}.", seen, depth + 1)


def _items(obj) -> list:
    """``(name, child)`` for what a dict, list, tuple or plain object holds
    (by key, index or attribute); nothing for anything else."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins":
        return list(vars(obj).items())
    return []


def walk_modules(obj):
    """Yields ``(path, module)`` for every torch module reachable from
    ``obj`` (not descending into modules, which own their children)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return iter(())
    return walk(obj, lambda o: isinstance(o, torch.nn.Module))


def _names(obj, adapters) -> dict[int, str]:
    """id(tensor) -> a readable name: the state-dict path for tensors of
    modules, the attribute/key path for other tensors and arrays."""
    torch = sys.modules.get("torch")

    def is_leaf(o):
        return (torch is not None and isinstance(o, torch.nn.Module)) or any(a.accepts(o) for _, a in adapters)

    names = {}
    for path, leaf in walk(obj, is_leaf):
        if torch is not None and isinstance(leaf, torch.nn.Module):
            from . import _torch

            for name, t in _torch.named_tensors(leaf, path):
                names.setdefault(id(t), name)
        else:
            names.setdefault(id(leaf), path or "tensor")
    return names


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


class _Sealer:
    """Pickles an object into a skeleton, turning every tensor or array it
    reaches into a reference (pickle's ``persistent_id``) to an entry of the
    buffer to be packed: reference ``i`` is ``inputs[i]``. ``preset`` maps
    tensors (by ``id``) to entries decided beforehand, e.g. a checkpoint's."""

    def __init__(self, obj, preset: dict | None = None, inputs=(), kinds=()):
        self.adapters = _adapters()
        self.known = _names(obj, self.adapters)
        self.refs: dict[int, int] = dict(preset or {})  # id(tensor) -> index
        self.inputs: list = list(inputs)
        self.kinds: list[str] = list(kinds)
        self.keep: list[object] = []  # originals and contiguous copies, alive until packed
        self.used_names: set[str] = {getattr(i, "name", "") for i in self.inputs}
        self.training_left: list[object] = []  # modules pickled in training mode that we could not switch
        self.obj = obj
        self._module_paths: dict | None = None

    def module_path(self, module) -> str:
        """The dotted path of ``module`` in the object being sealed."""
        if self._module_paths is None:
            self._module_paths = {}
            for path, top in walk_modules(self.obj):
                for name, m in top.named_modules(prefix=path):
                    self._module_paths.setdefault(id(m), name or "the pipeline itself")
        return self._module_paths.get(id(module), type(module).__name__)

    def persistent_id(self, o):
        i = self.refs.get(id(o))
        if i is not None:
            return (i, self.kinds[i])
        for fw, adapter in self.adapters:
            if adapter.accepts(o):
                break
        else:
            return None
        name = self.known.get(id(o)) or f"tensor.{len(self.inputs)}"
        while name in self.used_names:
            name += "_"
        self.used_names.add(name)
        inp, alive = adapter.pack_input(o, name)
        self.refs[id(o)] = len(self.inputs)
        self.inputs.append(inp)
        self.kinds.append(kind_of(o, fw))
        self.keep.extend((o, alive))
        return (len(self.inputs) - 1, self.kinds[-1])

    def _dump(self, obj, f) -> None:
        sealer = self
        torch = sys.modules.get("torch")

        class _Pickler(_base_pickler()):
            def persistent_id(self, o):
                return sealer.persistent_id(o)

            def reducer_override(self, o):
                # TorchScript modules and exported programs do not pickle (or
                # come back broken): their code travels without weights, and
                # their tensors become references like any other.
                program = _program_reducer(o) if torch is not None else None
                if program is not None:
                    rebuild, (blob, tensors) = program(o)
                    for name, t in tensors.items():
                        sealer.known.setdefault(id(t), name)
                    return rebuild, (blob, tensors)
                # Modules are pickled in eval mode, as load() returns them: the
                # loaded pipeline needs no walk over its modules to switch them,
                # and the caller's own modules stay as they are.
                if torch is not None and isinstance(o, torch.Tensor):
                    from . import _torch

                    if _torch.is_wrapper_subclass(o):
                        # Quantized weights (torchao) and other tensors made of
                        # inner tensors: the inner tensors are shared, the
                        # subclass is rebuilt around them on load.
                        inner, ctx = _torch.flatten(o)
                        outer = sealer.known.get(id(o), f"tensor.{len(sealer.inputs)}")
                        for attr, t in inner.items():
                            sealer.known.setdefault(id(t), f"{outer}.{attr}")
                        param = isinstance(o, torch.nn.Parameter)
                        return _torch.unflatten, (type(o), inner, ctx, tuple(o.shape), tuple(o.stride()), param)
                if torch is not None and isinstance(o, torch.nn.Module):
                    from . import _torch

                    if _torch.packed_quantized(o):
                        where = sealer.module_path(o)
                        raise UnsupportedDtypeError(
                            "RZC_UNSUPPORTED_DTYPE",
                            f"module {where!r} ({type(o).__module__}.{type(o).__qualname__}) keeps its weights "
                            "quantized and packed (torch.ao.quantization.quantize_dynamic or static quantization): "
                            "packed weights cannot be shared. Wrap the float model and quantize in each actor after "
                            "load() (torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, "
                            "dtype=torch.qint8, inplace=True): each actor then holds its own packed copy), or "
                            "quantize with torchao (torchao.quantization.quantize_(model, Int8WeightOnlyConfig())), "
                            "whose quantized weights are shared zero-copy",
                        )
                    if _parametrized(o):
                        # weight_norm, spectral_norm, orthogonal, ...: torch
                        # refuses to pickle them (their class is made per
                        # module); the module travels as its original class
                        # with its state, the parametrization is put back on
                        # load, and the `original*` tensors are shared.
                        state = dict(o.__dict__, training=False)
                        base = torch.nn.utils.parametrize.type_before_parametrizations(o)
                        return _new_object, (base,), state, None, None, _set_parametrized_state
                    if _plain_module(type(o)):
                        # Their state is their __dict__: set it back directly,
                        # without Module.__setstate__'s checks for old
                        # checkpoints' missing attributes (a load unpickles
                        # hundreds of modules; this is a third of the time).
                        state = o.__getstate__()
                        state["training"] = False
                        return copyreg.__newobj__, (type(o),), state, None, None, _set_module_state
                    if o.training:
                        rv = o.__reduce_ex__(self.proto)
                        if isinstance(rv, tuple) and len(rv) >= 3 and isinstance(rv[2], dict) and "training" in rv[2]:
                            return (*rv[:2], {**rv[2], "training": False}, *rv[3:])
                        sealer.training_left.append(o)
                base = getattr(super(), "reducer_override", None)
                return base(o) if base is not None else NotImplemented

        _Pickler(f, protocol=5).dump(obj)

    def pickle(self, obj) -> bytes:
        f = io.BytesIO()
        try:
            self._dump(obj, f)
        except RzcError:
            raise  # a tensor we cannot take: its own message says which and why
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as e:
            path, culprit = _unpicklable(obj)
            raise TypeError(
                f"the pipeline cannot be pickled: {path} (a {type(culprit).__module__}.{type(culprit).__qualname__}) "
                f"does not pickle ({e}). Everything besides tensors must be picklable by cloudpickle, as for any "
                "object Ray sends to an actor: leave it out of what you wrap (build it in the actor instead), "
                "or make it picklable (__reduce__, or __getstate__/__setstate__)"
            ) from e
        if not self.inputs:
            raise ValueError(
                "the pipeline holds no tensors or arrays to share (is it an empty model, or are its weights "
                "held by something other than torch tensors, numpy or JAX arrays?)"
            )
        return f.getvalue()


def _parametrized(module) -> bool:
    """Whether ``module`` carries parametrizations (its class is the one
    ``torch.nn.utils.parametrize`` made for it)."""
    import torch

    return torch.nn.utils.parametrize.is_parametrized(module) and type(module) is not (
        torch.nn.utils.parametrize.type_before_parametrizations(module)
    )


def _new_object(cls):
    """An instance of ``cls`` made without ``__init__`` (``copyreg.__newobj__``
    insists the class be the object's own; a parametrized module's is not
    the one it is rebuilt from)."""
    return cls.__new__(cls)


def _set_parametrized_state(obj, state) -> None:
    """Sets a parametrized module's state (its ``parametrizations`` hold the
    shared ``original*`` tensors), then gives it back the class and the
    properties ``register_parametrization`` gave it, without recomputing
    anything from the originals."""
    from torch.nn.utils import parametrize

    obj.__dict__.update(state)
    parametrize._inject_new_class(obj)
    for name in obj.parametrizations.keys():
        parametrize._inject_property(obj, name)


def _children(obj):
    """``(name, child)`` for what ``obj`` holds: a module's submodules and
    public attributes (not its internal tables), else :func:`_items`."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        yield from obj._modules.items()
        yield from ((k, v) for k, v in vars(obj).items() if not k.startswith("_"))
    else:
        yield from _items(obj)


def _unpicklable(obj) -> tuple[str, object]:
    """The dotted path in ``obj`` of the deepest object that does not pickle
    (as sealing pickles it), and that object: what an error names."""

    def fails(o) -> bool:
        try:
            _Sealer(o)._dump(o, io.BytesIO())
        except RzcError:
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


_plain: dict = {}


def _plain_module(cls) -> bool:
    """Whether ``cls`` pickles as an ``nn.Module`` does by default: its state
    is (a copy of) its ``__dict__`` and ``Module.__setstate__`` sets it back."""
    known = _plain.get(cls)
    if known is None:
        import torch

        known = _plain[cls] = (
            cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", None) is torch.nn.Module.__getstate__
            and cls.__setstate__ is torch.nn.Module.__setstate__
            and not hasattr(cls, "__slots__")
        )
    return known


def _set_module_state(obj, state) -> None:
    """Sets the state of a module pickled by :func:`_plain_module`'s rule (a
    complete ``__dict__``, so ``Module.__setstate__`` would add nothing)."""
    obj.__dict__.update(state)


def _program_reducer(o):
    """The reducer of a TorchScript module or an exported program, else None."""
    import torch

    if isinstance(o, torch.jit.ScriptModule):
        from . import _script

        return _script.reduce
    export = getattr(torch, "export", None)
    if export is not None and isinstance(o, export.ExportedProgram):
        from . import _exported

        return _exported.reduce
    return None


def kind_of(o, framework: str) -> str:
    """The kind of reference a tensor of ``framework`` becomes."""
    if framework == "torch":
        import torch

        return TORCH_PARAM if isinstance(o, torch.nn.Parameter) else TORCH
    return NUMPY if framework == "numpy" else JAX


def pack_object(obj, metadata=None) -> Packing:
    """Pickles ``obj`` into a skeleton and plans the buffer of every
    tensor/array it reaches (copied from where they are when filled)."""
    sealer = _Sealer(obj)
    skeleton = sealer.pickle(obj)
    inputs = sealer.inputs
    plan = PackPlan(inputs, metadata, alignment=ALIGNMENT, guard_bytes=GUARD_BYTES, reserve_digest=True)

    def fill(dst, progress):
        if isinstance(progress.bar, _telemetry._NoProgress):
            plan.write_sealing(dst, progress.sealer)  # one native call
        else:
            _copy_inputs(dst, plan, inputs, 0, progress)  # tensor by tensor, to show progress

    return Packing(skeleton, tuple(sealer.kinds), bool(sealer.training_left), plan, fill, keep=sealer.keep)


def _copy_inputs(dst, plan: PackPlan, inputs, first: int, progress: "_Progress") -> None:
    """Copies ``inputs`` (tensors ``first``, ``first + 1``, ... of ``plan``)
    from their addresses into ``dst``, reporting each to ``progress``."""
    for i, inp in enumerate(inputs, start=first):
        at = plan.offset(i)
        dst[at : at + inp.nbytes] = view_at(inp.address, inp.nbytes)
        progress.done(i)


def seal(obj, metadata=None) -> tuple[Sealed, "np.ndarray"]:
    """Packs every tensor/array reachable from ``obj`` into a new buffer and
    pickles the rest: the description a wrapper carries, and the buffer."""
    return pack_object(obj, metadata).to_array()


def referenced_modules(skeleton: bytes) -> tuple:
    """Names of the modules whose classes or functions ``skeleton`` refers to."""
    import pickletools

    names, strings = set(), []
    for op, arg, _ in pickletools.genops(skeleton):
        if op.name in ("GLOBAL", "INST"):
            names.add(arg.split(" ")[0])
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.add(strings[-2])
        if isinstance(arg, str):
            strings.append(arg)
    return tuple(sorted(n for n in names if n != "__main__"))


def import_modules(names, kinds) -> None:
    """Imports ``names`` and the adapters ``kinds`` need; a module that does
    not import here is left for unpickling to report."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    if TORCH in kinds or TORCH_PARAM in kinds:
        from . import _torch  # noqa: F401


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
    from ._native import DTYPE_CODES

    ckpt = _checkpoint.read(path)
    if model is None:
        entries = list(ckpt.entries)

        class _Pickler(pickle.Pickler):
            def persistent_id(self, o):
                return (o.index, kind) if isinstance(o, _Ref) else None

        f = io.BytesIO()
        _Pickler(f, protocol=5).dump({e.name: _Ref(i) for i, e in enumerate(entries)})
        skeleton, kinds, extras, needs_eval, keep = f.getvalue(), (kind,) * len(entries), [], False, None
    else:
        entries, sealer, model = _fill_model(ckpt, model)
        skeleton = sealer.pickle(model)
        kinds, extras, needs_eval = sealer.kinds, sealer.inputs[len(entries) :], bool(sealer.training_left)
        keep = sealer.keep
    inputs = [PackInput(e.name, DTYPE_CODES[e.dtype], e.shape, 0, e.nbytes) for e in entries] + extras
    plan = PackPlan(inputs, ckpt.metadata, alignment=ALIGNMENT, guard_bytes=GUARD_BYTES, reserve_digest=True)
    offsets = [plan.offset(i) for i in range(len(inputs))]

    def fill(dst, progress):
        _checkpoint.copy_into(dst, entries, offsets, progress.done)
        _copy_inputs(dst, plan, extras, len(entries), progress)

    return Packing(skeleton, tuple(kinds), needs_eval, plan, fill, "sealing checkpoint", keep)


def seal_checkpoint(path, kind: str, model=None) -> tuple[Sealed, "np.ndarray"]:
    """:func:`pack_checkpoint` into a new array, and its description."""
    return pack_checkpoint(path, kind, model).to_array()


def _fill_model(ckpt, model):
    """The checkpoint entries ``model`` takes (in the checkpoint's order) and
    a sealer whose references point at them: each parameter and persistent
    buffer by its state-dict name (a tied tensor under any of its names),
    checked for shape and dtype; other tensors of the model (non-persistent
    buffers) are sealed as the model has them."""
    import torch

    from ._native import DTYPE_NAMES
    from ._torch import FROM_TORCH

    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a function that makes one, not {type(model).__name__}")
        model = model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the model function returned {type(model).__name__}, not an nn.Module")
    by_name = {e.name: i for i, e in enumerate(ckpt.entries)}
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    names: dict[int, list[str]] = {}
    tensors: dict[int, object] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
        tensors[id(t)] = t
    chosen: dict[int, int] = {}  # id(tensor) -> index into ckpt.entries
    for tid, ns in names.items():
        if tid not in persistent:
            continue  # a non-persistent buffer: sealed as the model has it
        hit = next((n for n in ns if n in by_name), None)
        if hit is None:
            raise ValueError(
                f"the checkpoint lacks tensor {ns[0]!r}, which the model needs"
                + (f" (also named {', '.join(map(repr, ns[1:]))})" if len(ns) > 1 else "")
            )
        e, t = ckpt.entries[by_name[hit]], tensors[tid]
        dtype = DTYPE_NAMES.get(FROM_TORCH.get(t.dtype))
        if tuple(t.shape) != tuple(e.shape) or dtype != e.dtype:
            raise ValueError(
                f"tensor {hit!r}: the checkpoint has {e.dtype} {list(e.shape)}, the model {dtype or t.dtype} {list(t.shape)}"
            )
        chosen[tid] = by_name[hit]
    order = sorted(set(chosen.values()))
    index_of = {ci: k for k, ci in enumerate(order)}
    entries = [ckpt.entries[ci] for ci in order]
    preset = {tid: index_of[ci] for tid, ci in chosen.items()}
    kinds = [None] * len(entries)
    for tid, ci in chosen.items():
        kinds[index_of[ci]] = kind_of(tensors[tid], "torch")
    return entries, _Sealer(model, preset=preset, inputs=entries, kinds=kinds), model
