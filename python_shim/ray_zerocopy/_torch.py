"""torch adapter: torch tensors to pack inputs and tensors back from an
opened buffer; what torch objects (modules, tensor subclasses, programs)
pickle as when sealed; and the model a checkpoint is filled into. Imported
only when torch is in use."""

from __future__ import annotations

import copyreg
import gc
import sys
from collections import OrderedDict

import torch

from ._checkpoint import same_values
from ._dlpack import consume_versioned, versioned_capsule
from ._native import DTYPE_CODES, DTYPE_NAMES
from ._seal import TensorData
from ._skeleton import TORCH, TORCH_PARAM
from .device_weights import DeviceWeights
from .errors import InternalError, InvalidInputError, InvalidTypeError, UnshareableTensorError
from .packing import PackInput

_BY_NAME = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
# Only the dtypes this torch build has.
TO_TORCH = {st: getattr(torch, t) for st, t in _BY_NAME.items() if hasattr(torch, t)}
FROM_TORCH = {t: DTYPE_CODES[st] for st, t in TO_TORCH.items()}


# torch.from_dlpack's own capsule path, without its checks for producer
# objects (a capsule has no __dlpack__); public torch.from_dlpack otherwise.
_from_capsule = getattr(torch._C, "_from_dlpack", torch.from_dlpack)


def accepts(obj) -> bool:
    return isinstance(obj, torch.Tensor) and not is_wrapper_subclass(obj)


def is_wrapper_subclass(t) -> bool:
    """Whether ``t`` is a tensor subclass made of inner tensors (torch's
    ``__tensor_flatten__`` protocol: torchao's quantized weights, ...)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def flatten(t) -> tuple[dict, object]:
    """The inner tensors of a wrapper subclass by attribute name, and its
    context (what ``__tensor_unflatten__`` takes back)."""
    attrs, ctx = t.__tensor_flatten__()
    return {a: getattr(t, a) for a in attrs}, ctx


def unflatten(cls, inner: dict, ctx, size, stride, param: bool):
    """A wrapper subclass rebuilt from its inner tensors (adopted zero-copy),
    as a frozen parameter where it was a parameter."""
    t = cls.__tensor_unflatten__(inner, ctx, torch.Size(size), tuple(stride))
    return torch.nn.Parameter(t, requires_grad=False) if param else t


def packed_quantized(module) -> bool:
    """Whether ``module`` keeps its weights in packed quantized parameters
    (``torch.ao.quantization.quantize_dynamic``, static quantization)."""
    return type(module).__module__.startswith("torch.ao.nn.quantized") and hasattr(module, "_packed_params")


def pack_input(t: torch.Tensor, name: str) -> tuple[PackInput, object]:
    """The pack input for ``t`` and the object that must stay alive while
    packing (a CPU, contiguous copy when ``t`` is neither)."""
    code = FROM_TORCH.get(t.dtype)
    if code is None:
        raise UnshareableTensorError(
            f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold; convert it "
            f"(e.g. .to(torch.float32)) before wrapping",
        )
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        raise InvalidInputError(
            f"tensor {name!r} is an uninitialized parameter of a lazy module (nn.LazyLinear, ...): it has no "
            "shape or values yet; run one forward pass on an example input before wrapping"
        )
    t = t.detach()
    if t.device.type == "meta":
        raise InvalidInputError(
            f"tensor {name!r} is on the meta device and has no data to share; load real weights first"
        )
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_sparse or t.layout != torch.strided:
        raise InvalidInputError(f"tensor {name!r} has layout {t.layout}; only dense tensors can be shared")
    if t.is_nested:
        raise InvalidInputError(
            f"tensor {name!r} is a nested tensor of the strided layout, which cannot be shared; make it with "
            "layout=torch.jagged (whose values are shared), or keep its components as a list of tensors"
        )
    if t.is_quantized:
        raise UnshareableTensorError(f"tensor {name!r} is quantized; dequantize it first")
    # A lazy conjugate or negative view (``.conj()`` of a complex tensor,
    # ``torch._neg_view``) is a flag over the memory, which still holds the
    # values before it: the bytes sealed must be the values it shows.
    t = t.resolve_conj().resolve_neg().contiguous()
    return PackInput(name, code, tuple(t.shape), t.data_ptr(), t.numel() * t.element_size()), t


def adopt(source, indices, fast: bool = False) -> list:
    """Tensors ``indices`` of ``source`` (an opened buffer, or its upload to
    a GPU) as torch tensors, zero-copy.

    Default: one DLPack tensor per torch tensor (each its own storage, so a
    tensor sent elsewhere carries its own bytes only), all exported in one
    native call, as our own capsules straight to torch (a documented input of
    ``torch.from_dlpack``: the same DLPack tensors, without the protocol
    negotiation a producer object costs per tensor). ``fast`` (CPU): one
    export of the whole data section, each tensor a typed view of it cut by
    the handle's table (all tensors then share one storage)."""
    if isinstance(source, DeviceWeights):
        # The upload used the primary context torch uses and is complete.
        return [torch.from_dlpack(versioned_capsule(source.export_versioned(i))) for i in indices]
    if not fast:
        return consume_versioned(source.export_versioned_many(indices), _from_capsule)
    section = torch.from_dlpack(source.data_section())
    start, table = source.data_start, source.table()
    out = []
    for i in indices:
        t = table[i]
        off = t.offset - start
        out.append(section[off : off + t.nbytes].view(TO_TORCH[t.dtype]).view(t.shape))
    return out


