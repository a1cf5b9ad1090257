"""Checkpoints on disk, as users have them: one safetensors file, a list of
files, a directory (every ``*.safetensors`` in it, following
``model.safetensors.index.json`` when there is one, as Hugging Face's
``save_pretrained`` writes sharded checkpoints), or the index file itself.

A checkpoint is a file others may write: a training job saving its next
checkpoint over the one being sealed, say. So no shard is ever mapped (a
mapping of a file that someone cuts short ends the process with SIGBUS):
its header is read with pread(2) and its tensors are read straight into the
sealed buffer with pread on every core (``Sealer.read``), where a file cut
short is an error. And each shard's identity (device, inode, size,
modification and change times), taken from the descriptor its header is
read through, is checked again before and after its tensors are read, so
that tensors are never copied by the offsets of a header the file no
longer has (:class:`~ray_zerocopy.errors.CheckpointChangedError`).

What that check cannot see: a writer that changes a shard in place,
keeping its size, within the file system's timestamp granularity of the
header being read (a few milliseconds on local Linux file systems, up to
seconds on others), writes through a mapping whose times the kernel has not
updated yet, or, on NFS, a write on another node that this node's cached
attributes do not show yet. ``save_file`` of safetensors 0.8 and later and
``save_pretrained`` write a new file and rename it over the old one, which
is always seen.

Only regular files are read (symlinks to them are followed, as a Hugging
Face cache's snapshots are links to its blobs): opening a FIFO for reading
waits for a writer, so a FIFO named like a shard would hang the seal. And an
index names shards in its own directory: a ``weight_map`` entry that is
absolute or climbs out with ``..`` is refused, not read.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ._native import lib
from .errors import CheckpointChangedError, CheckpointNotFoundError, InvalidInputError, IoError, RzcError, error_for
from .weights import Weights

__all__ = ["INDEX", "Entry", "Checkpoint", "read"]

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where its bytes are."""

    name: str
    dtype: str  # safetensors spelling
    shape: tuple
    nbytes: int
    shard: Path
    offset: int  # from the start of the shard file


@dataclass(frozen=True)
class Checkpoint:
    entries: tuple  # every tensor, shard by shard, in the order of their data
    metadata: dict  # the first shard's __metadata__ (the index's own is not a string map)
    shards: tuple
    identity: dict  # shard Path -> _identity() taken before its header was read


