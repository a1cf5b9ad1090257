"""Sealing torch objects: what modules, tensor subclasses, views and
programs pickle as (``reduce``, the sealer's torch reducer), the tensors
they share memory with or write as they run, and the model a checkpoint is
filled into. The functions a skeleton calls when loaded (``view_of``,
``relaid``, ``unflatten``, ...) are the adapter's, in ``_torch``, which
every loading process imports; this module, only a sealing one."""

from __future__ import annotations

import copyreg
import gc
import sys
from collections import OrderedDict

import torch

from ._checkpoint import same_values
from ._native import DTYPE_NAMES
from ._seal import TensorData
from ._skeleton import TORCH_PARAM
from ._torch import (
    _PLAIN,
    FROM_TORCH,
    _module_state_setter,
    _new_object,
    _set_module_state,
    _set_parametrized_state,
    broadcast_shape,
    compact,
    flatten,
    has_extras,
    is_wrapper_subclass,
    kind_of,
    permutation,
    relaid,
    unflatten,
    view_of,
    with_extras,
)
from .errors import InvalidInputError, InvalidTypeError, UnshareableTensorError, listed


def packed_quantized(module) -> bool:
    """Whether ``module`` keeps its weights in packed quantized parameters
    (``torch.ao.quantization.quantize_dynamic``, static quantization)."""
    return type(module).__module__.startswith("torch.ao.nn.quantized") and hasattr(module, "_packed_params")


def named_tensors(module, prefix: str):
    """(name, tensor) of a module's parameters and every buffer (persistent or
    not), then of the plain tensors its modules hold as attributes
    (``self.w = lin.weight.data``, ``lin.weight.t()``), each tensor once.
    The attributes come last: where one shares memory with a parameter it
    is sealed as a view of it (``views``), not as a copy of its own."""
    for name, p in module.named_parameters(prefix=prefix, remove_duplicate=True):
        yield name, p
    for name, b in module.named_buffers(prefix=prefix, remove_duplicate=True):
        yield name, b
    for path, m in module.named_modules(prefix=prefix):
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                yield (f"{path}.{k}" if path else k), v


def reduce(o, sealer, proto: int):
    """What the sealer pickles torch object ``o`` as (a reduce tuple), or
    ``None`` for pickle's own way. ``sealer`` names tensors (``known``,
    ``inputs``), finds a module's path, and collects the modules left in
    training mode (``training_left``)."""
    if type(o) is OrderedDict:
        return _reduce_ordered_dict(o)
    if o is _set_module_state:
        return _module_state_setter, ()
    program = program_reducer(o)
    if program is not None:
        sealer.holds_modules = True
        # TorchScript modules and exported programs do not pickle (or come
        # back broken): their code travels without weights, and their tensors
        # become references like any other.
        rebuild, (blob, tensors), written = program(o)
        for name, t in tensors.items():
            sealer.known.setdefault(id(t), name)
        if written:
            # What running it writes in place (an exported max_norm
            # embedding's weight): a copy per loading process, as for the
            # module itself.
            key_of = {id(t): k for k, t in tensors.items()}
            names = ", ".join(key_of.get(id(t), "?") for t in written)
            sealer.own_written("the program", type(o).__name__, f"writes {names} in place", written)
        return rebuild, (blob, tensors)
    if isinstance(o, torch.Tensor):
        view = sealer.views.get(id(o))
        if view is not None:
            base, offset = view
            v = sealer.value_of(o)  # its shape and strides: an update's new value's, where it has one
            return view_of, (TensorData(base), tuple(v.shape), tuple(v.stride()), offset, kind_of(o) == TORCH_PARAM)
        if is_wrapper_subclass(o):
            return reduce_wrapper_subclass(o, sealer)
        if has_extras(o):
            return with_extras, (TensorData(o), type(o), dict(o.__dict__))
        value = sealer.value_of(o)  # an update's new value stands in for o (its layout is the value's)
        shape = broadcast_shape(value)
        if shape is not None:
            value = compact(value)  # its broadcast dimensions sealed once, not once per repeat
        order = permutation(value)
        if order is not None or shape is not None:
            # Sealed in the order its bytes lie in (no copy to make it
            # contiguous), and permuted back (and broadcast again) when loaded.
            back = None if order is None else tuple(sorted(range(len(order)), key=order.__getitem__))
            inner = value if order is None else value.permute(order)
            if id(o) in sealer.known:
                sealer.known[id(inner)] = sealer.known[id(o)]  # the entry keeps the tensor's name
            sealer.keep.append(inner)  # its id stays its own until packed
            return relaid, (TensorData(inner), back, shape, kind_of(o) == TORCH_PARAM)
        return None
    if isinstance(o, torch.nn.Module):
        sealer.holds_modules = True
        return _reduce_module(o, sealer, proto)
    return None


