"""The versions registry: the cluster's table of the newest version
published under each name (see :mod:`ray_zerocopy._versions` for what is
built on it).

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
let it go: with an :class:`~ray_zerocopy.Owner`, ``publish`` lets go of
those objects itself.

What crosses the actor's boundary is plain tuples and lists, never a class
of this package: the registry lives as long as the cluster, and a process
running another version of the package may call it. :class:`Entry` and
:class:`Published` name their fields on each side.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import time
from typing import NamedTuple

from .errors import RayNotInitializedError, RegistryUnavailableError

__all__ = ["Entry", "Published", "Registry", "ask", "handle", "takes_fewer"]

_NAME = "ray_zerocopy.versions"
_NAMESPACE = "ray_zerocopy"
logger = logging.getLogger("ray_zerocopy")


class Entry(NamedTuple):
    """A name's newest version in the registry's table: its number, the
    wrapper pickled without its references (``blob``) and those references,
    and the wrapper's owner pickled by name (or ``None``)."""

    version: int
    refs: list
    blob: bytes
    owner: bytes | None


class Published(NamedTuple):
    """An entry as a caller gets it (``wait_newer``): the :class:`Entry`'s
    fields, then the generation of the registry that answered."""

    version: int
    refs: list
    blob: bytes
    owner: bytes | None
    generation: str


