"""numpy adapter. Extended float types (bfloat16, float8) come from
``ml_dtypes`` when it is installed (JAX installs it)."""

from __future__ import annotations

import numpy as np

from ._native import DTYPE_CODES
from .errors import UnshareableTensorError
from .packing import PackInput
from .weights import Weights

_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


def _native_dtypes() -> dict:
    out = {}
    for np_name, st in _NAMES.items():
        try:
            out[st] = np.dtype(np_name)
        except TypeError:
            pass  # an extended float type: see numpy_dtype
    return out


#: safetensors dtype name -> numpy dtype, for the types numpy has; the
#: extended float types are added by :func:`numpy_dtype` when first needed.
TO_NUMPY = _native_dtypes()
_extended_tried = False


def numpy_dtype(st: str):
    """The numpy dtype of safetensors dtype ``st``, or ``None``. The
    extended float types (bfloat16, float8) come from ``ml_dtypes``,
    imported the first time a buffer holds one, not before: its import
    takes half a second on some machines (0.5 s with ml_dtypes 0.7.0 here),
    which a load of float32 tensors in a fresh actor should not pay."""
    global _extended_tried
    dt = TO_NUMPY.get(st)
    if dt is None and not _extended_tried:
        _extended_tried = True
        try:
            import ml_dtypes
        except ImportError:
            return None
        for np_name, name in _NAMES.items():
            if name not in TO_NUMPY and hasattr(ml_dtypes, np_name):
                TO_NUMPY[name] = np.dtype(getattr(ml_dtypes, np_name))
        dt = TO_NUMPY.get(st)
    return dt


# What is sealed as a shared array: a plain ndarray, and a memmap (what
# np.load(..., mmap_mode="r") returns, a common way to hold big weights),
# which loads back as a plain ndarray. Other subclasses (np.matrix, masked
# arrays) mean more than their bytes and travel pickled, as before.
_SHARED = (np.ndarray, np.memmap)


def accepts(obj) -> bool:
    """A plain array of a dtype safetensors holds. Any other array is
    pickled with the rest of the pipeline: strings, objects and records are
    not weights; numbers safetensors cannot hold (``complex128``,
    ``float128``, ml_dtypes' ``int4``) are announced (:func:`unshareable`)."""
    return type(obj) in _SHARED and obj.dtype.name in _NAMES


def unshareable(obj) -> bool:
    """Whether ``obj`` is an array of numbers that travels pickled because
    safetensors cannot hold its dtype (each loading process gets a copy)."""
    if type(obj) not in _SHARED or obj.dtype.name in _NAMES:
        return False
    # ml_dtypes' numbers (int4, float4_e2m1fn, float8_e3m4, ...) are of kind
    # "V" to numpy: told by the module their type comes from.
    return obj.dtype.kind in "fc" or getattr(obj.dtype.type, "__module__", "") == "ml_dtypes"


def pack_input(a: np.ndarray, name: str) -> tuple[PackInput, object]:
    st = _NAMES.get(a.dtype.name)
    if st is None:
        raise UnshareableTensorError(
            f"array {name!r} has dtype {a.dtype}, which safetensors cannot hold; convert it "
            f"(e.g. .astype(np.float32) or np.complex64) before wrapping"
        )
    if a.dtype.byteorder == ">":
        # safetensors holds little-endian values: a big-endian array (">f4"
        # is named "float32" too) is converted, or its bytes would be read
        # back as other numbers.
        a = a.astype(a.dtype.newbyteorder("<"))
    # np.ascontiguousarray makes a 0-d array 1-d (it returns ndim >= 1): a
    # scalar (a temperature, a step counter) would come back with shape (1,).
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return PackInput(name, DTYPE_CODES[st], a.shape, a.ctypes.data, a.nbytes), a


def adopt(weights: Weights, indices, fast: bool = False) -> list:
    """Read-only numpy views of tensors ``indices``, each made by one
    ``ndarray`` constructor over one export of the data section, at the
    place the handle's table says (numpy honours DLPack's read-only flag).
    ``fast`` changes nothing: this is the fast way."""
    section = np.from_dlpack(weights.data_section())
    dtypes, shapes, offsets, _ = weights.columns()
    start, array, to_numpy = weights.data_start, np.ndarray, TO_NUMPY
    out = []
    for i in indices:
        dt = to_numpy.get(dtypes[i])
        if dt is None:
            dt = numpy_dtype(dtypes[i])
        if dt is None:
            raise UnshareableTensorError(
                f"tensor {weights.info(i).name!r} has dtype {dtypes[i]}; install ml_dtypes to read it with numpy"
            )
        out.append(array(shapes[i], dt, section, offsets[i] - start))
    return out
