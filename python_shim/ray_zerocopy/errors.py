"""Exceptions raised by ray-zerocopy.

Every error the package raises derives from :class:`RayZeroCopyError`, and
also from the built-in exception a caller would expect (``ValueError`` for a
malformed file or a bad argument, ``MemoryError``, ``RuntimeError``, ...), so
``except ValueError`` keeps working. Its ``status`` says where it was found:

- Failures of the native library are :class:`RzcError` s carrying the status
  name (``"RZC_BAD_FORMAT"``) and the library's message. The statuses are
  listed once, in the native library: a status ``RZC_SOME_THING`` raises the
  class of this module named ``SomeThingError`` (``RZC_CUDA_ERROR`` raises
  ``CudaError``), or plain :class:`RzcError` when there is none (a test checks
  that every status has its class).
- Failures the Python package finds itself have ``status`` ``None``. Where
  such a failure is a condition the native library also reports (a dtype
  nothing can share, a device this process does not see), its class derives
  from the native one, so one ``except`` catches it whichever side found it.

``docs/usage.md`` has the table: which error, when, and what to do.
"""


def listed(items, most: int = 6, show=repr) -> str:
    """``items`` for a message: the first ``most`` (each ``show``n), then
    how many more there are."""
    items = list(items)
    shown = ", ".join(show(x) for x in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


class RayZeroCopyError(Exception):
    """Base of every error ray-zerocopy raises. ``status``: the native
    library's status name, or ``None`` for a failure found in Python."""

    status: str | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RzcError(RayZeroCopyError):
    """A call into the native library failed; ``status`` names the class."""

    def __init__(self, status: str, message: str):
        Exception.__init__(self, f"{message} [{status}]")
        self.status = status
        self.message = message


class _FoundInPython:
    """Mixin for a Python-side subclass of a native status's class: it
    carries no status (the native library did not report it)."""

    def __init__(self, message: str):
        RayZeroCopyError.__init__(self, message)


# -- failures of the native library, one class per status --------------------
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
    """A file could not be opened, mapped or read (it is shorter than its
    header says)."""


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


# -- failures found in Python -------------------------------------------------
class InvalidInputError(RayZeroCopyError, ValueError):
    """An argument or an input (a device string, an option, a checkpoint, a
    pipeline with nothing to share) that the package does not take."""


class InvalidTypeError(RayZeroCopyError, TypeError):
    """An object of a type the package does not take, or a pipeline part
    that does not pickle."""


class UnshareableTensorError(_FoundInPython, UnsupportedDtypeError):
    """A tensor or module whose dtype or packing safetensors cannot hold
    (checked before anything reaches the native library)."""


class DeviceNotVisibleError(_FoundInPython, BadDeviceError):
    """The requested GPU is not one this process sees."""


class CheckpointNotFoundError(RayZeroCopyError, FileNotFoundError):
    """A checkpoint file, directory or shard does not exist."""


class CheckpointChangedError(RayZeroCopyError, RuntimeError):
    """A checkpoint file changed (rewritten, truncated or replaced) between
    reading its header and copying its tensors, or during the copy."""


class MissingTensorError(RayZeroCopyError, KeyError):
    """A rebuilt object was not given the tensors it was stripped of."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class UnsupportedObjectError(RayZeroCopyError, NotImplementedError):
    """A program or module holds state that cannot be shared (a torchbind
    object, a container of tensors in a TorchScript attribute, ...)."""


class DLPackExportError(RayZeroCopyError, BufferError):
    """A DLPack export was asked for in a form it cannot take (a copy,
    another device); ``BufferError`` as the DLPack protocol prescribes."""


class RayNotInitializedError(RayZeroCopyError, RuntimeError):
    """Ray is not running in this process where it is needed: a wrapper
    made, loaded, updated or published before ``ray.init()`` or after
    ``ray.shutdown()``."""


class SealedObjectLostError(RayZeroCopyError, RuntimeError):
    """The sealed weights are no longer in Ray's object store (their owner,
    the process that made the wrapper, is gone)."""


class VersionNotFoundError(RayZeroCopyError, LookupError):
    """Nothing is published under a name (within the time waited)."""


class VersionConflictError(RayZeroCopyError, RuntimeError):
    """``publish(..., replaces=N)`` found another version newest than N:
    someone else published in between, and nothing was published."""


class RegistryUnavailableError(RayZeroCopyError, RuntimeError):
    """The versions registry actor is unavailable (it died or is being
    restarted; the next call makes it again, with the versions published
    with an :class:`~ray_zerocopy.Owner`)."""


class OwnerUnavailableError(RayZeroCopyError, RuntimeError):
    """An :class:`~ray_zerocopy.Owner`'s actor cannot be reached right now
    (not dead: it is not marked closed, and a later call asks again)."""


class BufferMismatchError(RayZeroCopyError, RuntimeError):
    """A buffer is not the one the wrapper was sealed with."""


class SealedObjectCorruptedError(BufferMismatchError):
    """The copy of the sealed weights Ray's object store gave this process
    was read back from disk (the object had been spilled), and its bytes
    are not the ones sealed: the spilled copy was changed or damaged."""


class InternalError(RayZeroCopyError, RuntimeError):
    """A check of the package's own work failed: a bug, please report it."""


def class_for(status: str) -> type[RzcError]:
    """The exception class of a status name, by the rule above."""
    words = status.removeprefix("RZC_").split("_")
    name = "".join(w.capitalize() for w in words)
    if not name.endswith("Error"):
        name += "Error"
    cls = globals().get(name)
    native = isinstance(cls, type) and issubclass(cls, RzcError) and not issubclass(cls, _FoundInPython)
    return cls if native else RzcError


def error_for(status: str, message: str) -> RzcError:
    """The exception for a failed status."""
    return class_for(status)(status, message)
