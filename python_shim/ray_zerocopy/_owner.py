"""Sealed weights that outlive the process that sealed them.

Ray frees an object when its owner, the process that put it, exits. A Serve
application is usually deployed by a script that then exits, so weights it
sealed would be lost with it, and a replica that restarts later could not
load them. :class:`Owner` is a detached, named actor on the sealing node that
puts the sealed objects itself (so it owns them) and keeps them until told to
release them, or until it is closed.

The sealer still fills the object in place (``_store.put_buffer``): the
owner puts (``ray.put``) the zero pages and hands the reference back inside a
list (a reference at the top of a return value would be resolved by Ray);
the sealer maps it on the same node, fills it, and only then hands it out.
"""

from __future__ import annotations

import functools
import types
import weakref

from ._store import put_zero_pages
from .errors import InvalidInputError, InvalidTypeError, OwnerUnavailableError

__all__ = ["Owner", "NAMESPACE"]

#: The Ray namespace of every owner actor.
NAMESPACE = "ray_zerocopy"
_PREFIX = "owner:"
#: The concurrency group (one thread) of an owner actor's methods that only
#: read or change its tables, and so answer at once.
BOOKKEEPING = "bookkeeping"


class _OwnerActor:
    """The actor behind an :class:`Owner`: it holds the references of the
    objects it put, by hex id, until released; and, for the versions
    registry, a record of each name's newest version published with this
    owner, from which a registry made again (its actor died) takes its table
    back (``_registry.Registry``)."""

    def __init__(self):
        self._refs = {}
        self._records = {}  # version name -> (version, refs, blob, owner blob, the publish's stamp)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def put_zeros(self, nbytes: int) -> list:
        import ray

        ref = put_zero_pages(ray, nbytes)
        self._refs[ref.hex()] = ref
        return [ref]

    def adopt(self, refs: list) -> list:
        """Puts a copy of the object ``refs[0]`` (which this actor then owns)."""
        import ray

        value = ray.get(refs[0])
        ref = ray.put(value)
        del value
        self._refs[ref.hex()] = ref
        return [ref]

    def release(self, object_ids: list) -> int:
        return sum(self._refs.pop(h, None) is not None for h in object_ids)

    def objects(self) -> list:
        return list(self._refs)

    def remember(self, name: str, record: tuple) -> None:
        """Keeps ``record`` as the newest version of ``name`` published with
        this owner (the registry calls this, one publish of a name at a
        time, in the group ``BOOKKEEPING``: the one thread that changes
        the records)."""
        self._records[name] = record

    def forget(self, name: str, stamp: str | None = None) -> None:
        """Drops the record of ``name`` (a newer version has another owner, or
        the name was unpublished): the one of that ``stamp`` only, where
        given (the registry does not wait for a forget, so one may arrive
        after a newer version of the name was recorded here)."""
        record = self._records.get(name)
        if record is not None and (stamp is None or record[4] == stamp):
            del self._records[name]

    def records(self) -> list:
        """``[(name, record)]`` of every record (the references inside a
        list: Ray hands them over as references)."""
        return list(self._records.items())


class Hold:
    """The sealing process's claim on an object an owner keeps for it.

    An owner keeps what it owns for other processes: a wrapper sent to an
    actor, a task or a Serve application, put with ``ray.put``, or
    published. An object whose wrapper never left this process can have
    no holder elsewhere, and an owner kept it all the same: an update whose
    publish lost a race (``VersionConflictError``), a candidate that failed
    a check, each stayed in the store until ``owner.close()``, one more
    with each retry. So the object is released once every wrapper of it
    here is dropped, as an object without an owner is freed, unless it was
    :meth:`kept`: a wrapper of it (or of a version made from it) pickled,
    or its reference handed out (``wrapper.object_ref``). The release is
    made at the next call that seals, publishes or asks the owner
    (:func:`release_dropped`), not by the collector, which may run inside
    any call, Ray's own included."""

    __slots__ = ("_kept", "__weakref__")

    def __init__(self, owner: Owner, object_hex: str):
        self._kept = [False]
        weakref.finalize(self, _dropped_unless_kept, owner, object_hex, self._kept).atexit = False

    @property
    def kept(self) -> bool:
        return self._kept[0]

    def keep(self, kept: bool = True) -> None:
        self._kept[0] = kept


# (owner, object hex) of the objects whose holds went unkept: released by
# release_dropped. A list: the collector's callback only appends to it.
_dropped: list = []