def views(tensors) -> dict:
    """``{id(t): (base, offset)}`` for each tensor of ``tensors`` (distinct
    objects) whose memory lies inside another's: ``base`` is a contiguous
    tensor of the same dtype on the same storage that holds it (and is no
    view itself), ``offset`` where ``t`` starts in it, in elements. Such a tensor is sealed
    as a view of its base (:func:`view_of`), not as bytes of its own: tied
    weights that are two objects (a state dict's), a transposed or sliced
    view kept beside its base. Plain CPU tensors only, with strides that do
    not run backwards; any other is sealed on its own, as before."""
    by_storage: dict = {}
    plain, strided = _PLAIN, torch.strided
    for t in tensors:
        if type(t) in plain and t.is_cpu and t.layout == strided:
            # Where its storage starts (untyped_storage() makes an object per
            # tensor: 5 us each, 0.1 s for a model of 20,000 tensors).
            by_storage.setdefault(t.data_ptr() - t.storage_offset() * t.element_size(), []).append(t)
    out = {}
    for members in by_storage.values():
        if len(members) < 2:
            continue
        members = [
            t
            for t in members
            if t.numel() > 0
            and not t.__dict__
            and not t.is_conj()
            and not t.is_neg()
            and not t.is_quantized
            and min(t.stride(), default=0) >= 0
        ]
        # In order of where they start (the longer first where two start
        # together, and of two alike the contiguous one first: a transposed
        # view spans what its base spans): a tensor lies inside some
        # earlier base exactly when it lies inside the one of its dtype
        # that reaches furthest, so one sweep finds every view (many
        # tensors on one storage, as in a model loaded with use_fast_load,
        # cost n log n, not n squared).
        spans = []  # (start, -end, 0 if contiguous else 1, k): numbers only, sorted without a key function
        for k, t in enumerate(members):
            start = t.data_ptr()
            end = start + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * t.element_size()
            spans.append((start, -end, 0 if t.is_contiguous() else 1, k))
        spans.sort()
        furthest: dict = {}  # dtype -> (base, start, end) of the base reaching furthest
        for start, neg_end, _, k in spans:
            t, end = members[k], -neg_end
            b = furthest.get(t.dtype)
            if b is not None and end <= b[2]:
                out[id(t)] = (b[0], (start - b[1]) // t.element_size())
            elif t.is_contiguous() and (b is None or end > b[2]):
                furthest[t.dtype] = (t, start, end)
    return out


def reduce_wrapper_subclass(t, sealer, slot=None):
    """Quantized weights (torchao) and other tensors made of inner tensors:
    the inner tensors are shared, the subclass is rebuilt around them on load.
    ``slot``: the tensor ``t`` stands in for (an update's new value for it),
    whose name its inner tensors take and which says whether it is a
    parameter; ``t`` itself by default."""
    slot = t if slot is None else slot
    inner, ctx = flatten(t)
    outer = sealer.known.get(id(slot), f"tensor.{len(sealer.inputs)}")
    for attr, x in inner.items():
        sealer.known.setdefault(id(x), f"{outer}.{attr}")
    param = isinstance(slot, torch.nn.Parameter)
    return unflatten, (type(t), inner, ctx, tuple(t.shape), tuple(t.stride()), param)


def _reduce_module(o, sealer, proto: int):
    """Modules are pickled in eval mode, as load() returns them: the loaded
    pipeline needs no walk over its modules to switch them, and the caller's
    own modules stay as they are."""
    written = written_in_inference(o)
    if written is not None:
        why, tensors = written
        # Marked before pickling where the walk reached the module; one it
        # did not reach is marked here.
        sealer.own_written(sealer.module_path(o), type(o).__name__, why, tensors)
    if packed_quantized(o):
        raise UnshareableTensorError(
            f"module {sealer.module_path(o)!r} ({type(o).__module__}.{type(o).__qualname__}) keeps its weights "
            "quantized and packed (torch.ao.quantization.quantize_dynamic or static quantization): "
            "packed weights cannot be shared. Wrap the float model and quantize in each actor after "
            "load() (torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, "
            "dtype=torch.qint8, inplace=True): each actor then holds its own packed copy), or "
            "quantize with torchao (torchao.quantization.quantize_(model, Int8WeightOnlyConfig())), "
            "whose quantized weights are shared zero-copy",
        )
    # A train() of its own may do more than set the flag (switch off
    # sampling noise, swap a submodule): such a module, in training mode,
    # is pickled as it is and switched after loading by eval(), which runs it.
    own_train = o.training and type(o).train is not torch.nn.Module.train
    if own_train:
        sealer.training_left.append(o)
    if _parametrized(o):
        # weight_norm, spectral_norm, orthogonal, ...: torch refuses to pickle
        # them (their class is made per module); the module travels as its
        # original class with its state, the parametrization is put back on
        # load, and the `original*` tensors are shared.
        state = dict(o.__dict__) if own_train else dict(o.__dict__, training=False)
        base = torch.nn.utils.parametrize.type_before_parametrizations(o)
        return _new_object, (base,), state, None, None, _set_parametrized_state
    if own_train:
        return None
    if _plain_module(type(o)):
        # Their state is their __dict__: set it back directly, without
        # Module.__setstate__'s checks for old checkpoints' missing
        # attributes (a load unpickles hundreds of modules; this is a third
        # of the time).
        state = o.__getstate__()
        state["training"] = False
        return copyreg.__newobj__, (type(o),), state, None, None, _set_module_state
    if o.training:
        rv = o.__reduce_ex__(proto)
        if isinstance(rv, tuple) and len(rv) >= 3 and isinstance(rv[2], dict) and "training" in rv[2]:
            return (*rv[:2], {**rv[2], "training": False}, *rv[3:])
        sealer.training_left.append(o)
    return None


def written_tensors(modules):
    """The tensors written in inference (:func:`written_in_inference`) by
    every module of the ``(path, module)`` pairs given."""
    for _, top in modules:
        for m in top.modules():
            written = written_in_inference(m)
            if written is not None:
                yield from written[1]


def written_in_inference(module):
    """``(why, tensors)`` where ``module``'s forward writes tensors of its
    own in place in eval mode and under ``no_grad`` (against the shared
    read-only copy that write would kill the process), else ``None``:

    - ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm``: torch
      renormalizes each row they look up that is longer, in the weight;
    - a transformers rotary embedding of the ``longrope`` type (Phi-3,
      Phi-3.5, Phi-4-mini): its forward (``dynamic_rope_update``) copies the
      short or long frequencies into its ``inv_freq`` buffers on every call;
    - quantization-aware training's fake quantizers and observers
      (``prepare_qat``): they observe what they quantize and update their
      statistics, scale and zero point in eval mode too.

    Written tensors are small but for the embeddings; each is copied by
    every process that loads (``Sealed.own``)."""
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        if module.max_norm is None:
            return None
        return f"with max_norm={module.max_norm} renormalizes the rows it looks up in its weight", [module.weight]
    if _longrope(module):
        names = [n for n, _ in module.named_buffers(recurse=False) if n.endswith("inv_freq")]
        if names:
            return (
                f"(transformers' longrope rotary embedding) copies new frequencies into {', '.join(names)} "
                "on every call",
                [getattr(module, n) for n in names],
            )
        return None
    quant = sys.modules.get("torch.ao.quantization")
    if quant is not None and isinstance(module, (quant.FakeQuantizeBase, quant.ObserverBase)):
        buffers = [b for _, b in module.named_buffers(recurse=False) if b is not None]
        if buffers:
            return "(quantization-aware training) updates its statistics, scale and zero point as it runs", buffers
    return None


# The code of the function transformers' dynamic_rope_update wraps a rotary
# embedding's forward in (every wrapper shares it), once transformers is in use.
_rope_update_code: list = []


def _longrope(module) -> bool:
    """Whether ``module`` is a transformers rotary embedding whose forward
    is wrapped by ``dynamic_rope_update`` and that uses the ``longrope``
    type (for any of its layer types): that wrapper writes its frequencies
    in place. The ``dynamic`` type registers new buffers instead."""
    rope_type = getattr(module, "rope_type", None)
    types = rope_type.values() if isinstance(rope_type, dict) else (rope_type,)
    if "longrope" not in types:
        return False
    if not _rope_update_code:
        utils = sys.modules.get("transformers.modeling_rope_utils")
        update = getattr(utils, "dynamic_rope_update", None)
        if update is None:
            return False
        _rope_update_code.append(update(lambda self, x, position_ids: None).__code__)
    return getattr(type(module).forward, "__code__", None) is _rope_update_code[0]


def _parametrized(module) -> bool:
    """Whether ``module`` carries parametrizations (its class is the one
    ``torch.nn.utils.parametrize`` made for it)."""
    return torch.nn.utils.parametrize.is_parametrized(module) and type(module) is not (
        torch.nn.utils.parametrize.type_before_parametrizations(module)
    )


# Classes already judged by _plain_module.
_plain: dict = {}


def _plain_module(cls) -> bool:
    """Whether ``cls`` pickles as an ``nn.Module`` does by default: its state
    is (a copy of) its ``__dict__`` and ``Module.__setstate__`` sets it back."""
    known = _plain.get(cls)
    if known is None:
        known = _plain[cls] = (
            cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", None) is torch.nn.Module.__getstate__
            and cls.__setstate__ is torch.nn.Module.__setstate__
            and not hasattr(cls, "__slots__")
        )
    return known


def _reduce_ordered_dict(o):
    """An empty ``OrderedDict`` (a module has eleven, for its hooks: 146,685
    in a 13,335-module model) pickled as made by ``OrderedDict.__new__``
    alone, where its own reduce has it called with no arguments: its
    ``__init__`` adds nothing to an empty one, and the unpickler's NEWOBJ
    calls the type's constructor directly (11.2 ms instead of 13.6 for
    146,685, in one process). Any other (entries, attributes) pickles its
    own way (``None``). Its attributes are asked of the collector, which
    lists its instance dict where it has one: reading ``o.__dict__`` would
    make one, 64 bytes left on each of the caller's dicts (14 MB for that
    model)."""
    if o or gc.get_referents(o):
        return None
    return copyreg.__newobj__, (OrderedDict,)


def program_reducer(o):
    """The reducer of a TorchScript module or an exported program, else None."""
    if isinstance(o, torch.jit.ScriptModule):
        from . import _script

        return _script.reduce
    export = getattr(torch, "export", None)
    if export is not None and isinstance(o, export.ExportedProgram):
        from . import _exported

        return _exported.reduce
    return None


# -- checkpoints filled into a model ------------------------------------------
def _check_names(ckpt, names: dict, persistent: set, by_name: dict) -> None:
    """Every persistent tensor of the model (``names``: its names by
    ``id``) is in the checkpoint under one of its names; else an error that
    says how many are missing and what the checkpoint holds instead: a
    checkpoint of another layout than the model's code (transformers 5
    converts some as it loads them) misses most of them, not one."""
    missing = [ns for tid, ns in names.items() if tid in persistent and not any(n in by_name for n in ns)]
    if not missing:
        return
    ns = missing[0]
    msg = f"the checkpoint lacks tensor {ns[0]!r}, which the model needs" + (
        f" (also named {', '.join(map(repr, ns[1:]))})" if len(ns) > 1 else ""
    )
    used = {n for ns in names.values() for n in ns}
    extra = [e.name for e in ckpt.entries if e.name not in used]
    if len(missing) > 1 or extra:
        total = sum(1 for tid in names if tid in persistent)
        msg += f"; it lacks {len(missing)} of the model's {total} tensors"
        if extra:
            msg += f" and holds {len(extra)} the model has no name for ({listed(extra, 3)})"
        msg += (
            ". Its names or layout are not those of the model's code: a checkpoint written for another version "
            "of it, or one its library converts as it loads it (transformers 5 keeps a mixture-of-experts "
            "layer's experts fused in one tensor, such as mlp.experts.gate_up_proj, where Mixtral and "
            "Qwen2-MoE checkpoints hold one tensor per expert). Load the model as its library does and wrap "
            "it: ActorWrapper(AutoModelForCausalLM.from_pretrained(path))"
        )
    raise InvalidInputError(msg)


def checkpoint_model(ckpt, model):
    """The checkpoint entries ``model`` takes (in the checkpoint's order),
    and what a sealer needs to refer to them: each parameter and persistent
    buffer by its state-dict name (a tied tensor under any of its names),
    checked for shape and dtype; other tensors of the model (non-persistent
    buffers) are sealed as the model has them. Returns the entries, the
    model, and for the sealer its preset references (``id(tensor)`` ->
    index into the entries) and the kind of each entry."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise InvalidTypeError(
                f"model must be an nn.Module or a function that makes one, not {type(model).__name__}"
            )
        model = model()
        if not isinstance(model, torch.nn.Module):
            raise InvalidTypeError(f"the model function returned {type(model).__name__}, not an nn.Module")
    by_name = {e.name: i for i, e in enumerate(ckpt.entries)}
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    names: dict[int, list[str]] = {}
    tensors: dict[int, object] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
        tensors[id(t)] = t
    _check_names(ckpt, names, persistent, by_name)
    chosen: dict[int, int] = {}  # id(tensor) -> index into ckpt.entries
    for tid, ns in names.items():
        if tid not in persistent:
            continue  # a non-persistent buffer: sealed as the model has it
        present = [n for n in ns if n in by_name]
        hit = present[0]
        for other in present[1:]:  # one tied tensor, given under two names: they must agree
            a, b = ckpt.entries[by_name[hit]], ckpt.entries[by_name[other]]
            if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)) or not same_values(ckpt, a, b):
                raise InvalidInputError(
                    f"{hit!r} and {other!r} are one tied tensor in the model, but the checkpoint gives them "
                    "different values: untie them in the model, or drop one from the checkpoint"
                )
        e, t = ckpt.entries[by_name[hit]], tensors[tid]
        dtype = DTYPE_NAMES.get(FROM_TORCH.get(t.dtype))
        if tuple(t.shape) != tuple(e.shape) or dtype != e.dtype:
            raise InvalidInputError(
                f"tensor {hit!r}: the checkpoint has {e.dtype} {list(e.shape)}, "
                f"the model {dtype or t.dtype} {list(t.shape)}"
            )
        chosen[tid] = by_name[hit]
    order = sorted(set(chosen.values()))
    index_of = {ci: k for k, ci in enumerate(order)}
    entries = [ckpt.entries[ci] for ci in order]
    preset = {tid: index_of[ci] for tid, ci in chosen.items()}
    kinds = [None] * len(entries)
    for tid, ci in chosen.items():
        kinds[index_of[ci]] = kind_of(tensors[tid])
    return entries, model, preset, kinds
