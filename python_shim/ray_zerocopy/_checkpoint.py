"""Checkpoints on disk, as users have them: one safetensors file, a list of
files, a directory (every ``*.safetensors`` in it, following
``model.safetensors.index.json`` when there is one, as Hugging Face's
``save_pretrained`` writes sharded checkpoints), or the index file itself.

Reading a checkpoint maps each shard only long enough to read its header.
Copying it into a sealed buffer reads each shard with pread(2) on every
core (``Sealer.read``), not through a mapping: a shard cut short meanwhile
is an error, where a mapping would end the process with SIGBUS, and the
process holds no more than the buffer.

A checkpoint is a file others may write: a training job saving its next
checkpoint over the one being sealed, say. Each shard's identity (device,
inode, size, change times) is taken before its header is read, and checked
before and after its tensors are copied, so that tensors are never copied
by the offsets of a header the file no longer has
(:class:`~ray_zerocopy.errors.CheckpointChangedError`). A writer that
changes a shard in place within the file system's timestamp granularity
(a few milliseconds) of that first look, keeping its size, could go
unseen; replacing the file (the way ``save_file`` and ``save_pretrained``
write) cannot.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointChangedError, CheckpointNotFoundError, InvalidInputError, IoError
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
            if not f.is_file():
                raise CheckpointNotFoundError(f"checkpoint file {f} does not exist")
        return files, None
    path = Path(path)
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
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
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from e
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if not f.is_file():
            listed = sum(1 for v in weight_map.values() if v == name)
            raise CheckpointNotFoundError(
                f"shard {name}, which {index.name} lists for {listed} tensor(s), is missing from {index.parent}"
            )
        files.append(f)
    return files, weight_map


def read(path) -> Checkpoint:
    """Every tensor of the checkpoint at ``path``, from the shards' headers
    (validated by the native library) and no tensor data."""
    files, weight_map = _shards(path)
    entries, seen, metadata, identity = [], {}, None, {}
    for f in files:
        # Before the header is read: a change after this look shows at copy.
        try:
            identity[f] = _identity(os.stat(f))
        except OSError as e:
            raise CheckpointNotFoundError(f"checkpoint file {f}: {e}") from e
        with Weights.open_file(f) as w:
            if metadata is None:
                metadata = w.metadata
            for t in w.table():
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
            fd = os.open(shard, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CheckpointChangedError(f"checkpoint shard {shard} cannot be opened any more: {e}") from e
        try:
            _unchanged(ckpt, shard, fd, "before its tensors were copied")
            try:
                read(fd, [(entries[i].offset, offsets[i], entries[i].nbytes) for i in indices])
            except IoError:
                _unchanged(ckpt, shard, fd, "while its tensors were copied")
                raise
            _unchanged(ckpt, shard, fd, "while its tensors were copied")
        finally:
            os.close(fd)


def _unchanged(ckpt: Checkpoint, shard: Path, fd: int, when: str) -> None:
    now = _identity(os.fstat(fd))
    was = ckpt.identity[shard]
    if now != was:
        what = "replaced by another file" if now[:2] != was[:2] else f"written to ({was[2]} bytes then, {now[2]} now)"
        raise CheckpointChangedError(
            f"checkpoint shard {shard} was {what} {when}, after its header was read: "
            "nothing was sealed; seal it again once it is written"
        )
