"""JAX adapter: arrays come back through DLPack (legacy capsules, which JAX
asks for); JAX adopts 64-byte aligned host memory without copying, and every
tensor of a sealed buffer is 256-byte aligned."""

from __future__ import annotations

import jax
import numpy as np

from . import _numpy
from .device_weights import DeviceWeights


def accepts(obj) -> bool:
    return isinstance(obj, jax.Array)


def pack_input(a, name: str):
    return _numpy.pack_input(np.asarray(a), name)


def adopt(source, indices, fast: bool = False) -> list:
    """Tensors ``indices`` of ``source`` (an opened buffer, or its upload to a
    GPU) as JAX arrays: zero-copy on the CPU, on the upload's GPU otherwise."""
    out = []
    for i in indices:
        try:
            out.append(jax.dlpack.from_dlpack(source.dlpack(i)))
        except Exception:
            if isinstance(source, DeviceWeights):
                raise
            # A dtype JAX's DLPack import does not take: go through numpy.
            out.append(jax.numpy.asarray(_numpy.adopt(source, [i])[0]))
    return out
