"""Checkpoints on disk, as users have them: one safetensors file, a list of
files, a directory (every ``*.safetensors`` in it, following
``model.safetensors.index.json`` when there is one, as Hugging Face's
``save_pretrained`` writes sharded checkpoints), or the index file itself.

Reading a checkpoint maps each shard only long enough to read its header;
copying it into a sealed buffer maps one shard at a time, so the process
holds at most the buffer plus the shard being copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointNotFoundError, InvalidInputError
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
    entries, seen, metadata = [], {}, None
    for f in files:
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
    return Checkpoint(tuple(entries), metadata or {}, tuple(files))


def copy_into(entries, offsets, copy) -> None:
    """Copies each entry's bytes to offset ``offsets[i]`` of the buffer being
    sealed, one shard at a time (each shard is mapped while it is copied,
    then unmapped): ``copy([(address, offset, nbytes)])`` is the fill's
    (``_seal._Progress.copy``)."""
    by_shard: dict[Path, list[int]] = {}
    for i, e in enumerate(entries):
        by_shard.setdefault(e.shard, []).append(i)
    for shard, indices in by_shard.items():
        # The handle is the mapping's only user: the shard is unmapped
        # before the next one is mapped.
        with Weights.open_file(shard) as w:
            base = w.address
            copy([(base + entries[i].offset, offsets[i], entries[i].nbytes) for i in indices])