class Registry:
    """The cluster's table of published versions (a detached asyncio actor).

    Per name, an :class:`Entry`. Callers get it as a plain tuple with this
    registry's generation appended (:class:`Published` on their side): a
    subscriber that sees another generation (a registry made again)
    compares what it holds with the new registry's entry.

    **Surviving its actor.** The table lives in this actor's memory, and two
    things outside it let a registry made again (Ray restarts it where its
    process or node died; the next call makes it after a kill) take it back:

    - each publish writes the name's version number and a stamp of its own
      (random) to Ray's GCS key-value store, which lives as long as the
      cluster: what the newest publish of each name was (an ``unpublish``
      writes the number with the stamp ``-``: a name's numbers never go
      back, so one number is never two versions);
    - a version published with an :class:`~ray_zerocopy.Owner` also leaves a
      record (the entry, with its stamp) in that owner's actor, which holds
      the version's objects anyway; a newer version or ``unpublish`` makes
      the owner forget it.

    A registry made again takes back, per name, the owner's record whose
    stamp is the newest publish's, and only that one: a record some
    ``forget`` missed (its owner unreachable at the time) is stale, never
    taken, told to go, and the objects only it used are released. An owner
    that does not answer within ``_FIRST_WAIT`` is waited for in the
    background (its names come back when it answers, unless published or
    withdrawn since: see :meth:`_recover`). A name whose newest publish had
    no owner (or whose owner is gone) is not taken back (its objects die
    with the process that sealed them anyway), but its number is: the next
    version of it numbers on. Every publish and withdraw of a name runs
    under that name's lock, so the store, the records and the table change
    in one order; an owner's record of a replaced version is forgotten
    without waiting for the owner."""

    _OWNER_TIMEOUT = 30.0  # an owner that does not answer in time is passed over (logged)
    _KV_NAMESPACE = "ray_zerocopy"
    _KV_PREFIX = "versions/"
    _WITHDRAWN = "-"  # the stamp of a name unpublished (no record has it)

    def __init__(self):
        import asyncio
        import uuid

        self._asyncio = asyncio
        self._uuid = uuid
        self._generation = uuid.uuid4().hex
        self._entries = {}  # name -> Entry
        self._numbers = {}  # name -> newest version number, of names whose entry was not taken back
        self._events = {}  # name -> asyncio.Event, set (and replaced) on publish
        self._waiting = {}  # name -> how many calls wait on its event
        self._locks = {}  # name -> (asyncio.Lock, its holders and waiters): one publish or withdraw at a time
        self._recovery = None  # the task taking the table back, once
        self._unclaimed = {}  # name -> (version, stamp) of the store, until its owner's record is taken back
        self._tasks = set()  # calls to owners the registry does not wait for (kept from the collector)
        self._publishing = []  # the references of each publish under way (in no entry yet)
        self._stamp_of = {}  # name -> the stamp of its entry's publish (what its owner's record holds)

    def _event(self, name):
        if name not in self._events:
            self._events[name] = self._asyncio.Event()
        return self._events[name]

    @contextlib.asynccontextmanager
    async def _lock(self, name):
        """Holds ``name``'s lock; the lock goes once no call holds or waits
        for it (a service that publishes and unpublishes many names keeps
        none of theirs)."""
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = self._asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def _entry(self, name):
        entry = self._entries.get(name)
        return None if entry is None else (*entry, self._generation)

    def _newest(self, name) -> int:
        entry = self._entries.get(name)
        return entry.version if entry else self._numbers.get(name, 0)

    def _unused(self, refs) -> list:
        """Of ``refs``, those no entry (nor publish under way) refers to."""
        held = {r.hex() for entry in self._entries.values() for r in entry.refs}
        held.update(r.hex() for refs_ in self._publishing for r in refs_)
        return [r for r in refs if r.hex() not in held]

    # -- what outlives the actor ------------------------------------------------
    async def _blocking(self, fn, timeout: float | None = None):
        """``fn()`` (a blocking Ray call) on a thread, waited on for at most
        ``timeout`` seconds."""
        call = self._asyncio.get_running_loop().run_in_executor(None, fn)
        return await self._asyncio.wait_for(call, timeout)

    async def _kv(self, name: str, value: str) -> None:
        """Writes ``name``'s ``"version stamp [owner's actor name]"`` to the GCS key-value store."""
        from ray.experimental import internal_kv

        key = self._KV_PREFIX + name
        await self._blocking(
            lambda: internal_kv._internal_kv_put(key, value, namespace=self._KV_NAMESPACE), self._OWNER_TIMEOUT
        )

    async def _stamps(self) -> dict:
        """``{name: (version, stamp, owner's actor name or None)}`` of every
        name's newest publish (or unpublish)."""
        from ray.experimental import internal_kv

        def read():
            out = {}
            for key in internal_kv._internal_kv_list(self._KV_PREFIX, namespace=self._KV_NAMESPACE):
                value = internal_kv._internal_kv_get(key, namespace=self._KV_NAMESPACE)
                if value is not None:
                    version, stamp, *owner = value.decode().split(" ", 2)
                    out[key.decode()[len(self._KV_PREFIX) :]] = (int(version), stamp, owner[0] if owner else None)
            return out

        return await self._blocking(read, self._OWNER_TIMEOUT)

    _NO_ANSWER = object()  # what _owner_call returns where the owner did not answer

    async def _owner_call(self, owner_name: str, method: str, *args, wait=None, again=None):
        """``method(*args)`` of the owner actor ``owner_name``, or
        ``_NO_ANSWER`` (logged) where it is gone, or silent for ``wait`` seconds (default
        ``_OWNER_TIMEOUT``). With ``again`` (a function), a call that met a
        silent owner (never reached: Ray drops a call it cannot deliver; or
        no answer in time) is made again 1, 2, 4, ... 60 s later, for as
        long as the owner lives and ``again()`` says it is still wanted:
        the calls it is used for can be made twice. An owner made by an
        earlier version of this package, whose ``forget`` takes no stamp,
        is asked without it."""
        import ray

        from ._owner import NAMESPACE

        pause = 1.0
        while True:
            try:
                actor = await self._blocking(
                    lambda: ray.get_actor(owner_name, namespace=NAMESPACE), self._OWNER_TIMEOUT
                )
                ref = getattr(actor, method).remote(*args)
                return await self._asyncio.wait_for(
                    self._asyncio.wrap_future(ref.future()), wait or self._OWNER_TIMEOUT
                )
            except Exception as e:  # noqa: BLE001 - the registry serves on without this owner's part
                if method == "forget" and len(args) == 2 and takes_fewer(e):
                    args = args[:1]  # an earlier owner: forget(name)
                    continue
                gone = isinstance(e, ValueError) or (
                    isinstance(e, ray.exceptions.RayActorError)
                    and not isinstance(e, ray.exceptions.ActorUnavailableError)
                )
                retry = again is not None and not gone and again()
                logger.warning("versions registry: %s of owner %r failed: %s: %s%s", method, owner_name,
                               type(e).__name__, e, f"; asking again in {pause:g} s" if retry else "")
                if not retry:
                    return self._NO_ANSWER
            await self._asyncio.sleep(pause)
            pause = min(2 * pause, 60.0)

    @staticmethod
    def _owner_name(owner_blob):
        return None if owner_blob is None else pickle.loads(owner_blob).actor_name

    async def _ready(self) -> None:
        """Waits until the table is taken back (every call does, so that
        nothing is answered from a table still being filled)."""
        if self._recovery is None:
            self._recovery = self._asyncio.ensure_future(self._recover())
        try:
            await self._asyncio.shield(self._recovery)
        except Exception as e:  # noqa: BLE001 - logged once; the registry serves what it has
            if self._recovery is not None:
                logger.warning("versions registry: taking the table back failed: %s: %s", type(e).__name__, e)
            self._recovery = self._asyncio.get_running_loop().create_future()
            self._recovery.set_result(None)

    _FIRST_WAIT = 5.0  # s: the calls wait this long for the owners of the names to take back

    async def _recover(self) -> None:
        """Takes the table back: every name's number from the store, and
        each name's entry from the record of its newest publish in that
        publish's owner. Calls wait for the owners named in the store for
        at most ``_FIRST_WAIT`` seconds (every owner is asked: records a
        missed ``forget`` left are cleared, and a name whose store value
        names no owner, as an earlier version of this package wrote it, is
        taken back from the owner holding its stamp); an owner that has not
        answered by then (busy, stopped, cut off) is asked again in the
        background, and its names are taken back when it answers, unless
        published or unpublished since (see :meth:`_take_back`)."""
        import ray

        from ._owner import _PREFIX, NAMESPACE

        stamps = await self._stamps()
        if not stamps:
            return  # a first registry, or nothing published: no owner holds a record worth asking for
        self._numbers = {name: version for name, (version, _, _) in stamps.items()}
        self._unclaimed = {
            name: (version, stamp)
            for name, (version, stamp, _) in stamps.items()
            # with or without an owner's name: an earlier version's value names
            # none, and the owner holding its stamp is found among all asked
            if stamp != self._WITHDRAWN
        }
        named = {stamps[name][2] for name in self._unclaimed if stamps[name][2] is not None}
        try:
            listed = await self._blocking(
                lambda: ray.util.list_named_actors(all_namespaces=True), self._OWNER_TIMEOUT
            )
            others = {a["name"] for a in listed if a["namespace"] == NAMESPACE and a["name"].startswith(_PREFIX)}
        except Exception as e:  # noqa: BLE001 - the owners named in the store are asked all the same
            logger.warning("versions registry: cannot list the owners: %s: %s", type(e).__name__, e)
            others = set()
        asked = [self._background(self._take_back(o)) for o in sorted(named | others)]
        if asked:
            await self._asyncio.wait(asked, timeout=self._FIRST_WAIT)
        logger.info("versions registry: took back %d of %d name(s); %d wait for their owner",
                    len(self._entries), len(stamps), len(self._unclaimed))

    def _background(self, coro):
        """``coro`` run as a task the caller does not wait for (held until done)."""
        task = self._asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _take_back(self, owner_name: str) -> None:
        """Asks owner ``owner_name`` for its records, again and again as long
        as it lives and does not answer. A record whose name still waits
        for it (same version and stamp as the store's newest publish) is
        taken back; any other is stale (left by a ``forget`` that missed,
        or replaced while the owner was silent) and told to go, and the
        objects only it used are released by the owner."""
        records = await self._owner_call(owner_name, "records", wait=self._FIRST_WAIT, again=lambda: True)
        if records is self._NO_ANSWER:
            return  # gone: its names with it (their objects died with it)
        stale = []
        for name, (version, refs, blob, owner_blob, stamp) in records:
            async with self._lock(name):  # not while a publish or withdraw of it runs
                if self._unclaimed.get(name) == (version, stamp) and name not in self._entries:
                    del self._unclaimed[name]
                    self._entries[name] = Entry(version, refs, blob, owner_blob)
                    self._stamp_of[name] = stamp
                    self._numbers.pop(name, None)
                    self._wake(name)
                else:
                    stale.append((name, refs, stamp))
        # Objects of this owner are used only by versions published with it,
        # whose records are all in this answer: those of stale records that
        # no entry uses are no version's.
        gone = self._unused([r for _, refs, _ in stale for r in refs])
        for name, _, stamp in stale:
            self._background(self._owner_call(owner_name, "forget", name, stamp, again=lambda: True))
        if gone:
            self._release_later(owner_name, [r.hex() for r in gone])

    def _wake(self, name) -> None:
        """Wakes every wait for a newer entry of ``name``."""
        self._event(name).set()
        self._events[name] = self._asyncio.Event()

    # -- the calls -------------------------------------------------------------
    async def publish(self, name, refs, blob, owner, replaces=None):
        """Makes the entry of ``name`` the newest; returns its version and,
        of the replaced entry, the references no entry uses any more with
        that entry's owner (the publisher lets that owner go of them). With
        ``replaces``, only if the newest version is that one (0: none yet);
        else nothing changes and the version returned is ``None``, with the
        published version's number (0: none) in place of the references.
        Where nothing is published (unpublished, or not taken back by a
        registry made again), 0 is met as well as the name's last number."""
        await self._ready()
        async with self._lock(name):
            self._publishing.append(refs)
            try:
                return await self._publish(name, refs, blob, owner, replaces)
            finally:
                self._publishing.remove(refs)

    async def _publish(self, name, refs, blob, owner, replaces):
        """:meth:`publish`, under the name's lock."""
        old = self._entries.get(name)
        newest = self._newest(name)
        if replaces is not None and replaces != newest and not (replaces == 0 and old is None):
            return None, (old.version if old else 0), None  # the version published now (0: none)
        # A version still waiting for its silent owner is replaced: its
        # record is stale from now on, and goes when the owner answers.
        self._unclaimed.pop(name, None)
        version, stamp = newest + 1, self._uuid.uuid4().hex
        # The store first (what the newest publish is, and whose record
        # holds it), then the new owner's record, then the replaced
        # owner's forget: a registry made again between two of these
        # steps takes back this version or none, never the replaced one.
        owner_name = self._owner_name(owner)
        await self._kv(name, f"{version} {stamp}" + (f" {owner_name}" if owner_name else ""))
        if owner_name is not None:
            record = (version, refs, blob, owner, stamp)
            if await self._owner_call(owner_name, "remember", name, record, wait=self._FIRST_WAIT) is self._NO_ANSWER:
                # Silent: asked again in the background while this version
                # is the name's (a registry made again meanwhile would not
                # find it: the name numbers on, its version not taken back).
                self._background(self._owner_call(
                    owner_name, "remember", name, record, again=lambda: self._stamp_of.get(name) == stamp
                ))
        old_owner = self._owner_name(old.owner) if old else None
        if old_owner is not None and old_owner != owner_name:
            # Not waited for: a silent owner must not hold up the name (its
            # stale record is never taken back, thanks to the stamp), and a
            # late forget drops that record only, not a newer one.
            self._background(self._owner_call(old_owner, "forget", name, self._stamp_of.get(name), again=lambda: True))
        self._entries[name] = Entry(version, refs, blob, owner)
        self._stamp_of[name] = stamp
        self._numbers.pop(name, None)
        self._wake(name)
        return version, (self._unused(old.refs) if old else []), (old.owner if old else None)

    async def withdraw(self, name):
        """Removes ``name``'s entry; returns what :meth:`publish` returns of
        it. Its number stays (in the store too, without a stamp, so no
        record is taken back for it): a version published as ``name`` later
        numbers on. Numbered from 1 again, it would have two versions of
        one number, and a subscriber holding the old one would take the
        new ones for older, and keep the old weights."""
        await self._ready()
        async with self._lock(name):
            self._unclaimed.pop(name, None)
            newest = self._newest(name)
            if newest:
                await self._kv(name, f"{newest} {self._WITHDRAWN}")
                self._numbers[name] = newest
            old = self._entries.pop(name, None)
            stamp = self._stamp_of.pop(name, None)
            event = self._events.pop(name, None)  # made again by the next wait for it
            if event is not None:
                event.set()  # its waits look again, and wait on that one
            if old is None:
                return [], None
            if (owner_name := self._owner_name(old.owner)) is not None:
                self._background(self._owner_call(owner_name, "forget", name, stamp, again=lambda: True))
            return self._unused(old.refs), old.owner

    def _release_later(self, owner_name: str, object_ids: list) -> None:
        """Has owner ``owner_name`` release ``object_ids``, asked again until
        it answers (or is gone)."""
        self._background(self._owner_call(owner_name, "release", object_ids, again=lambda: True))

    async def release_later(self, owner_name: str, object_ids: list) -> None:
        """:meth:`_release_later`, for a publisher whose owner of a replaced
        version did not answer (the publisher may be gone before it does)."""
        await self._ready()
        self._release_later(owner_name, object_ids)

    async def wait_newer(self, name, version, generation, timeout):
        """The entry of ``name`` once it is newer than ``version`` of
        ``generation`` (any entry, for another generation), or ``None``
        after ``timeout`` seconds."""
        await self._ready()
        if generation != self._generation:
            version = 0
        deadline = time.monotonic() + timeout
        while True:
            entry = self._entries.get(name)
            if entry is not None and entry.version > version:
                return self._entry(name)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await self._wait(name, left)
            except self._asyncio.TimeoutError:
                return None

    async def _wait(self, name, seconds: float) -> None:
        """Waits at most ``seconds`` for the next publish of ``name``. The
        event of a name without an entry goes once no call waits on it: a
        wait for a name never published (a multiplexed model id from a
        client's request) kept one, for the registry's life, per name."""
        event = self._event(name)
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            await self._asyncio.wait_for(event.wait(), seconds)
        finally:
            left = self._waiting.pop(name) - 1
            if left:
                self._waiting[name] = left
            elif name not in self._entries and self._events.get(name) is event:
                del self._events[name]

    async def names(self):
        await self._ready()
        return {name: entry.version for name, entry in self._entries.items()}


