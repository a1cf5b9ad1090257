"""Memory figures for checking what sharing saves, and the mappings they
come from: the one place the package reads ``/proc/<pid>/smaps_rollup`` and
``/proc/<pid>/maps``.

PSS (proportional set size) is the honest measure for shared memory: a page
mapped by N processes counts 1/N to each, so summing PSS over processes counts
shared weights once. RSS counts them in full in every process.
"""

from __future__ import annotations

import bisect
import os
from typing import NamedTuple


class Mapping(NamedTuple):
    """One line of ``/proc/<pid>/maps``: the range ``[start, end)``, its
    permissions (``"r--s"``), offset, device (``"00:1a"``), inode and path
    (``""`` for anonymous memory)."""

    start: int
    end: int
    perms: str
    offset: int
    device: str
    inode: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"


def mappings(pid: int | None = None) -> list[Mapping]:
    """Every mapping of a process (this one by default), in address order."""
    out = []
    with open(f"/proc/{pid or 'self'}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5].strip() if len(fields) > 5 else ""
            out.append(Mapping(lo, hi, fields[1], int(fields[2], 16), fields[3], int(fields[4]), path))
    return out


def mapping_at(address: int, within: list[Mapping] | None = None) -> Mapping | None:
    """The mapping holding ``address`` (in ``within``, a :func:`mappings`
    list, or this process's now), or ``None``."""
    rows = mappings() if within is None else within
    i = bisect.bisect_right(rows, address, key=lambda m: m.start) - 1
    return rows[i] if i >= 0 and rows[i].start <= address < rows[i].end else None


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
