"""torch adapter: torch tensors to pack inputs, and tensors back from an
opened buffer. Imported only when torch is in use."""

from __future__ import annotations

import torch

from ._dlpack import consume_versioned, versioned_capsule
from ._native import DTYPE_CODES
from .errors import UnsupportedDtypeError
from .device_weights import DeviceWeights
from .pack import PackInput

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


def pack_input(t: "torch.Tensor", name: str) -> tuple[PackInput, object]:
    """The pack input for ``t`` and the object that must stay alive while
    packing (a CPU, contiguous copy when ``t`` is neither)."""
    code = FROM_TORCH.get(t.dtype)
    if code is None:
        raise UnsupportedDtypeError(
            "RZC_UNSUPPORTED_DTYPE",
            f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold; convert it "
            f"(e.g. .to(torch.float32)) before wrapping",
        )
    t = t.detach()
    if t.device.type == "meta":
        raise ValueError(f"tensor {name!r} is on the meta device and has no data to share; load real weights first")
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"tensor {name!r} has layout {t.layout}; only dense tensors can be shared")
    if t.is_quantized:
        raise UnsupportedDtypeError("RZC_UNSUPPORTED_DTYPE", f"tensor {name!r} is quantized; dequantize it first")
    t = t.contiguous()
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
    a plain tensor, without the constructor's Python overhead (a few hundred
    parameters per load)."""
    if type(t) is not torch.Tensor:
        return torch.nn.Parameter(t, requires_grad=False)
    return _make_subclass(torch.nn.Parameter, t, False)


def named_tensors(module, prefix: str):
    """(name, tensor) of a module's parameters and every buffer (persistent or
    not), each tensor once."""
    for name, p in module.named_parameters(prefix=prefix, remove_duplicate=True):
        yield name, p
    for name, b in module.named_buffers(prefix=prefix, remove_duplicate=True):
        yield name, b