_handle = None  # (Ray session name, the registry's handle) of this process


def handle(start_ray: bool = True):
    """The registry actor, made by the first process that needs it. A call
    made before ``ray.init()`` starts Ray as Ray's own calls do
    (``start_ray``); a subscription's background thread never does (after
    ``ray.shutdown()`` it ends instead of starting a new Ray)."""
    global _handle
    from .wrappers import _require_ray

    if start_ray:
        ray = _require_ray("publishing or reading versions; they are published in a Ray cluster")
    else:
        import ray

        if not ray.is_initialized():
            raise RayNotInitializedError("Ray was shut down")
    session = ray.get_runtime_context().get_session_name()
    if _handle is None or _handle[0] != session:
        try:  # the common case: it exists (no look at the cluster's nodes)
            actor = ray.get_actor(_NAME, namespace=_NAMESPACE)
        except ValueError:
            actor = (
                ray.remote(Registry)
                .options(
                    name=_NAME,
                    namespace=_NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_concurrency=10_000,
                    # Ray makes it again where its process or node died; it
                    # takes its table back (see Registry).
                    max_restarts=-1,
                    # On the head node where there is one: the node that lives
                    # as long as the cluster (an autoscaler takes a worker node
                    # away once its CPUs are idle, and this actor holds none).
                    scheduling_strategy=_on_the_head(ray),
                )
                .remote()
            )
        _handle = (session, actor)
    return _handle[1]


