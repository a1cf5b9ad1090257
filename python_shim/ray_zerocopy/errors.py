"""Exceptions raised by ray-zerocopy.

Every failure of the native library arrives as an :class:`RzcError` carrying
the status name and the library's message. The subclasses also derive from the
matching built-in exception, so ``except ValueError`` catches a malformed file.
"""


class RzcError(Exception):
    """A call into the native library failed; ``status`` names the class."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{message} [{status}]")
        self.status = status
        self.message = message


class BadFormatError(RzcError, ValueError):
    """The bytes are not a valid safetensors buffer."""


class InvalidArgumentError(RzcError, ValueError):
    """An argument is out of its domain."""


class NotFoundError(RzcError, KeyError):
    """No tensor of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class UnsupportedDtypeError(RzcError, TypeError):
    """A dtype the operation cannot take."""


class NoCudaError(RzcError, RuntimeError):
    """No CUDA driver or device is available to this process."""


class CudaError(RzcError, RuntimeError):
    """The CUDA driver reported an error."""


class IOFailure(RzcError, OSError):
    """A file could not be opened or mapped."""


_BY_STATUS = {
    "RZC_BAD_FORMAT": BadFormatError,
    "RZC_INVALID_ARGUMENT": InvalidArgumentError,
    "RZC_NULL_ARGUMENT": InvalidArgumentError,
    "RZC_NOT_FOUND": NotFoundError,
    "RZC_OUT_OF_RANGE": InvalidArgumentError,
    "RZC_UNSUPPORTED_DTYPE": UnsupportedDtypeError,
    "RZC_IO": IOFailure,
    "RZC_NO_CUDA": NoCudaError,
    "RZC_BAD_DEVICE": NoCudaError,
    "RZC_CUDA_ERROR": CudaError,
}


def error_for(status: str, message: str) -> RzcError:
    """The exception for a failed status."""
    return _BY_STATUS.get(status, RzcError)(status, message)
