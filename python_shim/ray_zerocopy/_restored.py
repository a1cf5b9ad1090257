"""Whether a copy of a sealed object is the one sealed, where Ray may have
read it back from disk.

A load trusts the data digest a buffer's header claims: the sealed object
is immutable in memory, its pages are read-only wherever it is loaded, and
its header (which holds that digest) is checked against the wrapper's
content digest. A *spilled* object is another matter. When its object
store is full, Ray writes objects no process holds to disk (a file in its
spilling directory, or a bucket) and reads them back when they are next
asked for. Anyone who can write there can change that copy, a full disk
or a bad sector can damage it, and Ray reads it back without a check of its
own: one weight changed in a spill file loaded as changed, in a task and in
the driver, without a word (measured with Ray 2.60).

So each process, whenever it opens an object (the first time, and again
after it let go of it), asks whether Ray ever spilled it; where it did, every byte is hashed and compared with the
wrapper's content digest before the load builds anything it returns or
uploads anything to a device (:meth:`Check.wait`). The question is asked
once the copy is mapped here: a copy this process holds cannot be evicted
and read back any more, so "never spilled" then means this copy is the one
sealed.

Only the object's owner knows the answer (:func:`_store.spilled`). A
process that owns the object reads its own records. Any other asks the
owner: one call, made on a daemon thread of its own while the load builds
the pipeline (an owner that does not answer holds up only the loads of
its own objects, and never the interpreter's exit). A process's first call
to an owner costs 1.1-1.4 ms here (its channel is made), later ones
0.2-0.3 ms; asked before the build, a 398-tensor model's first load in a
fresh actor took 4.3 ms instead of 2.8. A load waits at most
``ANSWER_WAIT_S`` for the answer, then hashes anyway: the safe answer.

Not covered: Ray tells an owner that its object was spilled after it has
made the copy in memory evictable (asynchronously, in batches). A copy
evicted, read back and mapped within those few milliseconds, and the owner
asked before the news reached it, is taken as never spilled.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

from . import _store, _telemetry
from .errors import SealedObjectCorruptedError

#: How long a load waits for an owner's answer before it hashes anyway.
ANSWER_WAIT_S = 2.0


def ask(ray, ref) -> concurrent.futures.Future:
    """Starts asking whether Ray ever spilled ``ref``'s object (a future of
    :func:`_store.spilled`): answered at once where this process owns it,
    else by its owner on a thread of its own. Ask with the copy held."""
    asked: concurrent.futures.Future = concurrent.futures.Future()
    known = _store.spilled_if_owned(ray, ref)
    if known is not None:
        asked.set_result(known)
        return asked

    def run():
        asked.set_result(_store.ask_owner(ray, ref))  # never raises: "cannot tell" is True

    try:
        threading.Thread(target=run, name="ray_zerocopy-spilled", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down (a load at exit): no new thread, so check
        asked.set_result(True)
    return asked


def spilled(asked: concurrent.futures.Future) -> bool:
    """The answer to :func:`ask`; ``True`` (check) where none came in
    ``ANSWER_WAIT_S``."""
    try:
        return bool(asked.result(timeout=ANSWER_WAIT_S))
    except concurrent.futures.TimeoutError:
        return True


def corrupted(object_hex: str, why: str) -> SealedObjectCorruptedError:
    """The error for a copy of object ``object_hex`` read back from disk
    that is not the one sealed, ``why``."""
    return SealedObjectCorruptedError(
        f"the sealed weights (object {object_hex}) were spilled to disk by Ray's object store (or its owner could "
        f"not say), and the copy here is not the one sealed: {why}. ray-zerocopy does not load it. Something "
        "changed or damaged the spilled copy (its file under Ray's spilling directory, or the bucket it was "
        "spilled to); seal the model again, and give the object store room for it (object_store_memory) so "
        "that it is not spilled"
    )


class Check:
    """The pending check of one opened copy: the owner's answer, and where
    the object was spilled, every byte hashed. Shared by every load of the
    copy in this process; the first to :meth:`wait` hashes, the others
    wait for its verdict (a load of another object waits for nothing)."""

    def __init__(self, asked: concurrent.futures.Future | None, content_digest: bytes, object_hex: str, settled):
        self._asked = asked
        self._digest = content_digest
        self._hex = object_hex
        self._settled = settled  # settled(self, is the copy sealed), once known (holds no reference to the copy)
        self._lock = threading.Lock()
        self._why: str | None = None  # why the copy is not the one sealed, once known
        self._done = asked is None

    def wait(self, weights) -> None:
        """Returns once ``weights``, this check's copy, is known to be the
        one sealed; raises :class:`SealedObjectCorruptedError` where not."""
        if self._done and self._why is None:
            return
        with self._lock:
            if not self._done:
                if spilled(self._asked):
                    started = time.perf_counter()
                    if weights.content_digest(trust_claim=False) != self._digest:
                        self._why = "its content digest, computed from every byte, differs"
                    else:
                        _telemetry.verified_restored(self._hex, weights.nbytes, time.perf_counter() - started)
                self._done = True
                self._settled(self, self._why is None)
        if self._why is not None:
            raise corrupted(self._hex, self._why)


#: The check of a copy known to be the one sealed.
CHECKED = Check(None, b"", "", None)
