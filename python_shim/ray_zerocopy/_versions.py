"""Versions of a model published under a name, and read by any actor.

``publish(name, wrapper)`` makes ``wrapper`` the newest version of ``name``
for the whole Ray cluster; ``latest(name)`` returns it; a
:class:`Subscription` keeps the newest version loaded in its process and
follows new ones in the background, so that a request or a batch only reads
an attribute.

Names and their newest versions live in one registry actor
(:mod:`ray_zerocopy._registry`), which outlives the processes that call it;
this module is its callers' side: publishing, reading, and following.
"""

from __future__ import annotations

import gc
import io
import logging
import pickle
import threading
import time
import weakref
from typing import NamedTuple

from . import _registry
from ._registry import Published, ask
from ._registry import Registry as _Registry  # noqa: F401 - where registries made by earlier versions find their class
from .errors import (
    InvalidInputError,
    OwnerUnavailableError,
    RayZeroCopyError,
    RegistryUnavailableError,
    VersionConflictError,
    VersionNotFoundError,
)

__all__ = ["publish", "unpublish", "latest", "versions", "Subscription", "Version"]

logger = logging.getLogger("ray_zerocopy")

_RELEASE_WAIT = 10.0  # s: how long a publish waits for the replaced version's owner to release its objects


def _let_go(gone: list, owner_blob) -> None:
    """The owner of a replaced or withdrawn version lets go of ``gone``."""
    if not gone or owner_blob is None:
        return
    import ray

    owner = pickle.loads(owner_blob)
    for attempt in range(3):
        try:
            owner.release(*gone, timeout=_RELEASE_WAIT)
            return
        except OwnerUnavailableError as e:  # unreachable for now: ask again, a second later
            if isinstance(e.__cause__, ray.exceptions.GetTimeoutError):
                # Silent (busy, stopped, cut off): the publish does not wait
                # for it; the registry, which outlives this process, asks
                # it again until it answers.
                try:
                    ask("release_later", owner.actor_name, [r.hex() for r in gone])
                    logger.warning("the owner %r of a replaced version did not answer in %g s: the registry "
                                   "will have it release %d object(s) when it does", owner, _RELEASE_WAIT, len(gone))
                except Exception as e2:  # noqa: BLE001 - an earlier registry: the call may still arrive
                    logger.warning("could not release %d object(s) of a replaced version from %r: %s; %s",
                                   len(gone), owner, e, e2)
                return
            if attempt == 2:
                logger.warning("could not release %d object(s) of a replaced version from %r: %s",
                               len(gone), owner, e)
            else:
                time.sleep(1.0)
        except RayZeroCopyError as e:  # a closed owner has let go of everything already
            logger.warning("could not release %d object(s) of a replaced version from %r: %s", len(gone), owner, e)
            return


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


def publish(name: str, wrapper, *, replaces: int | None = None) -> int:
    """Makes ``wrapper`` (an :class:`~ray_zerocopy.ActorWrapper`, e.g. made by
    :meth:`~ray_zerocopy.ActorWrapper.update`) the newest version of ``name``
    in this Ray cluster and returns its version number (1, 2, ...). Every
    :class:`Subscription` to ``name`` loads it in the background and switches
    to it between two calls of :meth:`Subscription.current`.

    The registry keeps the newest version of each name. When a version is
    replaced, the objects that no published version uses any more are let go
    by the replaced version's :class:`~ray_zerocopy.Owner` (if it had one),
    and Ray frees each once no process holds it. Without an owner, the
    process that sealed them frees them when it drops its wrappers (or
    exits). Wrappers bound into a Serve application (``.bind(wrapper)``) are
    pinned by Serve until the application is deleted: publish a name and
    load with :func:`latest` or :class:`Subscription` instead when versions
    change while the application runs.

    ``replaces``: the version number this one is meant to follow (the one it
    was made from by ``update``; 0 for the first, or where nothing is
    published as ``name`` now). When another version is newest by then
    (someone else published in between), nothing is published and
    :class:`~ray_zerocopy.errors.VersionConflictError` says which is
    newest: two publishers updating the same version cannot drop each
    other's change without a word. ``None`` (the default) replaces
    whatever is newest. The check is one step in the registry.

    Numbers never go back: a name published again after :func:`unpublish`
    numbers on. A registry made again (its actor died) takes back every
    name's newest version that was published with an
    :class:`~ray_zerocopy.Owner` (when that owner answers); a name whose
    newest version had no owner is not taken back, but numbers on."""
    from .wrappers import ActorWrapper, _check_session

    _check_name(name)
    if not isinstance(wrapper, ActorWrapper):
        raise InvalidInputError(f"publish takes an ActorWrapper, not {type(wrapper).__name__}")
    _check_session(wrapper)  # a version every subscriber would fail to load
    from ._owner import release_dropped

    release_dropped()
    # Pickled for the registry, its objects are kept by their owner (see
    # _owner.Hold), unless the registry refuses it: then, as before.
    holds = wrapper._holds()
    kept = [h.kept for h in holds]
    refs, blob = _split(wrapper)
    owner = None if wrapper.owner is None else pickle.dumps(wrapper.owner)
    if replaces is not None and (not isinstance(replaces, int) or isinstance(replaces, bool) or replaces < 0):
        raise InvalidInputError(f"replaces must be a version number (an int >= 0), not {replaces!r}")
    # ``replaces`` only when given: a registry an earlier version of the
    # package made (it lives as long as the cluster) takes four arguments.
    args = (name, refs, blob, owner) if replaces is None else (name, refs, blob, owner, replaces)
    try:
        version, gone, old_owner = ask("publish", *args)
    except TypeError as e:  # Ray's task error is also the remote exception's class
        if replaces is None or not _registry.takes_fewer(e):
            raise
        raise RegistryUnavailableError(
            f"the versions registry ({_registry._NAME}) was made by an earlier version of ray-zerocopy, which has no "
            "publish(replaces=): publish without it, or make the registry again with this version"
        ) from e
    if version is None:
        for h, k in zip(holds, kept, strict=True):
            h.keep(k)  # not published: dropped without having left this process, it is released
        if not gone:
            raise VersionConflictError(
                f"{name!r} was not published: no version of it is published now (it was unpublished, or not "
                f"taken back by a registry made again), not version {replaces}. Publish with replaces=0"
            )
        raise VersionConflictError(
            f"{name!r} was not published: version {gone} is the newest, not version {replaces}; someone else "
            f"published in between. Update the newest with your change and publish that: v = "
            f"ray_zerocopy.latest({name!r}); publish({name!r}, v.update(change), replaces=v.version)"
        )
    _let_go(gone, old_owner)
    return version


