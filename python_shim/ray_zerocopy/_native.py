"""The native library (librzc through cffi) and the few helpers every other
module needs: status checking and the dtype table, both read from the library
itself so that Python never keeps a second copy of either list."""

from __future__ import annotations

import enum

from ._rzc import ffi, lib
from .errors import error_for

__all__ = [
    "ffi",
    "lib",
    "check",
    "new_struct",
    "code_names",
    "text",
    "Dtype",
    "DTYPE_NAMES",
    "DTYPE_CODES",
    "STATUS_NAMES",
    "version",
]


def check(status: int) -> None:
    """Raises the matching :class:`~ray_zerocopy.errors.RzcError` unless OK."""
    if status != lib.RZC_OK:
        name = ffi.string(lib.rzc_status_name(status)).decode()
        message = ffi.string(lib.rzc_last_error_message()).decode("utf-8", "replace")
        raise error_for(name, message)


def version() -> str:
    """The native library's version."""
    return ffi.string(lib.rzc_version()).decode()


def new_struct(ctype: str, **fields):
    """A new cffi struct of an extensible type, its ``struct_nbytes`` set."""
    return ffi.new(ctype + " *", {"struct_nbytes": ffi.sizeof(ctype), **fields})


def text(ptr, n: int) -> str:
    """``n`` bytes of UTF-8 at ``ptr`` as a string (``""`` for none)."""
    return ffi.unpack(ptr, n).decode("utf-8", "replace") if n else ""


def code_names(prefix: str) -> dict[int, str]:
    """``{code: name}`` of the header's ``#define`` family ``prefix``, each
    name the rest of the macro's name in lower case: ``code_names("RZC_GUARD_")``
    is ``{0: "none", 1: "sealed", ...}``. The header is the only list."""
    out = {}
    for name in dir(lib):
        if name.startswith(prefix):
            code = getattr(lib, name)
            if isinstance(code, int):
                out[code] = name[len(prefix) :].lower()
    if not out:
        raise ImportError(f"the native library defines no {prefix}* constants; it does not match this package")
    return out


def _table(name_of, stop) -> dict[int, str]:
    """``{code: name}`` for codes 0, 1, ... until ``name_of`` says ``stop``."""
    out, code = {}, 0
    while (name := name_of(code)) != stop:
        out[code] = name
        code += 1
    return out


def _dtype_name(code: int) -> str | None:
    name = lib.rzc_dtype_name(code)
    return None if name == ffi.NULL else ffi.string(name).decode()


def _realize_everything() -> None:
    """Makes cffi build every C type and function of the ABI now, at import
    (under Python's import lock), instead of at first use: cffi builds them
    lazily, and two threads building the same struct type at once abort the
    process (an assertion in cffi's realize_c_type.c, seen when two threads
    of a fresh process made their first uploads together). It costs about
    0.4 ms, once per process."""
    typedefs, structs, unions = ffi.list_types()
    for name in typedefs:
        ffi.typeof(name)
    for name in structs:
        ffi.typeof("struct " + name)
    for name in unions:
        ffi.typeof("union " + name)
    for name in dir(lib):
        if not name.startswith("__"):
            getattr(lib, name)


_realize_everything()

#: rzc_dtype code -> safetensors spelling ("F32", "BF16", ...).
DTYPE_NAMES = _table(_dtype_name, None)
#: safetensors spelling -> rzc_dtype code.
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
#: rzc_status code -> name ("RZC_OK", "RZC_BAD_FORMAT", ...).
STATUS_NAMES = _table(lambda c: ffi.string(lib.rzc_status_name(c)).decode(), "RZC_UNKNOWN")

#: The element types of safetensors, by their header spelling: ``Dtype.F32``,
#: ``Dtype.BF16``, ... (an ``IntEnum`` whose values are the C ABI's codes).
Dtype = enum.IntEnum("Dtype", {name: code for code, name in DTYPE_NAMES.items()}, module=__name__)
