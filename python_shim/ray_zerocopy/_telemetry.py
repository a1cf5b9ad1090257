"""What ray-zerocopy tells its users while it works: the standard ``logging``
logger ``ray_zerocopy`` (one INFO line per seal and per load, a WARNING for
every fallback) and metrics through ``ray.util.metrics``, which Ray exports
to its dashboard and to Prometheus (``ray_zerocopy_load_seconds``,
``ray_zerocopy_sealed_bytes``).

The library adds no handler: configure ``logging`` as usual (Ray's workers
forward INFO to the driver's console when ``logging.basicConfig(level=INFO)``
or Ray's logging configuration says so). Metrics are best effort: a failure
to record one never fails a seal or a load.
"""

from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("ray_zerocopy")

_metrics = None
_metrics_lock = threading.Lock()  # made once, however many threads load at once


def _ray_metrics():
    """The metrics, made once per process where Ray is initialized (they
    need a connected worker), else ``None``."""
    if _metrics is not None:
        return _metrics or None
    with _metrics_lock:
        return _make_metrics()


def _make_metrics():
    """:func:`_ray_metrics`, under its lock."""
    global _metrics
    if _metrics is None:
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return None
        try:
            from ray.util import metrics

            _metrics = (
                metrics.Histogram(
                    "ray_zerocopy_load_seconds",
                    description="Time to load a sealed pipeline in a process (open, adopt or upload, rebuild).",
                    boundaries=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10],
                    tag_keys=("device", "mode"),
                ),
                metrics.Counter(
                    "ray_zerocopy_sealed_bytes",
                    description="Bytes sealed into Ray's object store (each a single copy per node).",
                ),
            )
        except Exception as e:  # metrics must never fail the caller
            log.debug("metrics unavailable: %s", e)
            _metrics = ()
    return _metrics or None


def _record(update) -> None:
    """``update(load_seconds, sealed_bytes)`` applied to this process's
    metrics where there are any; a failure is logged, never raised."""
    m = _ray_metrics()
    if m:
        try:
            update(*m)
        except Exception as e:
            log.debug("could not record a metric: %s", e)


def prepare() -> None:
    """Makes this process's metrics (half a millisecond in a fresh Ray
    worker): called when a wrapper arrives in a process, so that ``load()``
    only records."""
    _ray_metrics()


def sealed(tensors: int, nbytes: int, seconds: float, object_id: str) -> None:
    """One sealed buffer went into the object store."""
    log.info("sealed %d tensors, %.1f MiB, in %.2f s as object %s", tensors, nbytes / 2**20, seconds, object_id)
    _record(lambda load_seconds, sealed_bytes: sealed_bytes.inc(nbytes))


def loaded(device: str, tensors: int, seconds: float, write_protected: bool, upload: dict | None) -> None:
    """A pipeline was loaded in this process; ``upload`` is the device
    upload's ``info()`` on a GPU."""
    protected = "write-protected" if write_protected else "not write-protected"
    if upload is None:
        mode, how = "zero-copy", f"zero-copy, {protected}"
    elif upload["sharing"] == "imported":
        mode, how = "shared", f"mapped the device copy another process uploaded (no copy), host copy {protected}"
    else:
        rate = upload["nbytes"] / upload["seconds"] / 1e9 if upload["seconds"] > 0 else float("inf")
        mode, how = "upload", (
            f"uploaded {upload['nbytes'] / 2**20:.1f} MiB at {rate:.1f} GB/s ({upload['staging']} staging"
            f"{', shared' if upload['sharing'] == 'uploaded' else ''}), host copy {protected}"
        )
    log.info("loaded %d tensors on %s: %s, in %.1f ms", tensors, device, how, seconds * 1e3)
    _record(lambda load_seconds, sealed_bytes: load_seconds.observe(seconds, tags={"device": device, "mode": mode}))


def verified_restored(object_id: str, nbytes: int, seconds: float) -> None:
    """A sealed object Ray may have read back from disk was checked, every
    byte, as this process opened it."""
    log.info(
        "checked every byte of object %s (%.1f MiB), which Ray may have read back from disk, in %.1f ms: as sealed",
        object_id,
        nbytes / 2**20,
        seconds * 1e3,
    )


#: Sealing shows a progress bar above this size when stderr is a terminal.
PROGRESS_MIN_BYTES = 1 << 30


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, what: str):
    """A progress bar over ``total`` bytes (``update(n)``, ``close()``) on
    stderr, as Ray Data shows one: only for at least ``PROGRESS_MIN_BYTES``,
    when stderr is a terminal and tqdm is installed; else one that shows
    nothing."""
    if total < PROGRESS_MIN_BYTES or not getattr(sys.stderr, "isatty", lambda: False)():
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def fallback(message: str, *args) -> None:
    """Something did not go the fast way and took a slower one."""
    log.warning(message, *args)
