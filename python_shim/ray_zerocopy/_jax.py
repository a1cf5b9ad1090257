"""JAX adapter: arrays come back through DLPack (legacy capsules, which JAX
asks for); JAX adopts 64-byte aligned host memory without copying, and every
tensor of a sealed buffer is 256-byte aligned."""

from __future__ import annotations

import functools

import jax
import numpy as np

from . import _numpy
from ._dlpack import kDLCPU, legacy_capsule
from .device_weights import DeviceWeights


def accepts(obj) -> bool:
    return isinstance(obj, jax.Array)


def pack_input(a, name: str):
    return _numpy.pack_input(np.asarray(a), name)


def adopt(source, indices, fast: bool = False) -> list:
    """Tensors ``indices`` of ``source`` (an opened buffer, or its upload to a
    GPU) as JAX arrays: zero-copy on the CPU, on the upload's GPU otherwise."""
    direct = _direct() if not isinstance(source, DeviceWeights) else None
    canonical = _canonical_dtypes(source) if direct is not None else ()
    out = []
    for i in indices:
        try:
            if i in canonical:
                out.append(direct(legacy_capsule(source.export_legacy(i))))
            else:
                out.append(jax.dlpack.from_dlpack(source.dlpack(i)))
        except Exception:
            if isinstance(source, DeviceWeights):
                raise
            # A dtype JAX's DLPack import does not take: go through numpy.
            out.append(jax.numpy.asarray(_numpy.adopt(source, [i])[0]))
    return out


def _canonical_dtypes(weights) -> set:
    """Indices of the tensors whose dtype JAX keeps as it is (a float64 is
    made float32 unless jax_enable_x64 is set: ``from_dlpack`` converts it)."""
    dtypes = weights.columns()[0]
    keep = set()
    for name in set(dtypes):
        dt = _numpy.TO_NUMPY.get(name)
        if dt is not None and jax.dtypes.canonicalize_dtype(dt) == dt:
            keep.add(name)
    return {i for i, name in enumerate(dtypes) if name in keep}


@functools.cache
def _direct():
    """JAX's own import of a DLPack capsule onto its CPU device, without
    ``jax.dlpack.from_dlpack``'s wrapper around it (a producer object asked
    for its device and a capsule, a backend lookup and a ``jnp.asarray`` per
    array: 30 of the 35 us each array cost), or ``None`` where this jaxlib
    does not have that function in the form known here; then every array
    takes the public way. The two ways make the same array: a test compares
    them."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax, jaxlib_extension_version

        to_buffer = _jax.dlpack_managed_tensor_to_buffer
        if jaxlib_extension_version < 467:
            return None
        device = xla_bridge.get_backend("cpu").local_devices()[0]
    except (ImportError, AttributeError, RuntimeError):
        return None

    def from_capsule(capsule):
        return to_buffer(capsule, device, None, False, kDLCPU)

    return from_capsule