def _on_the_head(ray):
    """A soft affinity to the head node, or ``None`` where none is named."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        nodes = ray.nodes()
    except Exception:  # noqa: BLE001 - placement is a preference only
        return None
    for node in nodes:
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
    return None


_READS = frozenset({"wait_newer", "names"})  # calls that change nothing: made twice where need be


def ask(method: str, *args, timeout: float | None = None, start_ray: bool = True):
    """Calls the registry; a registry that died is made again on the next
    call, and the failure is a :class:`RegistryUnavailableError`. A read
    that met a registry this process knew before (its handle kept from an
    earlier call) is made once more, on the registry there is now: after
    one was killed and made again elsewhere, the first read of every
    process that had used it failed (an actor's ``Subscription`` made in
    its ``__init__`` with it)."""
    global _handle
    import ray

    for attempt in range(2):
        known = _handle is not None
        try:
            ref = getattr(handle(start_ray), method).remote(*args)
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            _handle = None
            if attempt == 0 and known and method in _READS:
                continue
            raise RegistryUnavailableError(f"the versions registry ({_NAME}) is unavailable: {e}") from e


def takes_fewer(e: Exception) -> bool:
    """Whether ``e`` (a remote call's error) says the method takes fewer
    arguments than it was given: an actor made by an earlier version of this
    package (it lives as long as the cluster). Told by the message, not the
    class alone: any other ``TypeError`` of the call is a fault to report as
    it is, not taken for an older actor."""
    return isinstance(e, TypeError) and "positional argument" in str(e)
