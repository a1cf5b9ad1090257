"""Exceptions raised by ray-zerocopy.

Every failure of the native library arrives as an :class:`RzcError` carrying
the status name and the library's message. The subclasses also derive from the
matching built-in exception, so ``except ValueError`` catches a malformed file.

The statuses themselves are listed once, in the native library: a status
``RZC_SOME_THING`` raises the class of this module named ``SomeThingError``
(``RZC_CUDA_ERROR`` raises ``CudaError``), or plain :class:`RzcError` when
there is none (a test checks that every status has its class).
"""


class RzcError(Exception):
    """A call into the native library failed; ``status`` names the class."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{message} [{status}]")
        self.status = status
        self.message = message


class InvalidArgumentError(RzcError, ValueError):
    """An argument is out of its domain."""


class NullArgumentError(InvalidArgumentError):
    """A required argument was missing (NULL)."""


class OutOfRangeError(InvalidArgumentError, IndexError):
    """An index past the end of a table."""


class BufferTooSmallError(InvalidArgumentError):
    """A destination smaller than needed."""


class BadFormatError(RzcError, ValueError):
    """The bytes are not a valid safetensors buffer."""


class NotFoundError(RzcError, KeyError):
    """No tensor of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class UnsupportedDtypeError(RzcError, TypeError):
    """A dtype the operation cannot take."""


class IoError(RzcError, OSError):
    """A file could not be opened or mapped."""


#: The name this class had before it followed the status names.
IOFailure = IoError


class NoCudaError(RzcError, RuntimeError):
    """No CUDA driver or device is available to this process."""


class BadDeviceError(NoCudaError):
    """The requested device ordinal names no device this process sees."""


class CudaError(RzcError, RuntimeError):
    """The CUDA driver reported an error."""


class OutOfMemoryError(RzcError, MemoryError):
    """Host or device memory could not be allocated."""


class PanicError(RzcError, RuntimeError):
    """A bug inside the library was caught at its boundary; please report it."""


def class_for(status: str) -> type[RzcError]:
    """The exception class of a status name, by the rule above."""
    words = status.removeprefix("RZC_").split("_")
    name = "".join(w.capitalize() for w in words)
    if not name.endswith("Error"):
        name += "Error"
    cls = globals().get(name)
    return cls if isinstance(cls, type) and issubclass(cls, RzcError) else RzcError


def error_for(status: str, message: str) -> RzcError:
    """The exception for a failed status."""
    return class_for(status)(status, message)