def _dropped_unless_kept(owner, object_hex: str, kept: list) -> None:
    if not kept[0]:
        _dropped.append((owner, object_hex))


def release_dropped() -> None:
    """Has each owner release the objects sealed here whose wrappers were
    all dropped without leaving this process (see :class:`Hold`). An owner
    that does not answer keeps them (logged): they go with it when closed."""
    if not _dropped:
        return
    by_owner: dict = {}
    while True:
        # pop() and nothing else: another thread may empty the list between
        # a check that it has items and the pop (each pop is atomic).
        try:
            owner, object_hex = _dropped.pop()
        except IndexError:
            break
        by_owner.setdefault(owner, []).append(object_hex)
    for owner, ids in by_owner.items():
        if owner._closed:
            continue
        try:
            owner._call("release", ids, timeout=_RELEASE_WAIT)
        except Exception as e:  # noqa: BLE001 - the objects stay with the owner; nothing is lost
            from ._telemetry import log

            log.warning("Owner %r did not release %d dropped object(s): %s", owner.name, len(ids), e)


_RELEASE_WAIT = 30.0


@functools.cache
def _actor_class(ray):
    """The remote class of :class:`_OwnerActor`, its quick methods (which
    only read or change its tables) in the group :data:`BOOKKEEPING`, on a
    thread of their own: an owner busy putting a large model for its sealer
    (``put_zeros``, ``adopt``: seconds for hundreds of GB) must not hold up
    a publish (which records the version and releases the one it
    replaces), nor a registry made again taking its table back (which
    passes over an owner that does not answer, and so loses its names).
    The groups are the actor's own, fixed when it is made: callers name
    none, so an owner made by an earlier version of this package (without
    the group) is called as before, not refused by Ray."""
    quick = {}
    for name in ("node_id", "release", "objects", "remember", "forget", "records"):
        # A copy of each function is marked: marking _OwnerActor's own would
        # put every other actor made of it (a subclass) in a group it lacks.
        f = getattr(_OwnerActor, name)
        copy = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        copy.__qualname__, copy.__doc__ = f.__qualname__, f.__doc__
        quick[name] = ray.method(concurrency_group=BOOKKEEPING)(copy)
    grouped = type(_OwnerActor.__name__, (_OwnerActor,), {"__module__": __name__, **quick})
    return ray.remote(concurrency_groups={BOOKKEEPING: 1})(grouped)


