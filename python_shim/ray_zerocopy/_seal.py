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

import io
import pickle
import sys
from dataclasses import dataclass

from .errors import RzcError
from .weights import PackInput, Weights, pack

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
    header_digest: bytes  # Weights.header_digest() of the sealed buffer
    needs_eval: bool = False  # some module was pickled in training mode: switch after loading


def _sealed(skeleton: bytes, kinds, buffer, needs_eval: bool = False) -> Sealed:
    with Weights.from_buffer(buffer) as w:
        if len(w) != len(kinds):
            raise AssertionError(f"packed {len(w)} tensors for {len(kinds)} references")
        digest = w.header_digest()
    return Sealed(skeleton, tuple(kinds), referenced_modules(skeleton), int(buffer.nbytes), digest, needs_eval)


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
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins":
        items = list(vars(obj).items())
    else:
        return
    for k, v in items:
        yield from walk(v, is_leaf, f"{prefix}{k}.", seen, depth + 1)


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


def seal(obj, metadata=None) -> tuple[Sealed, "np.ndarray"]:
    """Packs every tensor/array reachable from ``obj`` and pickles the rest:
    the description a wrapper carries, and the buffer to put in the store."""
    adapters = _adapters()
    known = _names(obj, adapters)
    refs: dict[int, int] = {}  # id(tensor) -> index
    inputs: list[PackInput] = []
    kinds: list[str] = []
    keep: list[object] = []  # originals and contiguous copies, alive until packed
    used_names: set[str] = set()

    def persistent_id(o):
        i = refs.get(id(o))
        if i is not None:
            return (i, kinds[i])
        for fw, adapter in adapters:
            if adapter.accepts(o):
                break
        else:
            return None
        name = known.get(id(o)) or f"tensor.{len(inputs)}"
        while name in used_names:
            name += "_"
        used_names.add(name)
        inp, alive = adapter.pack_input(o, name)
        if fw == "torch":
            import torch

            kind = TORCH_PARAM if isinstance(o, torch.nn.Parameter) else TORCH
        else:
            kind = NUMPY if fw == "numpy" else JAX
        refs[id(o)] = len(inputs)
        inputs.append(inp)
        kinds.append(kind)
        keep.extend((o, alive))
        return (len(inputs) - 1, kind)

    torch = sys.modules.get("torch")
    training_left = []  # modules pickled in training mode that we could not switch

    class _Pickler(_base_pickler()):
        def persistent_id(self, o):
            return persistent_id(o)

        def reducer_override(self, o):
            # Modules are pickled in eval mode, as load() returns them: the
            # loaded pipeline needs no walk over its modules to switch them,
            # and the caller's own modules stay as they are.
            if torch is not None and isinstance(o, torch.nn.Module) and o.training:
                rv = o.__reduce_ex__(self.proto)
                if isinstance(rv, tuple) and len(rv) >= 3 and isinstance(rv[2], dict) and "training" in rv[2]:
                    return (*rv[:2], {**rv[2], "training": False}, *rv[3:])
                training_left.append(o)
            base = getattr(super(), "reducer_override", None)
            return base(o) if base is not None else NotImplemented

    f = io.BytesIO()
    try:
        _Pickler(f, protocol=5).dump(obj)
    except RzcError:
        raise  # a tensor we cannot take: its own message says which and why
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(
            f"the pipeline cannot be pickled ({e}); everything besides tensors must be "
            "picklable by cloudpickle, as for any object Ray sends to an actor"
        ) from e
    if not inputs:
        raise ValueError(
            "the pipeline holds no tensors or arrays to share (is it an empty model, or are its weights "
            "held by something other than torch tensors, numpy or JAX arrays?)"
        )
    buffer = pack(inputs, metadata, alignment=ALIGNMENT, guard_bytes=GUARD_BYTES)
    return _sealed(f.getvalue(), kinds, buffer, needs_eval=bool(training_left)), buffer


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


def seal_file(path, kind: str) -> tuple[Sealed, "np.ndarray"]:
    """Re-packs a safetensors file (256-byte aligned, guard pages) and makes a
    skeleton that loads as ``{name: tensor}``."""
    src = Weights.open_file(path)
    infos = src.table()
    from ._native import DTYPE_CODES

    inputs = [PackInput(i.name, DTYPE_CODES[i.dtype], i.shape, src.address + i.offset, i.nbytes) for i in infos]
    if not inputs:
        raise ValueError(f"{path} holds no tensors")
    buffer = pack(inputs, src.metadata, alignment=ALIGNMENT, guard_bytes=GUARD_BYTES)
    src.close()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return (o.index, kind) if isinstance(o, _Ref) else None

    f = io.BytesIO()
    _Pickler(f, protocol=5).dump({info.name: _Ref(i) for i, info in enumerate(infos)})
    return _sealed(f.getvalue(), (kind,) * len(inputs), buffer), buffer
