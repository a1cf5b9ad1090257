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


def arrays(weights: Weights, layout) -> list:
    """The tensors described by ``layout`` as JAX arrays (zero-copy on CPU)."""
    out = []
    for i, t in enumerate(layout):
        try:
            out.append(jax.dlpack.from_dlpack(weights.dlpack(i)))
        except Exception:
            # A dtype JAX's DLPack import does not take: go through numpy.
            out.append(jax.numpy.asarray(_numpy.arrays(weights, [t])[0]))
    return out


def cuda_arrays(device_weights, indices) -> list:
    """Tensors ``indices`` of an upload as JAX arrays on that GPU."""
    return [jax.dlpack.from_dlpack(device_weights.dlpack(i)) for i in indices]