_make_subclass = torch.Tensor._make_subclass


def as_parameter(t):
    """``nn.Parameter(t, requires_grad=False)``: what its constructor does for
    a plain tensor, without the constructor's Python overhead."""
    if type(t) is not torch.Tensor:
        return torch.nn.Parameter(t, requires_grad=False)
    return _make_subclass(torch.nn.Parameter, t, False)


def make_parameters(tensors: list, kinds, fresh: bool = False) -> None:
    """Turns ``tensors[i]`` into a frozen ``nn.Parameter`` where ``kinds[i]``
    is a parameter, in place.

    A tensor this load made itself (a plain, frozen leaf tensor that nothing
    else refers to) becomes the parameter: its class is set to
    ``nn.Parameter``, as torch's own ``UninitializedParameter.materialize``
    turns a tensor into a parameter. That is the object ``nn.Parameter``
    would make, without the second tensor object and tensor implementation
    that ``_make_subclass`` creates: 0.1 us a tensor instead of 0.8-1.6 us,
    a tenth of a load of 20,000 tensors. Anything else (a view of another
    tensor, a tensor subclass) gets the constructor's way.

    ``fresh``: every plain tensor in ``tensors`` is known to be such a leaf
    (each came from its own ``torch.from_dlpack``, which makes a tensor with
    its own storage and no gradient), so only its class is checked: the
    gradient and view checks cost 0.12 us a tensor, 2.4 of the 3.5 ms this
    took for 20,000 parameters."""
    param, plain = torch.nn.Parameter, torch.Tensor
    if len(tensors) != len(kinds):
        raise InternalError(f"{len(tensors)} tensors for {len(kinds)} references")
    for i, k in enumerate(kinds):
        if k != TORCH_PARAM:
            continue
        t = tensors[i]
        if type(t) is plain and (fresh or (not t.requires_grad and not t._is_view())):
            t.__class__ = param
        else:
            tensors[i] = as_parameter(t)


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


def kind_of(t) -> str:
    """The kind of reference a torch tensor becomes in a skeleton."""
    return TORCH_PARAM if isinstance(t, torch.nn.Parameter) else TORCH


# -- sealing: what torch objects pickle as ------------------------------------
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


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


def view_of(base, shape, stride, offset: int, param: bool):
    """A tensor ``views`` found inside ``base``: that view of this load's
    ``base`` (zero-copy), a frozen parameter where it was a parameter. A
    load as numpy or JAX (a pytree of torch tensors loaded with
    ``framework=``) makes the same view of that array (JAX, which has no
    views, copies it)."""
    if isinstance(base, torch.Tensor):
        t = base.as_strided(shape, stride, base.storage_offset() + offset)
        return as_parameter(t) if param else t
    import numpy as np

    a = np.asarray(base)
    size = a.itemsize
    view = np.ndarray(shape, a.dtype, a, offset * size, tuple(s * size for s in stride))
    if isinstance(base, np.ndarray):
        return view
    import jax.numpy as jnp

    return jnp.asarray(view)


def permutation(t):
    """The order of ``t``'s dimensions in memory, outermost first, where
    ``t`` is dense but not contiguous (``channels_last``, a transposed
    copy: its dimensions permuted make it contiguous); ``None`` otherwise
    (contiguous, or with gaps, overlaps or strides that run backwards,
    which are sealed as a contiguous copy)."""
    if t.is_contiguous() or t.layout != torch.strided or t.is_conj() or t.is_neg() or t.ndim < 2:
        return None
    stride = t.stride()
    order = tuple(sorted(range(t.ndim), key=lambda d: (-stride[d], d)))
    return order if t.permute(order).is_contiguous() else None