def _identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced, rewritten or cut short."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _shards(path) -> tuple[list[Path], dict | None]:
    """The shard files of a checkpoint, and its index's weight map if any."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        if not files:
            raise InvalidInputError("the list of checkpoint files is empty")
        for f in files:
            if not f.exists():  # a directory or FIFO: _open names what it is
                raise CheckpointNotFoundError(f"checkpoint file {f} does not exist")
        return files, None
    path = Path(path)
    if path.is_dir():
        index = path / INDEX
        if index.exists():  # not is_file(): an index that is a FIFO is refused, not passed over
            return _from_index(index)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointNotFoundError(f"{path} holds no checkpoint: no *.safetensors files and no {INDEX}")
        return files, None
    if path.suffix == ".json":
        return _from_index(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    return [path], None


def _from_index(index: Path) -> tuple[list[Path], dict]:
    bad = f"{index} is not a safetensors index (a JSON object with a weight_map)"
    try:
        fd = _open(index)
    except OSError as e:
        raise InvalidInputError(f"{bad}: {e}") from e
    try:
        _regular(fd, index)
        try:
            with open(fd, "rb", closefd=False) as text:
                weight_map = json.loads(text.read())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"its weight_map is a {type(weight_map).__name__}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{bad}: {e}") from e
    finally:
        os.close(fd)
    for tensor, name in weight_map.items():
        _in_directory(index, tensor, name)
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if not f.exists():  # a directory or FIFO: _open names what it is
            listed = sum(1 for v in weight_map.values() if v == name)
            raise CheckpointNotFoundError(
                f"shard {name}, which {index.name} lists for {listed} tensor(s), is missing from {index.parent}"
            )
        files.append(f)
    return files, weight_map


def _in_directory(index: Path, tensor, name) -> None:
    """Refuses a ``weight_map`` entry that is not a path inside the index's
    directory. ``save_pretrained`` writes plain file names; an absolute path
    or a ``..`` would let an index (downloaded with the checkpoint, say)
    make the seal read, and share, any safetensors file the user can read.
    A relative path down into a subdirectory stays inside, and is taken."""
    p = Path(name) if isinstance(name, str) else None
    if p is None or not p.parts or p.is_absolute() or ".." in p.parts:
        raise InvalidInputError(
            f"{index}: tensor {tensor!r} is mapped to {name!r}, which is not a file in {index.parent}: "
            "an index names its shards by their names in its own directory (no absolute path, no '..')"
        )


def _open(path: Path) -> int:
    """A read-only descriptor of ``path``, opened with O_NONBLOCK: opening
    a FIFO for reading otherwise waits for a writer, forever when none comes.
    Callers then refuse what is not a regular file (:func:`_regular`) or not
    the file whose header was read (:func:`_unchanged`). Reads of a regular
    file ignore O_NONBLOCK; it is cleared all the same, so the descriptor is
    an ordinary one. No O_NOFOLLOW: a Hugging Face cache's shards are links.
    The path is looked at first too: a device is refused without being
    opened (opening some has effects, a tape's rewind)."""
    _refuse_unless_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _regular(fd: int, path: Path) -> os.stat_result:
    """The fstat of ``fd``, open at ``path``; raises
    :class:`~ray_zerocopy.errors.InvalidInputError` unless it is a regular
    file. Checked on the open descriptor, so no rename between a check and
    the open can slip another kind of file in."""
    st = os.fstat(fd)
    _refuse_unless_regular(st.st_mode, path)
    return st


def _refuse_unless_regular(mode: int, path: Path) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for is_kind, k in _KINDS if is_kind(mode)), "not a file")
        raise InvalidInputError(f"checkpoint file {path}: is {kind}, not a regular file")


def read(path) -> Checkpoint:
    """Every tensor of the checkpoint at ``path``, from the shards' headers
    (validated by the native library) and no tensor data."""
    files, weight_map = _shards(path)
    entries, seen, metadata, identity = [], {}, None, {}
    for f in files:
        try:
            fd = _open(f)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"checkpoint file {f} does not exist") from e
        try:
            st = _regular(fd, f)
            identity[f] = _identity(st)
            table, meta = _header(fd, st.st_size, f)
        finally:
            os.close(fd)
        if metadata is None:
            metadata = meta
        for t in table:
            if t.name in seen:
                raise InvalidInputError(f"tensor {t.name!r} is in two shards: {seen[t.name].name} and {f.name}")
            seen[t.name] = f
            entries.append(Entry(t.name, t.dtype, t.shape, t.nbytes, f, t.offset))
    if weight_map is not None:
        for name, shard in weight_map.items():
            if seen.get(name, None) is None or seen[name].name != Path(shard).name:
                where = f"it is in {seen[name].name}" if name in seen else "no shard holds it"
                raise InvalidInputError(f"the index lists tensor {name!r} in {shard}, but {where}")
    if not entries:
        raise InvalidInputError(f"{path} holds no tensors")
    return Checkpoint(tuple(entries), metadata or {}, tuple(files), identity)


def same_values(ckpt: Checkpoint, a: Entry, b: Entry) -> bool:
    """Whether entries ``a`` and ``b`` hold the same bytes (read from their
    shards, 64 MiB at a time: only for tensors that must be one)."""
    if a.nbytes != b.nbytes:
        return False
    step = 64 << 20
    fds = {}
    try:
        for e in (a, b):
            if e.shard not in fds:
                fds[e.shard] = _open(e.shard)
                _unchanged(ckpt, e.shard, fds[e.shard], "before two tied tensors were compared")
        for at in range(0, a.nbytes, step):
            n = min(step, a.nbytes - at)
            if os.pread(fds[a.shard], n, a.offset + at) != os.pread(fds[b.shard], n, b.offset + at):
                return False
        return True
    finally:
        for fd in fds.values():
            os.close(fd)


