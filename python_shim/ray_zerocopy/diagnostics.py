"""Memory figures for checking what sharing saves.

PSS (proportional set size) is the honest measure for shared memory: a page
mapped by N processes counts 1/N to each, so summing PSS over processes counts
shared weights once. RSS counts them in full in every process.
"""

from __future__ import annotations

import os


def _rollup(pid: int | None) -> dict[str, int]:
    path = f"/proc/{pid or os.getpid()}/smaps_rollup"
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process (this one by default), in bytes."""
    return _rollup(pid)["Pss"]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), in bytes."""
    return _rollup(pid)["Rss"]


def pss_breakdown(pid: int | None = None) -> dict[str, int]:
    """PSS in bytes, split by what backs it: ``anon`` (private heap, copies),
    ``shmem`` (shared memory such as Ray's object store), ``file`` (mapped
    files, mostly shared libraries) and ``total``."""
    r = _rollup(pid)
    return {
        "total": r["Pss"],
        "anon": r.get("Pss_Anon", 0),
        "shmem": r.get("Pss_Shmem", 0),
        "file": r.get("Pss_File", 0),
    }
