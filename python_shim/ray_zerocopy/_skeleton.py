"""The skeleton: the object graph of a sealed pipeline without its tensors,
pickled with every tensor replaced by a reference (pickle's
``persistent_id``): its index, a plain int. Each reference's *kind*, which
says which framework it comes back as, travels beside the skeleton
(``Sealed.kinds``).

Sealing (``_seal``) writes skeletons; this module holds what reads them
back: the modules a skeleton's classes live in, imported when a wrapper
arrives in a process, and :func:`rebuild`, which unpickles it with each
reference resolved to its tensor. The walk over an object graph serves both.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import sys

__all__ = [
    "TORCH",
    "TORCH_PARAM",
    "NUMPY",
    "JAX",
    "FRAMEWORK_OF",
    "FRAMEWORKS",
    "KIND_OF_FRAMEWORK",
    "adapter",
    "imported_adapters",
    "walk",
    "items",
    "walk_modules",
    "referenced_modules",
    "import_modules",
    "rebuild",
]

# The kinds of reference, and the framework each comes back as. Every rule
# that names the frameworks is here: a new framework is added in this block
# (and in an adapter module of its own: pack_input, adopt, accepts, ...).
TORCH, TORCH_PARAM, NUMPY, JAX = "torch", "torch.param", "numpy", "jax"
FRAMEWORK_OF = {TORCH: "torch", TORCH_PARAM: "torch", NUMPY: "numpy", JAX: "jax"}
FRAMEWORKS = ("torch", "numpy", "jax")
#: The kind a tensor of each framework is sealed as (a torch tensor may be
#: a parameter: see ``_torch.kind_of``).
KIND_OF_FRAMEWORK = {"torch": TORCH, "numpy": NUMPY, "jax": JAX}


def adapter(framework: str):
    """The adapter module of ``framework`` (imported on first use)."""
    if framework == "torch":
        from . import _torch as module
    elif framework == "jax":
        from . import _jax as module
    else:
        from . import _numpy as module
    return module


def imported_adapters() -> list:
    """``[(framework, adapter)]`` of the frameworks already imported, numpy
    last (it takes only what the others do not): a framework the caller
    does not use is never imported."""
    return [(fw, adapter(fw)) for fw in ("torch", "jax") if fw in sys.modules] + [("numpy", adapter("numpy"))]


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
    for k, v in items(obj):
        yield from walk(v, is_leaf, f"{prefix}{k}.", seen, depth + 1)


def items(obj) -> list:
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


def referenced_modules(skeleton: bytes) -> tuple:
    """Names of the modules whose classes or functions ``skeleton`` refers to."""
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
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    if TORCH in kinds or TORCH_PARAM in kinds:
        from . import _torch  # noqa: F401


def rebuild(skeleton: bytes, objects: list, needs_eval: bool = True) -> object:
    """Unpickles ``skeleton`` with reference ``i`` resolved to ``objects[i]``.
    Sealing pickles modules in eval mode; ``needs_eval``: some module could
    not be (a ``train()`` of its own), and the skeleton's second pickle lists
    each such module (see ``_Sealer._dump``): each is switched with
    ``eval()``. Where it lists none (``None``: one was not in the memo), the
    result is walked and every module found switched."""
    stream = io.BytesIO(skeleton)
    unpickler = pickle.Unpickler(stream)
    # A reference is an index: the list's own __getitem__ resolves it, with
    # no Python call per tensor.
    unpickler.persistent_load = objects.__getitem__
    obj = unpickler.load()
    if needs_eval:
        left = unpickler.load() if stream.tell() < len(skeleton) else None
        if left is not None:
            # In pickling order, a parent before its submodules: one its
            # parent's eval() already switched is not switched again (its
            # train() may not repeat cleanly), one it did not reach is.
            for module in left:
                if module.training:
                    module.eval()
        else:
            for _, module in walk_modules(obj):
                if any(m.training for m in module.modules()):
                    module.eval()
    return obj