def unpublish(name: str) -> None:
    """Removes ``name`` from the registry; its newest version's objects that
    no other name uses are let go by its owner, as :func:`publish` does for
    a replaced version. Subscriptions keep the version they hold. A version
    published as ``name`` later numbers on from the last one."""
    gone, owner = ask("withdraw", _check_name(name))
    _let_go(gone, owner)


def latest(name: str, *, timeout: float = 0.0):
    """The newest :class:`~ray_zerocopy.ActorWrapper` published as ``name``,
    its number in its ``version`` attribute, read with it in one call
    (``v = latest(name)``, ``publish(name, v.update(sd), replaces=v.version)``:
    a number read apart, by :func:`versions`, may be a newer version's).
    Waits up to ``timeout`` seconds for a first version; raises
    :class:`~ray_zerocopy.errors.VersionNotFoundError` when there is none.
    It asks the registry (a remote call): in an ``async`` method, call it
    through ``await asyncio.to_thread(...)``."""
    entry = _entry(name, 0, None, timeout)
    wrapper = _join(entry.refs, entry.blob)
    wrapper.version = entry.version
    return wrapper


def versions() -> dict[str, int]:
    """``{name: newest version number}`` of everything published."""
    return ask("names")


def _entry(name: str, above: int, generation, timeout: float) -> Published:
    """The registry's entry of ``name`` newer than ``above`` (of ``generation``)."""
    _check_name(name)
    entry = ask("wait_newer", name, above, generation, float(timeout))
    if entry is None:
        raise VersionNotFoundError(f"nothing is published as {name!r} (waited {timeout:g} s)")
    return Published._make(entry[:5])  # a later registry may add fields


