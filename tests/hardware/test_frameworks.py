"""The CUDA path on a real GPU, as frameworks see it: torch, JAX and CuPy
adopt uploaded tensors (every dtype, one allocation), a model gives the
outputs `.to("cuda")` gives, freeing order is safe, a pipeline of torch and
JAX tensors uploads once. The source buffer lives in shared memory, standing
in for Ray's object store (no Ray on the GPU machine). The library's own
device code is tested in tests/gpu, on the stand-in driver as well."""

import gc

import numpy as np
import pytest
import ray_zerocopy as rzc
import torch
from common import sample_tensors as sample  # noqa: E402
from common import sealed_in_shm as sealed  # noqa: E402
from ray_zerocopy import _load


@pytest.mark.parametrize("staging", ["auto", "register", "pinned", "pageable"])
def test_torch_adopts_every_dtype_bit_for_bit(shm, staging):
    tensors = sample()
    _, w = sealed(tensors, shm, staging)
    dev = w.upload(0, staging=staging, chunk_bytes=1 << 16)  # small chunks: many pieces
    info = dev.info()
    expected = ("register", "pinned") if staging == "auto" else (staging,)
    assert info["staging"] in expected
    lo, hi = info["device_ptr"], info["device_ptr"] + info["nbytes"]
    for i, (name, ref) in enumerate(tensors.items()):
        t = torch.from_dlpack(dev.dlpack(i))
        assert t.device == torch.device("cuda", 0) and t.dtype == ref.dtype and t.shape == ref.shape, name
        if t.numel():
            assert lo <= t.data_ptr() < hi and (t.data_ptr() - lo) % 256 == 0, "inside the one allocation, 256-aligned"
        assert torch.equal(t.cpu().reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name


def test_model_outputs_equal_to_dot_cuda(shm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 8)
    ).eval()
    description, w = sealed(model, shm, "model")
    loaded = _load.assemble(w, description, device="cuda:0")
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(x), model.to("cuda")(x))
    assert all(p.device.type == "cuda" and not p.requires_grad for p in loaded.parameters())


def test_jax_and_cupy_adopt_the_same_memory(shm):
    tensors = {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 3)}
    _, w = sealed(tensors, shm, "fw")
    dev = w.upload(0)
    t = torch.from_dlpack(dev.dlpack(0))
    jax = pytest.importorskip("jax")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if gpus:
        j = jax.dlpack.from_dlpack(dev.dlpack(0))
        assert j.unsafe_buffer_pointer() == t.data_ptr()
        np.testing.assert_array_equal(np.asarray(j), np.arange(64, dtype=np.float32))
    cupy = pytest.importorskip("cupy")
    c = cupy.from_dlpack(dev.dlpack(0))
    assert c.data.ptr == t.data_ptr()
    assert float(c.sum()) == float(t.sum())


def test_freeing_order_is_safe(shm):
    tensors = {"a": torch.arange(1 << 20, dtype=torch.float32)}
    _, w = sealed(tensors, shm, "order")
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    dev = w.upload(0)
    t = torch.from_dlpack(dev.dlpack(0))
    del dev, w  # handles first: the tensor keeps the allocation
    gc.collect()
    assert float(t[-1]) == float((1 << 20) - 1)
    del t
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free0 - (1 << 20), "the allocation is freed with its last tensor"


def test_torch_and_jax_tensors_of_one_pipeline_share_one_upload(shm, monkeypatch):
    """A pipeline holding torch and JAX tensors is uploaded once, and both
    frameworks adopt their tensors from that one allocation."""
    jax = pytest.importorskip("jax")
    if not [d for d in jax.devices() if d.platform == "gpu"]:
        pytest.skip("skipped: JAX has no GPU backend in this environment")
    tree = {"t": torch.arange(64, dtype=torch.float32), "j": jax.numpy.arange(32, dtype=jax.numpy.int32)}
    description, w = sealed(tree, shm, "mixed")
    uploads = []
    real_upload = rzc.Weights.upload

    def counting_upload(self, *args, **kwargs):
        uploads.append(args)
        return real_upload(self, *args, **kwargs)

    monkeypatch.setattr(rzc.Weights, "upload", counting_upload)
    out = _load.assemble(w, description, device="cuda:0")
    assert len(uploads) == 1, "one upload for both frameworks"
    assert out["t"].device == torch.device("cuda", 0) and torch.equal(out["t"].cpu(), tree["t"])
    assert np.array_equal(np.asarray(out["j"]), np.arange(32, dtype=np.int32))
