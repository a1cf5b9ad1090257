"""The native library (librzc through cffi) and the few helpers every other
module needs: status checking and dtype codes."""

from __future__ import annotations

from ._rzc import ffi, lib
from .errors import error_for

__all__ = ["ffi", "lib", "check", "DTYPE_NAMES", "version"]


def check(status: int) -> None:
    """Raises the matching :class:`~ray_zerocopy.errors.RzcError` unless OK."""
    if status != lib.RZC_OK:
        name = ffi.string(lib.rzc_status_name(status)).decode()
        message = ffi.string(lib.rzc_last_error_message()).decode("utf-8", "replace")
        raise error_for(name, message)


def version() -> str:
    """The native library's version."""
    return ffi.string(lib.rzc_version()).decode()


#: rzc_dtype code -> safetensors spelling ("F32", "BF16", ...).
DTYPE_NAMES = {}
_code = 0
while True:
    _name = lib.rzc_dtype_name(_code)
    if _name == ffi.NULL:
        break
    DTYPE_NAMES[_code] = ffi.string(_name).decode()
    _code += 1
#: safetensors spelling -> rzc_dtype code.
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
del _code, _name
