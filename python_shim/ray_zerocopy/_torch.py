"""torch adapter: torch tensors to pack inputs and tensors back from an
opened buffer, and the functions a skeleton calls as it is loaded (views,
relaid layouts, tensor subclasses, modules' state). What torch objects
pickle as when sealed is ``_torch_seal``'s. Imported only when torch is in
use."""

from __future__ import annotations

import torch

from ._dlpack import consume_versioned, versioned_capsule
from ._native import DTYPE_CODES
from ._skeleton import TORCH, TORCH_PARAM
from .device_weights import DeviceWeights
from .errors import InternalError, InvalidInputError, UnshareableTensorError
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


def kind_of(t) -> str:
    """The kind of reference a torch tensor becomes in a skeleton."""
    return TORCH_PARAM if isinstance(t, torch.nn.Parameter) else TORCH


_PLAIN = (torch.Tensor, torch.nn.Parameter)


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


