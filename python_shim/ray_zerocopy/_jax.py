"""JAX adapter: arrays come back through DLPack (legacy capsules, which JAX
asks for); JAX adopts 64-byte aligned host memory without copying, and every
tensor of a packed buffer is 64-byte aligned."""

from __future__ import annotations

import jax
import numpy as np

from . import _numpy
from .weights import Weights


def accepts(obj) -> bool:
    return isinstance(obj, jax.Array)


def pack_input(a, name: str):
    return _numpy.pack_input(np.asarray(a), name)


def arrays(weights: Weights, layout, device=None) -> list:
    """The tensors described by ``layout`` as JAX arrays (zero-copy on CPU)."""
    out = []
    for i, t in enumerate(layout):
        try:
            arr = jax.dlpack.from_dlpack(weights.dlpack(i))
        except Exception:
            # A dtype JAX's DLPack import does not take: go through numpy.
            arr = jax.numpy.asarray(_numpy.arrays(weights, [t])[0])
        if device is not None:
            arr = jax.device_put(arr, device)
        out.append(arr)
    return out