def _source(entry: Published) -> tuple:
    """What identifies a published wrapper exactly: its version number, its
    pickle and its objects."""
    return entry.version, entry.blob, tuple(r.hex() for r in entry.refs)


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
    use only it, so that no request mixes two versions. A request in flight
    keeps its version alive until it returns; an older version's memory goes
    once no request uses it (or when the subscription is closed or dropped).

    ``load``: how a wrapper becomes the object handed out (default
    ``wrapper.load()``; e.g. ``lambda w: w.load().eval()``). A version that
    fails to load is logged, the previous one stays current, and it is tried
    again after 1 s, then 2, 4, ... up to every 60 s, until it loads or a
    newer one is published: a failure that passes (device memory while two
    versions are resident, an object not fetched in time) does not leave
    this process behind the others for good."""

    def __init__(self, name: str, *, timeout: float = 60.0, load=None):
        self._closed = threading.Event()  # first: __del__ closes a subscription whose __init__ failed too
        self.name = _check_name(name)
        self._make = load or (lambda wrapper: wrapper.load())
        entry = _entry(name, 0, None, timeout)
        wrapper = _join(entry.refs, entry.blob)
        self._current = Version(entry.version, self._make(wrapper), wrapper)
        self._generation = entry.generation
        self._source = _source(entry)  # of the current version
        self._failed = 0  # the newest version that failed to load (0: none)
        self._failed_generation = None  # the registry's generation it was of
        self._retry_at, self._backoff = 0.0, 0.0  # when to try it again, and the wait before
        self._replaced = ()  # objects only the version last replaced used, while maybe held (see _sweep)
        self._replaced_on_device = False
        self._sweeps, self._sweep_at = 0, 0.0
        # The thread holds the subscription weakly: a subscription dropped
        # without close() stops following (and frees its version) all the same.
        self._thread = threading.Thread(
            target=_follow, args=(weakref.ref(self),), name=f"rzc-versions-{name}", daemon=True
        )
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
        """Stops following new versions within a second (the current one stays)."""
        self._closed.set()

    __del__ = close

    def _apply(self, entry: Published) -> None:
        """Loads the version of the registry's ``entry`` and makes it current
        (unless closed). The version this process holds already, as a
        registry made again names it, is only noted as that registry's."""
        number, refs, blob, _, generation = entry
        if _source(entry) == self._source:
            self._generation = generation
            if self._failed_generation != generation:
                # A failed version of the registry that died: moot (the new
                # one names what is newest), and a wait past it would ask
                # the new registry about the old one's numbers, again and
                # again, until its retry came due.
                self._failed, self._failed_generation = 0, None
            return
        try:
            wrapper = _join(refs, blob)
        except Exception as e:
            self._fail(number, generation, "cannot be read", e)
            return
        try:
            loaded = Version(number, self._make(wrapper), wrapper)
        except Exception as e:
            self._fail(number, generation, "failed to load", e)
            return
        if not self._closed.is_set():
            old, old_source = self._current, self._source
            self._current, self._generation, self._failed, self._backoff = loaded, generation, 0, 0.0
            self._source = _source(entry)
            logger.info("now serving version %d of %r", number, self.name)
            self._replaced = tuple(set(old_source[2]) - set(self._source[2]))
            self._replaced_on_device = not str(getattr(old.wrapper, "device", "cpu")).startswith("cpu")
            self._sweeps, self._sweep_at = 0, 0.0
            del old
            self._sweep()

    _SWEEPS = 8  # collections after a switch: at once, then 1, 2, 4, ... 64 s later

    def _sweep(self) -> None:
        """A full garbage collection while the version last replaced may be
        held by nothing but a reference cycle. A pipeline in a cycle (a
        module holding its own bound method, a closure over itself) that
        served for a while is in the oldest generation, freed only by a full
        collection, which may be long in coming (and a process's first load
        moves what it makes there, uncounted): each version replaced then
        kept its objects in the store (or its device copy) until one came,
        one more version with each publish. Collected at
        the switch, then again 1, 2, 4, ... 64 s later (a request in flight
        keeps the version until it returns), and no more once no handle or
        host tensor of the objects only that version used is open in this
        process (for a host load; a device load is collected on the whole
        schedule)."""
        if not self._replaced or time.monotonic() < self._sweep_at:
            return
        from . import _load

        if not self._replaced_on_device and not any(_load.holds(h) for h in self._replaced):
            self._replaced = ()
            return
        gc.collect()
        self._sweeps += 1
        if self._sweeps >= self._SWEEPS:
            self._replaced = ()
        self._sweep_at = time.monotonic() + 2.0 ** (self._sweeps - 1)

    def _fail(self, number: int, generation, what: str, error: Exception) -> None:
        """Version ``number`` could not be had: tried again after a wait that
        doubles with each failure of that version, up to a minute."""
        same = (number, generation) == (self._failed, self._failed_generation)
        self._backoff = min(60.0, self._backoff * 2) if same else 1.0
        # Not the current version's generation: a registry made again numbers
        # from 1, and the current version's number must keep its own.
        self._failed, self._failed_generation = number, generation
        self._retry_at = time.monotonic() + self._backoff
        logger.warning("version %d of %r %s, keeping version %d, trying again in %.0f s: %s",
                       number, self.name, what, self._current.number, self._backoff, error)

    def _newer_than(self) -> tuple:
        """The version (and the registry's generation it is of) the next wait
        is for newer ones than: past a failed version until its retry is due,
        else the current one."""
        if self._failed and time.monotonic() < self._retry_at:
            if self._failed_generation == self._generation:
                return max(self._current.number, self._failed), self._generation
            return self._failed, self._failed_generation
        return self._current.number, self._generation


def _follow(subscription: weakref.ref) -> None:
    """A subscription's background thread: waits in the registry for a newer
    version, a second at a time (so that close() or a drop ends it soon)."""
    import ray

    while (sub := subscription()) is not None and not sub._closed.is_set():
        name, (above, generation) = sub.name, sub._newer_than()
        closed = sub._closed
        del sub  # not held while waiting
        try:
            entry = ask("wait_newer", name, above, generation, 1.0, start_ray=False)
        except Exception as e:  # the registry made again, the cluster going down
            if closed.is_set() or not ray.is_initialized():
                return
            logger.warning("following versions of %r: %s; retrying in 1 s", name, e)
            closed.wait(1.0)
            continue
        sub = subscription()
        if entry is not None and sub is not None:
            sub._apply(Published._make(entry[:5]))
        if sub is not None:
            sub._sweep()