class Owner:
    """A detached actor that owns sealed weights, so they outlive the process
    that sealed them (a script that deploys a Serve application and exits)::

        owner = Owner("classifier")
        wrapper = ActorWrapper(model, owner=owner)   # the owner's object

    ``Owner(name)`` gets the owner of that ``name`` (a string), creating it if
    there is none: two processes asking at once get the same actor. It lives
    in the Ray namespace ``"ray_zerocopy"``, on the node of the process that
    made it, uses no CPU, and stays until :meth:`close`, whatever happens to
    the process that made it. A wrapper sealed with an owner must be sealed
    on the owner's node: the sealing process fills the object the owner put
    in that node's object store, in place.

    The owner keeps every object sealed with it until released (:meth:`release`);
    Ray then frees each object once no process holds it (actors that loaded
    it keep it as long as they use it). One whose wrappers never left the
    sealing process (never pickled: sent to an actor, a task or a Serve
    application, put, published; nor its ``object_ref`` read) is released
    once they are all dropped there, as an object without an owner is
    freed: an update whose publish lost a race, a candidate that failed a
    check. Ray cannot count holders it does not
    see: a wrapper bound into a Serve application (``.bind(wrapper)``) is
    pickled by Serve outside Ray's reference counting, so release its
    objects only after the application is deleted (or publish a name and
    load with ``latest``/``Subscription``, which Ray counts). :meth:`close`
    ends the owner and frees everything it owns. An ``Owner`` pickles as its name: it can be
    passed to actors and tasks, which reach the same actor.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise InvalidTypeError(f"an Owner's name must be a string, not {type(name).__name__}")
        if not name:
            raise InvalidInputError("an Owner's name must not be empty")
        from .wrappers import _require_ray

        ray = _require_ray("making an Owner, an actor of the Ray cluster")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._name = name
        self._closed = False
        here = ray.get_runtime_context().get_node_id()
        # get_if_exists: the GCS creates the named actor once, and every
        # concurrent caller gets that one.
        self._actor = (
            _actor_class(ray)
            .options(
                name=self.actor_name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,  # a restarted owner would own nothing: it must look closed instead
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote()
        )

    @property
    def name(self) -> str:
        """The name the owner was asked for."""
        return self._name

    @property
    def actor_name(self) -> str:
        """The name of the owner's actor in the namespace ``"ray_zerocopy"``."""
        return _PREFIX + self._name

    def __getstate__(self):
        return {"_name": self._name}

    def __setstate__(self, state):
        self._name = state["_name"]
        self._closed = False
        self._actor = None  # found by name when first used

    def __repr__(self) -> str:
        return f"Owner({self._name!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Owner) and other._name == self._name

    def __hash__(self) -> int:
        return hash((Owner, self._name))

    # ------------------------------------------------------------------
    def _closed_error(self, why: str = "") -> InvalidInputError:
        return InvalidInputError(
            f"the Owner {self._name!r} is closed{why}: every object it owned was freed; make a new "
            f"Owner({self._name!r}) and seal again"
        )

    def _handle(self):
        if self._closed:
            raise self._closed_error()
        if self._actor is None:
            import ray

            try:
                self._actor = ray.get_actor(self.actor_name, namespace=NAMESPACE)
            except ValueError:
                self._closed = True
                raise self._closed_error(" (no actor of that name is alive)") from None
        return self._actor

    def _call(self, method: str, *args, timeout: float | None = None):
        import ray

        try:
            return ray.get(getattr(self._handle(), method).remote(*args), timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise OwnerUnavailableError(
                f"the Owner {self._name!r} did not answer {method} within {timeout:g} s (busy, stopped, or cut "
                "off); it may run when the owner answers, or not at all (Ray drops a call it cannot deliver)"
            ) from e
        except ray.exceptions.ActorUnavailableError as e:
            # Unreachable for now (a network partition, its node's raylet
            # restarting), not dead: what it owns may still be there, so the
            # owner is not marked closed, and the next call asks again.
            raise OwnerUnavailableError(
                f"the Owner {self._name!r} cannot be reached right now ({e}); try again"
            ) from e
        except ray.exceptions.RayActorError as e:
            self._closed = True
            raise self._closed_error(f" (its actor died: {type(e).__name__})") from e

    def _check_node(self, node_id: str) -> None:
        """Raises unless the owner's actor runs on the node ``node_id``."""
        where = self._call("node_id")
        if where != node_id:
            raise InvalidInputError(
                f"the Owner {self._name!r} runs on node {where}, but the weights are sealed on node {node_id}: "
                "an owner must be on the node of the process that seals (make the Owner with another name "
                "on this node, or seal on the owner's node)"
            )

    def _put_zeros(self, nbytes: int):
        """A new object of ``nbytes`` zero bytes put (and owned) by the owner."""
        return self._call("put_zeros", nbytes)[0]

    def _adopt(self, ref):
        """A reference to a copy of ``ref``'s object that the owner put (and owns)."""
        return self._call("adopt", [ref])[0]

    # ------------------------------------------------------------------
    def release(self, *object_refs, timeout: float | None = None) -> int:
        """Drops the owner's references to ``object_refs`` (``ObjectRef``
        objects or their hex ids, e.g. ``wrapper.object_ref``); Ray frees each object
        once no process holds it. Returns how many the owner held. With
        ``timeout``, waits at most that many seconds for the owner's answer
        (else :class:`~ray_zerocopy.OwnerUnavailableError`: the release may
        still be done when the owner answers, or not; ask again)."""
        ids = []
        for r in object_refs:
            if isinstance(r, str):
                ids.append(r)
            elif hasattr(r, "hex") and hasattr(r, "binary"):
                ids.append(r.hex())
            else:
                raise InvalidTypeError(f"Owner.release takes ObjectRefs or their hex ids, not {type(r).__name__}")
        release_dropped()
        return self._call("release", ids, timeout=timeout)

    def objects(self) -> list[str]:
        """The hex ids of the objects the owner holds."""
        release_dropped()
        return self._call("objects")

    def close(self) -> None:
        """Ends the owner's actor: Ray frees every object it owns. Actors
        that loaded one keep using their mapping until they drop it; a later
        load of it is not guaranteed (``SealedObjectLostError``): delete or
        update what uses the weights first. Closing a closed owner does
        nothing."""
        import ray

        if self._closed:
            return
        try:
            handle = self._handle()
        except InvalidInputError:
            return
        ray.kill(handle, no_restart=True)
        self._closed = True
        self._actor = None