def broadcast_shape(t):
    """``t``'s shape where it has broadcast dimensions (stride 0 over more
    than one element: ``expand``, ``broadcast_to``), else ``None``."""
    if t.layout != torch.strided or t.is_nested or t.numel() == 0:
        return None
    if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride(), strict=True)):
        return tuple(t.shape)
    return None


def compact(t):
    """``t`` with each broadcast dimension narrowed to one element: the
    values it repeats, each once (a view)."""
    for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if s == 0 and n > 1:
            t = t.narrow(d, 0, 1)
    return t


def relays(t) -> bool:
    """Whether ``t`` is sealed in a layout other than its shape's: permuted
    (its bytes in memory order) or broadcast (its repeated values once); see
    :func:`relaid`."""
    if t.is_contiguous():  # most tensors: neither (a broadcast dimension is never contiguous)
        return False
    return permutation(t) is not None or broadcast_shape(t) is not None


def relaid(t, back, shape, param: bool):
    """Tensor ``t`` (sealed in its memory order, its broadcast dimensions
    one element long) with its dimensions put back (``back``, where it was
    permuted) and broadcast again to ``shape`` (where it was broadcast): the
    original's shape and strides, zero-copy. A numpy load gets the same
    view (read-only where broadcast); a JAX load, which has no views, a
    copy."""
    if isinstance(t, torch.Tensor):
        v = t if back is None else t.permute(back)
        if shape is not None:
            v = v.expand(shape)
        return as_parameter(v) if param else v
    import numpy as np

    if isinstance(t, np.ndarray):
        v = t if back is None else t.transpose(back)
        return v if shape is None else np.broadcast_to(v, shape)
    import jax.numpy as jnp

    v = t if back is None else jnp.transpose(t, back)
    return v if shape is None else jnp.broadcast_to(v, shape)


def has_extras(t) -> bool:
    """Whether tensor ``t`` is more than its data: a subclass of its own (a
    ``torch.Tensor`` subclass with ``__torch_function__``, a custom
    ``nn.Parameter`` class) or attributes set on it (tensor-parallel code
    tags parameters: ``weight.partition_dim = 0``). torch's own pickling
    keeps both; so does sealing (:func:`with_extras`)."""
    return type(t) not in _PLAIN or bool(t.__dict__)


def with_extras(t, cls, state: dict):
    """Tensor ``t`` (this load's, from the buffer) given back the class and
    the attributes its original had. The class is set in place, as torch's
    ``UninitializedParameter.materialize`` does (the tensor is this load's
    own object); a class that cannot be set so gets ``as_subclass``, as
    torch's unpickling does."""
    if not isinstance(t, torch.Tensor):
        return t  # loaded as numpy or JAX (a pytree with framework=): an array has no torch class
    if type(t) is not cls:
        try:
            t.__class__ = cls
        except TypeError:
            t = t.as_subclass(cls)
    if state:
        t.__dict__.update(state)
    return t


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


# Sets a module's state as pickled by _plain_module's rule (a complete
# __dict__, so Module.__setstate__ would add nothing). The unpickler made the
# state for this module alone: it becomes the module's __dict__ as it is,
# where ``update`` would copy its 19 or so entries into another (13,335
# modules' states set in 4 ms instead of 8, measured in one process). It is
# the __set__ of the __dict__ attribute nn.Module's class defines (every
# subclass without __slots__ inherits that attribute), called by the
# unpickler as any state setter, (module, state): a C call, where a Python
# function doing object.__setattr__(obj, "__dict__", state) cost 0.3 us a
# module (4 of the 30 ms a 13,335-module skeleton takes). It does what that
# setattr does, and refuses a state that is not a dict.
_set_module_state = vars(torch.nn.Module)["__dict__"].__set__


def _module_state_setter():
    """:data:`_set_module_state`, as a skeleton names it (the method-wrapper
    itself pickles as a getattr of an attribute it cannot name)."""
    return _set_module_state


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
            shown = ", ".join(map(repr, extra[:3])) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            msg += f" and holds {len(extra)} the model has no name for ({shown})"
        msg += (
            ". Its names or layout are not those of the model's code: a checkpoint written for another version "
            "of it, or one its library converts as it loads it (transformers 5 keeps a mixture-of-experts "
            "layer's experts fused in one tensor, such as mlp.experts.gate_up_proj, where Mixtral and "
            "Qwen2-MoE checkpoints hold one tensor per expert). Load the model as its library does and wrap "
            "it: ActorWrapper(AutoModelForCausalLM.from_pretrained(path))"
        )
    raise InvalidInputError(msg)


def checkpoint_model(ckpt, model):
    """The checkpoint entries ``model`` takes (in the checkpoint's order) and
    a sealer whose references point at them: each parameter and persistent
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
