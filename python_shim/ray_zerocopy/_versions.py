"""Versions of a model published under a name, and read by any actor.

``publish(name, wrapper)`` makes ``wrapper`` the newest version of ``name``
for the whole Ray cluster; ``latest(name)`` returns it; a
:class:`Subscription` keeps the newest version loaded in its process and
follows new ones in the background, so that a request or a batch only reads
an attribute.

The Ray way of a shared, named, mutable value is a named actor: here one
detached asyncio actor (``ray_zerocopy.versions`` in namespace
``ray_zerocopy``, no CPU) holds, per name, the version number and the
wrapper. A subscriber's background thread parks in ``wait_newer`` (an
``asyncio.Event`` per name inside the actor): a publish wakes every
subscriber at once, with no polling and nothing on the request path.

The registry never unpickles a wrapper (that would import the model's code
and torch into it): a wrapper travels as a pickle with its ``ObjectRef`` s
taken out and passed beside it, so that Ray counts the registry as a holder
of every object the newest versions use (a reference pickled into bytes would
escape Ray's reference counting and never be freed). When a version is
replaced, the registry drops the old one's references; an object only the
old version used is freed once no actor holds it any more and its owner has
let it go: with an :class:`~ray_zerocopy.Owner`, :func:`publish` lets go of
those objects itself.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import time
from typing import NamedTuple

from .errors import InvalidInputError, RayNotInitializedError, VersionNotFoundError

__all__ = ["publish", "latest", "versions", "Subscription", "Version"]

_NAME = "ray_zerocopy.versions"
_NAMESPACE = "ray_zerocopy"
logger = logging.getLogger("ray_zerocopy")


class _Registry:
    """The cluster's table of published versions (a detached asyncio actor)."""

    def __init__(self):
        import asyncio

        self._asyncio = asyncio
        self._entries = {}  # name -> (version, refs, blob)
        self._events = {}  # name -> asyncio.Event, set (and replaced) on publish

    def _event(self, name):
        if name not in self._events:
            self._events[name] = self._asyncio.Event()
        return self._events[name]

    async def publish(self, name, refs, blob):
        version = self._entries.get(name, (0, [], b""))[0] + 1
        old = self._entries.get(name, (0, [], b""))[1]
        self._entries[name] = (version, refs, blob)
        self._event(name).set()
        self._events[name] = self._asyncio.Event()
        return version, old

    async def get(self, name):
        return self._entries.get(name)

    async def wait_newer(self, name, version, timeout):
        """The entry of ``name`` once its version is above ``version``, or
        ``None`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._entries.get(name)
            if entry is not None and entry[0] > version:
                return entry
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await self._asyncio.wait_for(self._event(name).wait(), left)
            except self._asyncio.TimeoutError:
                return None

    async def names(self):
        return {name: entry[0] for name, entry in self._entries.items()}

    async def withdraw(self, name):
        entry = self._entries.pop(name, None)
        return [] if entry is None else entry[1]


_handle = None  # (Ray session name, the registry's handle) of this process


def _registry():
    """The registry actor, made by the first process that needs it."""
    global _handle
    import ray

    if not ray.is_initialized():
        raise RayNotInitializedError("ray.init() has not been called: versions are published in a Ray cluster")
    session = ray.get_runtime_context().get_session_name()
    if _handle is None or _handle[0] != session:
        actor = ray.remote(_Registry).options(
            name=_NAME,
            namespace=_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=10_000,
        )
        _handle = (session, actor.remote())
    return _handle[1]


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"a version name is a non-empty string, not {name!r}")
    return name


# Pickler and unpickler classes at module level, holding the references on
# the instance: a class made per call (with a closure over the references)
# is a reference cycle, which kept an old version's objects alive until the
# next full garbage collection.
class _RefPickler(pickle.Pickler):
    def __init__(self, file, ref_type):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.ref_type, self.refs = ref_type, []

    def persistent_id(self, obj):
        if isinstance(obj, self.ref_type):
            self.refs.append(obj)
            return len(self.refs) - 1
        return None


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file, refs):
        super().__init__(file)
        self.refs = refs

    def persistent_load(self, pid):
        return self.refs[pid]


def _split(wrapper) -> tuple[list, bytes]:
    """``wrapper`` pickled with its ``ObjectRef`` s taken out, and those refs."""
    import ray

    out = io.BytesIO()
    pickler = _RefPickler(out, ray.ObjectRef)
    pickler.dump(wrapper)
    return pickler.refs, out.getvalue()


def _join(refs, blob):
    """The wrapper :func:`_split` took apart."""
    return _RefUnpickler(io.BytesIO(blob), refs).load()


def publish(name: str, wrapper) -> int:
    """Makes ``wrapper`` (an :class:`~ray_zerocopy.ActorWrapper`, e.g. made by
    :meth:`~ray_zerocopy.ActorWrapper.update`) the newest version of ``name``
    in this Ray cluster and returns its version number (1, 2, ...). Every
    :class:`Subscription` to ``name`` loads it in the background and switches
    to it between two calls of :meth:`Subscription.current`.

    The registry keeps the newest version only. The objects only an older
    version used are freed once no actor holds that version any more and
    their owner lets them go: with an :class:`~ray_zerocopy.Owner`, this call
    lets go of them; without one, the process that sealed them does when it
    drops its wrappers (or exits)."""
    import ray

    from .wrappers import ActorWrapper

    _check_name(name)
    if not isinstance(wrapper, ActorWrapper):
        raise InvalidInputError(f"publish takes an ActorWrapper, not {type(wrapper).__name__}")
    refs, blob = _split(wrapper)
    version, old = ray.get(_registry().publish.remote(name, refs, blob))
    owner = getattr(wrapper, "owner", None)
    if owner is not None and old:
        keep = {r.hex() for r in refs}
        gone = [r for r in old if r.hex() not in keep]
        if gone:
            owner.release(*gone)
    return version


def latest(name: str, *, timeout: float = 0.0):
    """The newest :class:`~ray_zerocopy.ActorWrapper` published as ``name``.
    Waits up to ``timeout`` seconds for a first version; raises
    :class:`~ray_zerocopy.errors.VersionNotFoundError` when there is none."""
    return _entry(name, 0, timeout)[1]


def versions() -> dict[str, int]:
    """``{name: newest version number}`` of everything published."""
    import ray

    return ray.get(_registry().names.remote())


def _entry(name: str, above: int, timeout: float):
    """``(version, wrapper)`` of ``name`` newer than ``above``."""
    import ray

    _check_name(name)
    entry = ray.get(_registry().wait_newer.remote(name, above, float(timeout)))
    if entry is None:
        raise VersionNotFoundError(f"nothing is published as {name!r} (waited {timeout:g} s)")
    version, refs, blob = entry
    return version, _join(refs, blob)


class Version(NamedTuple):
    """One loaded version: its number, the loaded pipeline and its wrapper."""

    number: int
    pipeline: object
    wrapper: object


class Subscription:
    """The newest version published as ``name``, loaded in this process.

    Made in an actor's ``__init__`` (a Serve replica, a Ray Data UDF class,
    any actor): it loads the newest version (waiting up to ``timeout``
    seconds for a first one), then a background thread waits for newer ones
    and loads each as it is published, zero-copy like any
    :meth:`~ray_zerocopy.ActorWrapper.load`. :meth:`current` returns the
    newest loaded :class:`Version`: take it once per request or batch and
    use only it, so that no request mixes two versions; a request in flight
    keeps its version alive until it returns, and the older version's memory
    goes once none does.

    ``load``: how a wrapper becomes the object handed out (default
    ``wrapper.load()``; e.g. ``lambda w: w.load().eval()``). A version that
    fails to load is logged and skipped: the previous one stays current."""

    def __init__(self, name: str, *, timeout: float = 60.0, load=None, wait: float = 30.0):
        self.name = _check_name(name)
        self._make = load or (lambda wrapper: wrapper.load())
        self._wait = float(wait)
        number, wrapper = _entry(name, 0, timeout)
        self._current = Version(number, self._make(wrapper), wrapper)
        self._failed = 0  # the newest version that failed to load: not retried
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"rzc-versions-{name}", daemon=True)
        self._thread.start()

    def current(self) -> Version:
        """The newest loaded version (an attribute read: no call, no lock)."""
        return self._current

    def latest(self):
        """The newest loaded pipeline (``current().pipeline``)."""
        return self._current.pipeline

    @property
    def version(self) -> int:
        """The newest loaded version's number."""
        return self._current.number

    def close(self) -> None:
        """Stops following new versions (the current one stays)."""
        self._closed.set()

    def _follow(self) -> None:
        import ray

        while not self._closed.is_set():
            try:
                above = max(self._current.number, self._failed)
                number, wrapper = _entry(self.name, above, self._wait)
            except VersionNotFoundError:
                continue  # nothing newer within the wait: ask again
            except Exception as e:  # the registry restarting, the cluster going down
                if self._closed.is_set() or not ray.is_initialized():
                    return
                logger.warning("following versions of %r: %s; retrying in 1 s", self.name, e)
                self._closed.wait(1.0)
                continue
            try:
                loaded = Version(number, self._make(wrapper), wrapper)
            except Exception as e:
                logger.warning("version %d of %r failed to load, keeping version %d: %s",
                               number, self.name, self._current.number, e)
                self._failed = number
                continue
            self._current = loaded
            logger.info("now serving version %d of %r", number, self.name)
