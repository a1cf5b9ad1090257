"""What a tensor is beyond its bytes, kept through a seal and a load: the
values a lazy view shows, and the modules whose inference writes their own
weights. Sealed and assembled in this process (no Ray) where the point is
the buffer; in real actors where it is what an actor does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ray_zerocopy import ActorWrapper, Weights, _load, _seal  # noqa: E402


def round_trip(obj, **choices):
    sealed, buf = _seal.seal(obj)
    return _load.assemble(Weights.from_buffer(buf), sealed, **choices)


def test_lazy_conjugate_and_negative_views_keep_the_values_they_show():
    """``.conj()`` of a complex tensor (and a negative view) only sets a flag
    over memory that holds the values before it: sealing those bytes loaded
    the conjugate back, without a word (an FFT filter's response is often
    kept as ``fft(h).conj()``)."""
    c = torch.tensor([1 + 2j, 3 - 4j, -5 + 0.5j], dtype=torch.complex64)
    pipeline = {
        "conj": c.conj(),
        "neg": torch._neg_view(torch.arange(4.0)),
        "conj_of_neg": torch._neg_view(c).conj(),
        "filter": torch.nn.Module(),
    }
    pipeline["filter"].register_buffer("h", torch.fft.fft(torch.arange(8.0)).conj())
    assert pipeline["conj"].is_conj() and pipeline["neg"].is_neg()
    loaded = round_trip(pipeline)
    for k in ("conj", "neg", "conj_of_neg"):
        assert torch.equal(loaded[k], pipeline[k].resolve_conj().resolve_neg()), k
    assert torch.equal(loaded["filter"].h, pipeline["filter"].h.resolve_conj())
