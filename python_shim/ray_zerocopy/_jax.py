"""JAX adapter: arrays come back through DLPack (legacy capsules, which JAX
asks for); JAX adopts 64-byte aligned host memory without copying, and every
tensor of a sealed buffer is 256-byte aligned."""

from __future__ import annotations

import functools

import jax
import numpy as np

from . import _numpy
from ._dlpack import consume_legacy, consume_legacy_all, kDLCPU
from ._native import DTYPE_NAMES
from .device_weights import DeviceWeights


def accepts(obj) -> bool:
    """A JAX array of numbers. A typed PRNG key (``jax.random.key``, held by
    Flax NNX's ``Rngs``) has no numeric value to share: it is pickled, as
    JAX pickles it."""
    return isinstance(obj, jax.Array) and not jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key)


def pack_input(a, name: str):
    return _numpy.pack_input(np.asarray(a), name)


def adopt(source, indices, fast: bool = False) -> list:
    """Tensors ``indices`` of ``source`` (an opened buffer, or its upload to a
    GPU) as JAX arrays: zero-copy on the CPU, on the upload's GPU otherwise.
    On the CPU, every array of a dtype JAX keeps is exported in one native
    call and handed to JAX's own import (:func:`_direct`); any other, or one
    JAX refuses, takes the public way."""
    if isinstance(source, DeviceWeights):
        return [jax.dlpack.from_dlpack(source.dlpack(i)) for i in indices]
    direct = _direct()
    if direct is None:
        return [_public(source, i) for i in indices]
    keep = _canonical_dtypes(source)
    if keep is None:
        # The usual case: JAX keeps every dtype, and adopts every array of a
        # sealed buffer (each 256-byte aligned). All are imported in one go
        # (one map, no Python step per array: 5-10 of the ~70 ms 20,000
        # arrays took one at a time); where JAX refuses one (memory of
        # another alignment), the arrays are made again one by one below.
        try:
            return consume_legacy_all(source.export_legacy_many(indices), direct)
        except Exception:
            quick = range(len(indices))
    else:
        quick = [k for k, i in enumerate(indices) if i in keep]
    out = [None] * len(indices)
    if quick:
        made = consume_legacy(source.export_legacy_many([indices[k] for k in quick]), direct)
        for k, a in zip(quick, made, strict=True):
            out[k] = a
    for k, i in enumerate(indices):
        if out[k] is None:
            out[k] = _public(source, i)
    return out


def _public(weights, i):
    """Array ``i`` through ``jax.dlpack.from_dlpack``; a dtype JAX's DLPack
    import does not take goes through numpy."""
    try:
        return jax.dlpack.from_dlpack(weights.dlpack(i))
    except Exception:
        return jax.numpy.asarray(_numpy.adopt(weights, [i])[0])


def _canonical_dtypes(weights) -> set | None:
    """Indices of the tensors whose dtype JAX keeps as it is (a float64 is
    made float32 unless jax_enable_x64 is set: ``from_dlpack`` converts it),
    or ``None`` where that is every tensor."""
    codes = weights.dtype_codes()
    present = np.unique(codes).tolist()
    kept = []
    for code in present:
        dt = _numpy.numpy_dtype(DTYPE_NAMES[code])
        if dt is not None and jax.dtypes.canonicalize_dtype(dt) == dt:
            kept.append(code)
    if len(kept) == len(present):
        return None
    return set(np.flatnonzero(np.isin(codes, kept)).tolist())


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