# Linux's MAP_NORESERVE (Python's mmap module does not name it): the stand-in
# below reserves address space only, and no swap or commit charge.
_MAP_NORESERVE = 0x4000


def _header(fd: int, size: int, path: Path) -> tuple:
    """The tensor table and metadata of the ``size``-byte shard open at
    ``fd``, validated by the native library, with the header read by pread.

    The parser checks a header against the whole buffer (every byte of the
    data section covered by exactly one tensor), so it is given a stand-in
    of the file's length: the header read from the file, then untouched
    anonymous memory, which costs no memory. Only the table and metadata
    are taken from it, and it is closed here: nothing can export its
    (zero) tensor data."""
    head = os.pread(fd, 8, 0)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if len(head) == 8 and n <= min(lib.RZC_MAX_HEADER_NBYTES, size - 8):
        head = os.pread(fd, 8 + n, 0)  # else the length alone is refused
    if size == 0 or len(head) < min(size, 8):
        stand_in = bytearray(head)  # too short to hold a header: let the parser say so
    else:
        stand_in = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        stand_in[: len(head)] = head
    try:
        with Weights.from_buffer(stand_in) as w:
            found, error = (w.table(), w.metadata), None
    except RzcError as e:
        found, error = None, error_for(e.status, f"checkpoint file {path}: {e.message}")
    # Here, not in a `finally`: a failed open's traceback still holds the
    # parser's view of the stand-in there, and a viewed mapping cannot close.
    if isinstance(stand_in, mmap.mmap):
        stand_in.close()
    if error is not None:
        raise error
    return found


def copy_into(ckpt: Checkpoint, entries, offsets, read) -> None:
    """Copies each entry's bytes to offset ``offsets[i]`` of the buffer being
    sealed, one shard at a time: ``read(fd, [(file_offset, offset,
    nbytes)])`` is the fill's (``_seal._Progress.read``). Raises
    :class:`~ray_zerocopy.errors.CheckpointChangedError` for a shard that is
    not, before or after its copy, the file ``ckpt`` read the header of."""
    by_shard: dict[Path, list[int]] = {}
    for i, e in enumerate(entries):
        by_shard.setdefault(e.shard, []).append(i)
    for shard, indices in by_shard.items():
        try:
            fd = _open(shard)
        except FileNotFoundError as e:
            raise CheckpointChangedError(f"checkpoint shard {shard} was removed after its header was read") from e
        except InvalidInputError as e:  # a FIFO or device put in its place
            raise CheckpointChangedError(
                f"checkpoint shard {shard} was replaced by another file before its tensors were read ({e})"
            ) from e
        try:
            _unchanged(ckpt, shard, fd, "before its tensors were read")
            try:
                read(fd, [(entries[i].offset, offsets[i], entries[i].nbytes) for i in indices])
            except IoError as e:
                _unchanged(ckpt, shard, fd, "while its tensors were read")
                raise error_for(e.status, f"checkpoint shard {shard}: {e.message}") from None
            _unchanged(ckpt, shard, fd, "while its tensors were read")
        finally:
            os.close(fd)


def _unchanged(ckpt: Checkpoint, shard: Path, fd: int, when: str) -> None:
    was, now = ckpt.identity[shard], _identity(os.fstat(fd))
    if now == was:
        return
    if now[:2] != was[:2]:
        what = "replaced by another file"
    elif now[2] != was[2]:
        what = f"written to ({was[2]} bytes when its header was read, {now[2]} now)"
    else:
        what = "changed (its modification or change time moved: written to in place, or its attributes changed)"
    raise CheckpointChangedError(
        f"checkpoint shard {shard} was {what} {when}, after its header was read: "
        "nothing was sealed; seal it again once it is written"
    )
