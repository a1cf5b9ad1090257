"""What TorchScript modules and exported programs share when they are
sealed without their weights: a versioned blob, the check of the tensors a
rebuild is given, and one-element placeholders."""

from __future__ import annotations

import pickle

import torch

from .errors import InvalidInputError, InvalidTypeError, MissingTensorError, UnsupportedObjectError

BLOB_VERSION = 1


def meta(t: torch.Tensor) -> dict:
    """What a rebuild checks the supplied tensor against."""
    return {"shape": tuple(t.shape), "dtype": t.dtype}


def check(tensors: dict, metas: dict) -> None:
    """The supplied tensors are the ones the blob needs, each of its shape and
    dtype."""
    missing = metas.keys() - tensors.keys()
    extra = tensors.keys() - metas.keys()
    if missing or extra:
        raise MissingTensorError(
            f"tensors do not match the blob: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for name, m in metas.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise InvalidTypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != m["shape"] or t.dtype != m["dtype"]:
            raise InvalidInputError(
                f"tensor {name!r}: supplied {tuple(t.shape)} {t.dtype}, "
                f"the stripped object had {m['shape']} {m['dtype']}"
            )


def pack(kind: str, payload: dict) -> bytes:
    return pickle.dumps({"kind": kind, "version": BLOB_VERSION, **payload}, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(blob: bytes, kind: str) -> dict:
    d = pickle.loads(blob)
    if d.get("kind") != kind or d.get("version") != BLOB_VERSION:
        raise InvalidInputError(
            f"not a {kind} blob of version {BLOB_VERSION}: {d.get('kind')!r} version {d.get('version')!r}"
        )
    return d


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """Same dtype and shape, one element of (CPU) storage, never written."""
    if t.is_sparse or t.is_quantized or t.layout != torch.strided:
        raise UnsupportedObjectError(f"tensor layout {t.layout} / quantized tensors are not supported")
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    return torch.zeros((), dtype=t.dtype).expand(t.shape)
