"""The Python handle over the native library: opening, DLPack export to torch,
numpy and JAX, lifetimes, packing, and errors. No Ray here."""

import ctypes
import gc
import sys

import numpy as np
import pytest
import ray_zerocopy as rzc
from ray_zerocopy.weights import live_buffers

torch = pytest.importorskip("torch")
from safetensors.numpy import load as st_load_numpy  # noqa: E402
from safetensors.torch import save, save_file  # noqa: E402

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        base = torch.randn(3, 5, generator=g) * 4
        out[f"t{i}.{str(dt)[6:]}"] = base.to(dt) if dt != torch.complex64 else torch.complex(base, -base)
    out["scalar"] = torch.tensor(7.5)
    out["empty"] = torch.zeros(0, 3)
    return out


def test_every_dtype_round_trips_zero_copy(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    w = rzc.Weights.open_file(path)
    assert len(w) == len(tensors)
    lo, hi = w.address, w.address + w.nbytes
    for name, ref in tensors.items():
        t = torch.from_dlpack(w.dlpack(w.find(name)))
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name
        if t.numel():
            assert lo <= t.data_ptr() < hi, f"{name} was copied"


def test_numpy_views_are_read_only_and_equal(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False])}
    codes = {"float32": rzc.Dtype.F32, "bool": rzc.Dtype.BOOL}
    w = rzc.Weights.from_buffer(
        rzc.pack([rzc.PackInput(k, codes[str(v.dtype)], v.shape, v.ctypes.data, v.nbytes) for k, v in arrays.items()])
    )
    a = np.from_dlpack(w.dlpack(w.find("a")))
    np.testing.assert_array_equal(a, arrays["a"])
    assert not a.flags.writeable, "numpy must honour DLPack's READ_ONLY flag"
    with pytest.raises(ValueError):
        a[0, 0] = 1


def test_tensors_outlive_the_handle_and_the_buffer_owner():
    data = np.arange(1000, dtype=np.float32)
    gc.collect()  # buffers earlier tests left in garbage cycles go now, not mid-test
    base = live_buffers()
    buf = rzc.pack([rzc.PackInput("x", rzc.Dtype.F32, data.shape, data.ctypes.data, data.nbytes)])
    w = rzc.Weights.from_buffer(buf)
    t = torch.from_dlpack(w.dlpack(0))
    del w, buf
    gc.collect()
    assert live_buffers() == base + 1, "the tensor must keep the buffer alive"
    assert float(t[999]) == 999.0
    del t
    gc.collect()
    assert live_buffers() == base, "the buffer is released with the last tensor"


def test_pack_is_read_by_the_official_library_bit_for_bit():
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal((i + 1, 3)).astype(np.float32) for i in range(7)}
    arrays["ids"] = np.arange(5, dtype=np.int64)
    codes = {"float32": rzc.Dtype.F32, "int64": rzc.Dtype.I64}
    buf = rzc.pack(
        [rzc.PackInput(k, codes[str(v.dtype)], v.shape, v.ctypes.data, v.nbytes) for k, v in arrays.items()],
        {"format": "np"},
    )
    loaded = st_load_numpy(buf.tobytes())
    assert set(loaded) >= set(arrays)
    for k, v in arrays.items():
        assert loaded[k].tobytes() == v.tobytes()
    w = rzc.Weights.from_buffer(buf)
    assert w.metadata == {"format": "np"}
    assert all(i.offset % 64 == 0 for i in w.infos()), "every tensor 64-byte aligned"
    assert w.names() == list(arrays), "padding entries hidden, order kept"


def test_versioned_capsule_when_asked_legacy_otherwise():
    data = np.zeros(4, np.float32)
    w = rzc.Weights.from_buffer(rzc.pack([rzc.PackInput("x", rzc.Dtype.F32, (4,), data.ctypes.data, 16)]))
    name = ctypes.pythonapi.PyCapsule_GetName
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    assert name(w.dlpack(0).__dlpack__(max_version=(1, 1))) == b"dltensor_versioned"
    assert name(w.dlpack(0).__dlpack__()) == b"dltensor"
    assert w.dlpack(0).__dlpack_device__() == (1, 0)
    with pytest.raises(BufferError, match="copy"):
        w.dlpack(0).__dlpack__(copy=True)
    with pytest.raises(BufferError):
        w.dlpack(0).__dlpack__(dl_device=(2, 0))
    # An unconsumed capsule frees its tensor (and so its hold on the buffer)
    # through the capsule destructor.
    gc.collect()
    unconsumed = [w.dlpack(0).__dlpack__(max_version=(1, 1)), w.dlpack(0).__dlpack__()]
    before = live_buffers()
    w.close()
    assert live_buffers() == before, "the capsules' tensors still hold the buffer"
    del unconsumed
    gc.collect()
    assert live_buffers() == before - 1, "dropping unconsumed capsules released the buffer"


@pytest.mark.parametrize("fails_at", [0, 3, 7])
@pytest.mark.parametrize("how", ["refuses", "takes_then_raises", "interrupted"])
def test_a_consumer_failing_midway_leaves_no_tensor_behind_and_frees_none_twice(fails_at, how):
    """torch's loads hand every capsule to the consumer in one go
    (``_dlpack.consume_versioned``). A consumer that fails at tensor k
    (refusing it, taking it and then raising, or interrupted) leaves every
    tensor it did not take freed, once, and those it took to the tensors it
    made: when those are dropped and the handle closed, nothing holds the
    buffer, and none was freed twice (a double free would crash here)."""
    from ray_zerocopy import _dlpack

    data = [np.arange(16, dtype=np.float32) + k for k in range(8)]
    inputs = [rzc.PackInput(f"t{k}", rzc.Dtype.F32, d.shape, d.ctypes.data, d.nbytes) for k, d in enumerate(data)]
    buf = rzc.pack(inputs)
    gc.collect()  # buffers earlier tests left in garbage cycles go now, not mid-test
    base = live_buffers()
    w = rzc.Weights.from_buffer(buf)
    made = []
    error = KeyboardInterrupt if how == "interrupted" else ValueError

    def consumer(capsule):
        if len(made) == fails_at:
            if how == "takes_then_raises":
                torch.from_dlpack(capsule)  # taken (renamed), then dropped: its tensor frees itself
            made.append(None)
            raise error("the consumer fails here")
        t = torch.from_dlpack(capsule)
        made.append(t)
        return t

    with pytest.raises(error, match="fails here"):
        _dlpack.consume_versioned(w.export_versioned_many(list(range(len(w)))), consumer)
    assert len(made) == fails_at + 1
    for k in range(fails_at):
        assert torch.equal(made[k], torch.from_numpy(data[k]))
    made.clear()
    w.close()
    gc.collect()
    assert live_buffers() == base, "a tensor the consumer did not take still holds the buffer"


def test_jax_adopts_without_copy():
    jax = pytest.importorskip("jax")
    data = np.arange(64, dtype=np.float32)
    buf = rzc.pack([rzc.PackInput("x", rzc.Dtype.F32, (64,), data.ctypes.data, data.nbytes)])
    w = rzc.Weights.from_buffer(buf)
    arr = jax.dlpack.from_dlpack(w.dlpack(0))
    assert arr.unsafe_buffer_pointer() == w.address + w.info(0).offset
    np.testing.assert_array_equal(np.asarray(arr), data)


@pytest.mark.parametrize(
    "blob, needle",
    [
        (b"", "8-byte header length"),
        ((100).to_bytes(8, "little") + b"{}", "runs past the end"),
        ((8).to_bytes(8, "little") + b"{nope!!}", "JSON"),
        ((2**62).to_bytes(8, "little"), "exceeds the limit"),
    ],
)
def test_malformed_buffers_raise_with_the_library_message(blob, needle, tmp_path):
    with pytest.raises(rzc.BadFormatError, match=needle) as e:
        rzc.Weights.from_buffer(blob)
    assert isinstance(e.value, ValueError) and e.value.status == "RZC_BAD_FORMAT"
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(rzc.BadFormatError, match=needle):
        rzc.Weights.open_file(p)


def test_truncated_official_file_and_missing_names(tmp_path):
    blob = save({"a": torch.ones(4)})
    with pytest.raises(rzc.BadFormatError, match="run past the end"):
        rzc.Weights.from_buffer(blob[:-2])
    w = rzc.Weights.from_buffer(blob)
    with pytest.raises(rzc.NotFoundError, match="nope"):
        w.find("nope")
    with pytest.raises(rzc.IoError) as e:
        rzc.Weights.open_file(tmp_path / "missing.safetensors")
    assert isinstance(e.value, OSError) and "missing.safetensors" in str(e.value)
    with pytest.raises(rzc.IoError, match="is a directory"):
        rzc.Weights.open_file(tmp_path)


def test_every_status_raises_its_own_class():
    """The native library lists the statuses; each failure status maps to its
    own exception class by name (none falls back to the bare base class)."""
    from ray_zerocopy._native import STATUS_NAMES
    from ray_zerocopy.errors import class_for

    assert STATUS_NAMES[0] == "RZC_OK" and len(STATUS_NAMES) >= 14
    for name in list(STATUS_NAMES.values())[1:]:
        cls = class_for(name)
        assert cls is not rzc.RzcError and cls.__name__ in rzc.__all__, name
    assert class_for("RZC_CUDA_ERROR") is rzc.CudaError
    assert class_for("RZC_BAD_DEVICE") is rzc.BadDeviceError and issubclass(rzc.BadDeviceError, rzc.NoCudaError)


def test_every_error_derives_from_one_base_and_only_native_ones_carry_a_status():
    """One base for every error; a failure found in Python carries no native
    status, and still meets the ``except`` its native twin meets."""
    import inspect

    from ray_zerocopy import errors
    from ray_zerocopy._native import STATUS_NAMES
    from ray_zerocopy.errors import class_for

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]
    assert len(classes) > 20 and all(issubclass(c, rzc.RayZeroCopyError) for c in classes), classes
    assert all(getattr(rzc, c.__name__) is c for c in classes if not c.__name__.startswith("_")), "all exported"
    for name in list(STATUS_NAMES.values())[1:]:
        assert class_for(name)(name, "m").status == name, "native classes keep their status"

    from ray_zerocopy import _seal

    with pytest.raises(rzc.UnsupportedDtypeError) as e:  # found in Python: safetensors has no complex128
        _seal.seal({"z": torch.zeros(3, dtype=torch.complex128)})
    assert isinstance(e.value, rzc.UnshareableTensorError) and isinstance(e.value, TypeError)
    assert e.value.status is None and "RZC_" not in str(e.value), str(e.value)

    with pytest.raises(rzc.BadFormatError) as e:  # found natively
        rzc.Weights.from_buffer(b"\x00" * 8)
    assert e.value.status == "RZC_BAD_FORMAT" and str(e.value).endswith("[RZC_BAD_FORMAT]")

    one = np.ones(4, np.float32)
    with pytest.raises(rzc.InvalidInputError) as e:
        w = rzc.Weights.from_buffer(rzc.pack([rzc.PackInput("x", rzc.Dtype.F32, (4,), one.ctypes.data, 16)]))
        w.upload(0, staging="sideways")
    assert isinstance(e.value, ValueError) and e.value.status is None


def test_codes_and_sizes_are_the_headers():
    """The names of staging, sharing and guard codes, the DLPack device types
    and the layout sizes are read from the native library: they match
    include/rzc.h, the one list."""
    import os
    import re

    from ray_zerocopy import _dlpack, device_weights, weights
    from ray_zerocopy.packing import DEFAULT_ALIGNMENT, DEVICE_ALIGNMENT, GUARD_NBYTES

    header = open(os.path.join(os.path.dirname(__file__), "..", "..", "include", "rzc.h")).read()

    def defined(prefix):
        return {int(v): n.lower() for n, v in re.findall(rf"#define {prefix}(\w+) (\d+)", header)}

    assert device_weights.STAGING_NAMES == defined("RZC_STAGING_")
    assert "register" in device_weights.STAGING_NAMES.values()
    assert device_weights.SHARING_NAMES == defined("RZC_SHARING_")
    assert weights.GUARD_NAMES == defined("RZC_GUARD_")
    assert (_dlpack.kDLCPU, _dlpack.kDLCUDA) == (1, 2)  # dlpack.h's, through the header
    sizes = {n: int(v) for n, v in re.findall(r"#define (RZC_\w+(?:ALIGNMENT|NBYTES)) (\d+)", header)}
    assert (DEFAULT_ALIGNMENT, DEVICE_ALIGNMENT, GUARD_NBYTES) == (
        sizes["RZC_PACK_DEFAULT_ALIGNMENT"],
        sizes["RZC_DEVICE_ALIGNMENT"],
        sizes["RZC_PACK_GUARD_NBYTES"],
    )
    from ray_zerocopy import _seal

    sealed, buf = _seal.seal({"a": np.arange(5, dtype=np.float32), "b": np.ones(3, np.int8)})
    w = rzc.Weights.from_buffer(buf)
    assert all(t.offset % DEVICE_ALIGNMENT == 0 for t in w.table())
    first, last = w.table()[0], w.table()[-1]
    assert first.offset >= GUARD_NBYTES and w.nbytes - (last.offset + last.nbytes) >= GUARD_NBYTES


def test_load_options_are_one_checked_value():
    from dataclasses import FrozenInstanceError

    from ray_zerocopy import _load, _seal
    from ray_zerocopy._device import Device

    options = rzc.LoadOptions(device="cuda:1", framework="numpy")
    assert options.device == Device("cuda", 1) and options.replace(device="cpu").device == Device("cpu")
    with pytest.raises(FrozenInstanceError):
        options.fast = True
    with pytest.raises(rzc.InvalidInputError, match="framework 'tf'"):
        rzc.LoadOptions(framework="tf")
    with pytest.raises(ValueError, match="is not understood"):
        rzc.LoadOptions(device="tpu")

    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    sealed, buf = _seal.seal(tree)
    w = rzc.Weights.from_buffer(buf)
    loaded = _load.build(w, sealed, rzc.LoadOptions(fast=True))
    assert loaded.upload is None and np.array_equal(loaded.pipeline["a"], tree["a"])
    assert np.array_equal(_load.assemble(w, sealed, framework="numpy")["a"], tree["a"])


def test_mapping_at_reads_this_process_mappings():
    import mmap

    from ray_zerocopy.diagnostics import mapping_at, mappings

    area = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(area, dtype=np.uint8)
    m = mapping_at(a.ctypes.data + 100)
    assert m is not None and m.start <= a.ctypes.data and a.ctypes.data + a.nbytes <= m.end
    assert m.shared and m.writable and m.perms.startswith("rw")
    assert mapping_at(0) is None
    rows = mappings()
    assert rows == sorted(rows) and mapping_at(a.ctypes.data, rows) == m
    del a
    area.close()


def test_the_table_is_the_validated_header(tmp_path):
    """Weights.table() is the header the native library validated, in one
    call: the official library reads the same names, dtypes, shapes and
    offsets."""
    from safetensors import safe_open

    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    w = rzc.Weights.open_file(path)
    table = w.table()
    assert table is w.table(), "fetched once"
    with safe_open(str(path), "pt") as f:
        for t in table:
            assert list(t.shape) == list(f.get_slice(t.name).get_shape()), t.name
            assert t.dtype == f.get_slice(t.name).get_dtype(), t.name
    ends = [t.offset + t.nbytes for t in table]
    assert ends[-1] == w.nbytes and all(a <= b.offset for a, b in zip(ends, table[1:], strict=False)), (
        "in the order of the data"
    )


def test_sealing_with_a_progress_bar_writes_the_same_buffer(monkeypatch, capsys):
    """Above the progress threshold on a terminal, sealing copies tensor by
    tensor to show progress on stderr; the buffer is the same as the one
    native call writes."""
    from ray_zerocopy import _seal, _telemetry

    tree = {
        "a": torch.randn(4096),
        "b": torch.arange(1000, dtype=torch.int16),
        "c": torch.ones(3, 7, dtype=torch.bfloat16),
    }
    _, quiet = _seal.seal(tree)
    monkeypatch.setattr(_telemetry, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _, shown = _seal.seal(tree)
    assert "sealing" in capsys.readouterr().err, "a progress bar was shown"
    assert quiet.tobytes() == shown.tobytes()


def test_the_digest_computed_while_sealing_is_that_of_every_byte(monkeypatch, tmp_path):
    """However a buffer is filled (one native call, tensor by tensor with a
    progress bar, a sharded checkpoint), the digest the sealer computed on
    its thread while the bytes landed is the one computed afterwards from
    every byte, and the header claims the data section's plain BLAKE3."""
    from ray_zerocopy import _seal, _telemetry

    tree = {
        "a": torch.randn(300_000),
        "b": torch.arange(1000, dtype=torch.int16),
        "c": torch.ones(3, 7, dtype=torch.bfloat16),
    }
    results = [_seal.seal(tree)]
    monkeypatch.setattr(_telemetry, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(_seal._Progress, "GROUP", 4096)  # the bar advancing: several copies
    results.append(_seal.seal(tree))
    for i in range(3):
        save_file(
            {f"s{i}.x": torch.full((50_000,), float(i)), f"s{i}.y": torch.arange(7, dtype=torch.int64)},
            str(tmp_path / f"model-0000{i}-of-00003.safetensors"),
        )
    results.append(_seal.seal_checkpoint(tmp_path, _seal.TORCH))
    for sealed, buf in results:
        with rzc.Weights.from_buffer(buf) as w:
            assert w.content_digest(trust_claim=False) == w.content_digest() == sealed.content_digest
            claimed = w.metadata["rzc.data_blake3"]
            assert claimed != "0" * 64 and len(claimed) == 64
    assert results[0][0].content_digest == results[1][0].content_digest


def _multi_block_plan(sizes):
    """Tensors of ``sizes`` bytes (filled with their index + 1), planned
    into one buffer with room for the digest, and their data."""
    data = [np.full(n, i + 1, np.uint8) for i, n in enumerate(sizes)]
    plan = rzc.PackPlan(
        [rzc.PackInput(f"t{i}", rzc.Dtype.U8, d.shape, d.ctypes.data, d.nbytes) for i, d in enumerate(data)],
        alignment=256,
        guard_bytes=4096,
        reserve_digest=True,
    )
    return plan, data


def _copies_and_expected(plan, data):
    """The sealer's copies of ``data`` into ``plan``'s layout, the buffer
    they must make, and its content digest (sealed whole)."""
    from ray_zerocopy.packing import seal_buffer

    copies = [(d.ctypes.data, plan.offset(i), d.nbytes) for i, d in enumerate(data)]
    expected = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(expected)
    for (_, at, n), d in zip(copies, data, strict=True):
        expected[at : at + n] = d
    return copies, expected, seal_buffer(expected)


# Several 1 MiB hashing blocks, tensors that straddle their boundaries, one
# that spans three, an empty one and one that shares a block with others.
SIZES = (700_000, 1_500_000, 3, 0, 2_600_000, 1_048_576, 99_999)


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_tensors_copied_by_the_sealer_in_any_order_give_the_digest_of_every_byte(threads):
    """However the tensors reach the sealer (on several threads, in several
    calls, in any order, some written by the caller behind ``advance``), the
    digest is plain BLAKE3 of the data section and the content digest is
    the one ``seal_buffer`` computes from the finished bytes."""
    from ray_zerocopy.packing import Sealer

    plan, data = _multi_block_plan(SIZES)
    copies, expected, want = _copies_and_expected(plan, data)

    # By copies alone, out of order, in three calls.
    dst = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(dst)
    with Sealer(dst) as sealer:
        for group in ([copies[4], copies[1]], [copies[6], copies[0], copies[3]], [copies[5], copies[2]]):
            sealer.copy(group, threads=threads)
        assert sealer.finish() == want
    assert dst.tobytes() == expected.tobytes()

    # The first two written by the caller and declared final, the rest copied.
    dst = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(dst)
    with Sealer(dst) as sealer:
        for _, at, n in copies[:2]:
            dst[at : at + n] = expected[at : at + n]
        sealer.advance(plan.offset(2))
        sealer.copy(copies[2:], threads=threads)
        assert sealer.finish() == want
    with rzc.Weights.from_buffer(dst) as w:
        assert w.content_digest(trust_claim=False) == w.content_digest() == want


def test_declaring_bytes_final_while_they_are_copied_waits_for_the_copy():
    """A watermark raised past tensors that a copy is still writing (from
    another thread, as the contract allows) does not get their blocks
    hashed before the copy has written them: the digest is still that of
    the final bytes. (Where the watermark came first, the copy is refused
    whole, as it must be; such a round is done again.)"""
    import threading
    import time

    from ray_zerocopy.packing import Sealer

    plan, data = _multi_block_plan((48 << 20, 3, 5 << 20))
    copies, expected, want = _copies_and_expected(plan, data)
    raced = 0
    for _ in range(20):
        dst = np.zeros(plan.nbytes, np.uint8)
        plan.write_layout(dst)
        with Sealer(dst) as sealer:
            copying, done = threading.Event(), threading.Event()

            def declare_all_final(sealer=sealer, copying=copying, done=done):
                copying.wait()
                time.sleep(0.001)  # the copy has taken its tensors by now
                while not done.is_set():
                    sealer.advance(plan.nbytes)

            t = threading.Thread(target=declare_all_final)
            t.start()
            copying.set()
            try:
                sealer.copy(copies, threads=1)  # one thread: the slowest copy, the widest window
            except rzc.InvalidArgumentError as e:
                assert "below the bytes declared final" in str(e)
                continue
            finally:
                done.set()
                t.join()
            assert sealer.finish() == want
        assert dst.tobytes() == expected.tobytes()
        raced += 1
        if raced == 3:
            break
    assert raced == 3, "the copy never ran while the watermark rose"


def test_a_refused_copy_names_the_problem_and_copies_nothing():
    """A copy that does not match the layout, copies a tensor twice, reads
    from the buffer itself, or writes below the final bytes is refused with
    an error that names it; nothing of that call is copied, and the buffer
    still seals to the digest of its bytes."""
    from ray_zerocopy.packing import Sealer

    plan, data = _multi_block_plan(SIZES)
    copies = [(d.ctypes.data, plan.offset(i), d.nbytes) for i, d in enumerate(data)]
    dst = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(dst)
    with Sealer(dst) as sealer:
        src, at, n = copies[1]
        bad = {
            "no tensor's data starts at offset": [copies[0], (src, at + 1, n)],
            f"is {n} bytes, not {n - 1}": [copies[0], (src, at, n - 1)],
            "named twice": [copies[0], copies[1], copies[1]],
            "overlaps the sealer's buffer": [copies[0], (dst.ctypes.data + 10, at, n)],
        }
        for message, group in bad.items():
            with pytest.raises(rzc.InvalidArgumentError, match=message):
                sealer.copy(group)
        assert not dst[copies[0][1] : copies[0][1] + copies[0][2]].any(), "a refused call copied nothing"
        sealer.copy(copies[:2])
        with pytest.raises(rzc.InvalidArgumentError, match=r"copies\[1\]: the tensor at offset \d+ is filled already"):
            sealer.copy([copies[4], copies[1]])
        dst[copies[2][1] : copies[2][1] + 3] = data[2]
        sealer.advance(plan.offset(3))
        with pytest.raises(rzc.InvalidArgumentError, match="below the bytes declared final"):
            sealer.copy([copies[2]])
        sealer.copy(copies[3:])
        digest = sealer.finish()
        with pytest.raises(rzc.InvalidArgumentError, match="finished already"):
            sealer.copy([copies[0]])
    with rzc.Weights.from_buffer(dst) as w:
        assert w.content_digest(trust_claim=False) == w.content_digest() == digest


@pytest.mark.parametrize("threads", [1, 2])
def test_tensors_read_from_a_file_by_the_sealer_give_the_digest_of_every_byte(tmp_path, threads):
    """``Sealer.read`` fills tensors from an open file by pread (at other
    offsets than the buffer's, in any order, in several calls, beside
    copies from memory), and the buffer seals to the digest of its bytes."""
    import os

    from ray_zerocopy.packing import Sealer

    plan, data = _multi_block_plan(SIZES)
    copies, expected, want = _copies_and_expected(plan, data)
    # The file holds the tensors back to back after a 123-byte prefix.
    at_in_file, pos = [], 123
    for d in data:
        at_in_file.append(pos)
        pos += d.nbytes
    path = tmp_path / "tensors.bin"
    path.write_bytes(b"p" * 123 + b"".join(d.tobytes() for d in data))
    reads = [(src, at, n) for src, (_, at, n) in zip(at_in_file, copies, strict=True)]
    dst = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(dst)
    fd = os.open(path, os.O_RDONLY)
    try:
        with Sealer(dst) as sealer:
            sealer.read(fd, [reads[5], reads[1], reads[4]], threads=threads)
            sealer.copy([copies[0], copies[6]], threads=threads)
            sealer.read(fd, [reads[3], reads[2]], threads=threads)
            assert sealer.finish() == want
    finally:
        os.close(fd)
    assert dst.tobytes() == expected.tobytes()


def test_a_file_that_ends_inside_a_tensor_is_an_error_and_the_buffer_is_never_sealed(tmp_path):
    """A file shorter than the tensors read from it (cut short while it is
    read, say) raises an error naming the entry and the file's size, never
    a SIGBUS and never a tensor half read; the sealer then refuses to go on
    and to finish, since its buffer is not whole. Also on several threads,
    with many blocks in flight; a descriptor that cannot be read is refused
    up front."""
    import os

    from ray_zerocopy.packing import Sealer

    plan, data = _multi_block_plan(SIZES)
    copies, _, _ = _copies_and_expected(plan, data)
    path = tmp_path / "short.bin"
    path.write_bytes(data[1].tobytes()[:1_000_000])  # tensor 1 is 1,500,000 bytes
    dst = np.zeros(plan.nbytes, np.uint8)
    plan.write_layout(dst)
    fd = os.open(path, os.O_RDONLY)
    try:
        with Sealer(dst) as sealer:
            with pytest.raises(rzc.InvalidArgumentError, match="not a file descriptor"):
                sealer.read(-1, [(0, copies[1][1], copies[1][2])])
            with pytest.raises(rzc.InvalidArgumentError, match="past any file's end"):
                sealer.read(fd, [(2**63, copies[1][1], copies[1][2])])
            with pytest.raises(rzc.InvalidArgumentError, match=r"reads: the tensor at offset \d+ is named twice"):
                sealer.read(fd, [(0, copies[1][1], copies[1][2])] * 2)
            short = r"reads\[0\] \(1500000 bytes from offset 0 of fd \d+\): the file is 1000000 bytes long"
            with pytest.raises(rzc.IoError, match=short):
                sealer.read(fd, [(0, copies[1][1], copies[1][2])], threads=2)
            with pytest.raises(rzc.InvalidArgumentError, match="cannot be sealed: .*is 1000000 bytes long"):
                sealer.copy([copies[0]])
            with pytest.raises(rzc.InvalidArgumentError, match="cannot be sealed"):
                sealer.finish()
        # A descriptor that cannot be read at all is refused before anything
        # is taken: the sealer goes on (it used to fail, for good).
        with Sealer(dst) as sealer:
            import resource

            # No descriptor reaches the limit.
            never_open = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 2**31 - 1)
            with pytest.raises(rzc.InvalidArgumentError, match="is not open: Bad file descriptor"):
                sealer.read(never_open, [(0, copies[0][1], copies[0][2])])
            with open(path, "ab") as write_only:
                with pytest.raises(rzc.InvalidArgumentError, match="open for writing only"):
                    sealer.read(write_only.fileno(), [(0, copies[0][1], copies[0][2])])
            sealer.copy([copies[0]])
            sealer.finish()
    finally:
        os.close(fd)

    # 48 MiB on several threads, the file ending a third of the way in:
    # whichever block fails first, the message gives the file's size, the
    # workers stop, and the blocks past the end are never hashed.
    plan, data = _multi_block_plan((48 << 20, 3))
    copies, _, _ = _copies_and_expected(plan, data)
    path.write_bytes(data[0].tobytes()[: 16 << 20])
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(5):
            dst = np.zeros(plan.nbytes, np.uint8)
            plan.write_layout(dst)
            with Sealer(dst) as sealer:
                with pytest.raises(rzc.IoError, match=f"reads\\[0\\] .*: the file is {16 << 20} bytes long"):
                    sealer.read(fd, [(0, copies[0][1], copies[0][2])], threads=4)
                sealer.advance(plan.nbytes)  # declaring it final changes nothing
                with pytest.raises(rzc.InvalidArgumentError, match="cannot be sealed"):
                    sealer.finish()
    finally:
        os.close(fd)


def test_a_numpy_load_imports_ml_dtypes_only_for_a_type_numpy_lacks(tmp_path):
    """``ml_dtypes`` (bfloat16, float8 for numpy) takes half a second to
    import on some machines: a fresh process loading float32 arrays must not
    pay it; one loading bfloat16 arrays gets them through it."""
    import subprocess

    pytest.importorskip("ml_dtypes")
    script = """
import sys
import numpy as np
from ray_zerocopy import _load, _seal, Weights
sealed, buf = _seal.seal({"a": np.arange(6, dtype=np.float32)})
loaded = _load.assemble(Weights.from_buffer(buf), sealed)
assert loaded["a"].tolist() == list(range(6)) and "ml_dtypes" not in sys.modules, sorted(sys.modules)
import ml_dtypes
sealed, buf = _seal.seal({"b": np.arange(4).astype(ml_dtypes.bfloat16)})
del sys.modules["ml_dtypes"]  # as if not imported yet: the load must import it
loaded = _load.assemble(Weights.from_buffer(buf), sealed)
assert loaded["b"].dtype.name == "bfloat16" and loaded["b"].astype(np.float32).tolist() == [0, 1, 2, 3]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_every_leaf_keeps_its_shape_and_dtype_scalars_included():
    """0-d arrays (a temperature, a logit scale, a step counter) come back
    0-d, in every framework, with their dtype and value."""
    jnp = pytest.importorskip("jax.numpy")
    from ray_zerocopy import _load, _seal

    tree = {
        "temperature": np.array(0.7, np.float32),
        "step": np.array(12345, np.int64),
        "logit_scale": jnp.array(2.5, jnp.float32),
        "bias": torch.tensor(3.0, dtype=torch.bfloat16),
        "table": np.arange(6, dtype=np.int32).reshape(2, 3),
        "strided": np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # not contiguous: copied when sealed
    }
    sealed, buf = _seal.seal(tree)
    out = _load.assemble(rzc.Weights.from_buffer(buf), sealed)
    for k, v in tree.items():
        got = out[k]
        assert type(got) is type(v) or k == "logit_scale", (k, type(got))
        assert tuple(got.shape) == tuple(v.shape) and got.dtype == v.dtype, (k, got.shape, got.dtype)
        assert np.array_equal(
            np.asarray(got.float() if k == "bias" else got), np.asarray(v.float() if k == "bias" else v)
        ), k


def test_columns_are_the_table_read_in_bulk(tmp_path):
    """``Weights.columns()`` (dtype, shape, offset, size of every tensor, read
    with three native calls) says what ``table()`` says, for every dtype, a
    scalar and an empty tensor."""
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), str(path))
    w = rzc.Weights.open_file(path)
    dtypes, shapes, offsets, nbytes = w.columns()
    table = w.table()
    assert dtypes == [t.dtype for t in table]
    assert shapes == [t.shape for t in table] and () in shapes and (0, 3) in shapes
    assert offsets == [t.offset for t in table]
    assert nbytes == [t.nbytes for t in table]


def test_dims_need_room_for_every_extent(tmp_path):
    from ray_zerocopy._native import ffi, lib

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "s": torch.tensor(1.0), "b": torch.zeros(4)}, str(path))
    w = rzc.Weights.open_file(path)
    handle = w._live()
    assert lib.rzc_weights_dims_len(handle) == 3
    dims = ffi.new("int64_t[]", 2)
    assert lib.rzc_weights_get_dims(handle, dims, 2) == lib.RZC_BUFFER_TOO_SMALL
    assert list(dims) == [0, 0], "nothing may be written when the array is too small"
    assert lib.rzc_weights_dims_len(ffi.NULL) == 0


def test_a_buffer_that_is_not_the_wrappers_is_refused_by_what_differs():
    """A pipeline is built only from the buffer it was sealed into: another
    with as many tensors (other values) or with other tensors is refused,
    and the error says which buffer and what differs."""
    from ray_zerocopy import BufferMismatchError, _load, _seal

    sealed, _ = _seal.seal({"a": np.zeros(4, np.float32), "b": np.ones(2, np.float32)})
    _, other_values = _seal.seal({"a": np.zeros(4, np.float32), "b": np.full(2, 2, np.float32)})
    _, fewer = _seal.seal({"a": np.zeros(4, np.float32)})
    with pytest.raises(BufferMismatchError, match="the buffer is not the one .*: its content digest differs"):
        _load.assemble(rzc.Weights.from_buffer(other_values), sealed)
    with pytest.raises(BufferMismatchError, match="it holds 1 tensors, not 2"):
        _load.assemble(rzc.Weights.from_buffer(fewer), sealed)


def test_big_endian_arrays_keep_their_values():
    """A big-endian array's dtype is named like the native one (">f4" is
    "float32"): sealed as it is, its bytes came back as other numbers. It is
    stored little-endian, as safetensors holds values, and reads back equal,
    a scalar and a non-contiguous view included (an update packs its arrays
    with the same ``pack_input``)."""
    from ray_zerocopy import _load, _seal

    pipeline = {
        "f": np.full(4, 2.5, ">f4"),
        "i": np.arange(-3, 3, dtype=">i8"),
        "h": np.arange(12, dtype=">f2").reshape(3, 4)[:, ::2],
        "s": np.array(7, dtype=">i4"),
        "u": np.arange(3, dtype=">u2"),
    }
    sealed, buf = _seal.seal(pipeline)
    loaded = _load.assemble(rzc.Weights.from_buffer(buf), sealed)
    for k, a in pipeline.items():
        assert loaded[k].shape == a.shape and loaded[k].dtype == a.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(loaded[k], a)


def test_loaded_parameters_are_frozen_parameters_over_the_buffer():
    """A load turns each adopted tensor into the parameter itself (its class
    set, as torch's UninitializedParameter.materialize does): it is an
    ``nn.Parameter`` in every way a model uses one, over the shared bytes."""
    import copy
    import io
    import pickle

    from ray_zerocopy import _load, _seal

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).eval()
    model.register_buffer("scale", torch.tensor(2.0))
    x = torch.randn(3, 8)
    expected = model(x) * 2
    sealed, buf = _seal.seal(model)
    w = rzc.Weights.from_buffer(buf)
    for fast in (False, True):
        loaded = _load.assemble(w, sealed, fast=fast)
        params = list(loaded.parameters())
        assert len(params) == 4
        for p in params:
            assert type(p) is torch.nn.Parameter and not p.requires_grad and p.is_leaf
            assert w.address <= p.data_ptr() < w.address + w.nbytes, "the parameter was copied"
        assert type(loaded.scale) is torch.Tensor, "a buffer stays a plain tensor"
        torch.testing.assert_close(loaded(x) * loaded.scale, expected)
        seen = []
        loaded[0].register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape))
        loaded(x)
        assert seen == [torch.Size([3, 4])]
        twin = copy.deepcopy(loaded)
        with torch.no_grad():
            next(twin.parameters()).add_(1.0)  # a private, writable copy
        assert type(next(twin.parameters())) is torch.nn.Parameter
        torch.testing.assert_close(loaded(x) * loaded.scale, expected)
        f = io.BytesIO()
        torch.save(loaded.state_dict(), f)
        f.seek(0)
        assert torch.equal(torch.load(f)["0.weight"], model[0].weight)
        if not fast:
            # Each parameter is its own storage: pickled alone it carries its own bytes only.
            assert len(pickle.dumps(params[1])) < 2048
        loaded[0].weight.requires_grad_(True)  # fine-tuning a loaded model starts like this
        assert loaded[0].weight.requires_grad


@pytest.mark.parametrize("layout", ["none_aligned", "every_other_aligned"])
def test_arrays_jax_refuses_are_copied_and_their_exports_freed(layout):
    """JAX adopts only 64-byte aligned memory: from a buffer that is not,
    every array it refuses is made another way (a copy, with the right
    values), and each DLPack tensor it was offered and left is freed: once
    the arrays are gone and the handle closed, nothing holds the buffer.
    ``every_other_aligned``: JAX takes the first array, then refuses the
    second, midway through the import of all of them in one go; every array
    is made again, the aligned ones adopted."""
    pytest.importorskip("jax")
    from ray_zerocopy import _jax

    data = [np.arange(100, dtype=np.float32) + k for k in range(5)]  # 400 bytes each
    inputs = [rzc.PackInput(f"t{k}", rzc.Dtype.F32, d.shape, d.ctypes.data, d.nbytes) for k, d in enumerate(data)]
    packed = rzc.pack(inputs, alignment=32 if layout == "every_other_aligned" else 64)
    raw = np.empty(len(packed) + 64, np.uint8)
    skew = (-raw.ctypes.data % 64) + (8 if layout == "none_aligned" else 0)  # from a 64-byte boundary
    buf = raw[skew : skew + len(packed)]
    buf[:] = np.frombuffer(packed, np.uint8)
    gc.collect()  # buffers earlier tests left in garbage cycles go now, not mid-test
    base = live_buffers()
    w = rzc.Weights.from_buffer(buf)
    addresses = [w.address + w.info(k).offset for k in range(len(w))]
    aligned = [a % 64 == 0 for a in addresses]
    assert aligned == ([False] * 5 if layout == "none_aligned" else [aligned[0], not aligned[0]] * 2 + [aligned[0]])
    got = _jax.adopt(w, list(range(len(w))))
    for k, a in enumerate(got):
        np.testing.assert_array_equal(np.asarray(a), data[k])
        assert (a.unsafe_buffer_pointer() == addresses[k]) == aligned[k], f"array {k}: adopted iff aligned"
    del got, a
    w.close()
    gc.collect()
    assert live_buffers() == base, "a DLPack tensor JAX refused still holds the buffer"


def test_jax_arrays_are_the_same_by_either_import():
    """JAX arrays come from JAX's own DLPack import, called directly where this
    jaxlib has it in the known form; they must equal what the public
    ``jax.dlpack.from_dlpack`` makes, zero-copy, and a dtype JAX would
    convert (float64 without x64) takes the public way."""
    jax = pytest.importorskip("jax")
    from ray_zerocopy import _jax

    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i8": np.arange(-4, 4, dtype=np.int8),
        "bool": np.array([True, False, True]),
        "f64": np.linspace(0, 1, 5),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 2), np.float32),
    }
    codes = {"float32": rzc.Dtype.F32, "int8": rzc.Dtype.I8, "bool": rzc.Dtype.BOOL, "float64": rzc.Dtype.F64}
    w = rzc.Weights.from_buffer(
        rzc.pack([rzc.PackInput(k, codes[str(v.dtype)], v.shape, v.ctypes.data, v.nbytes) for k, v in arrays.items()])
    )
    names = w.names()
    got = _jax.adopt(w, list(range(len(w))))
    assert _jax._direct() is not None, "this jaxlib's DLPack import was not found: every array took the slow way"
    for name, a in zip(names, got, strict=True):
        public = jax.dlpack.from_dlpack(w.dlpack(w.find(name)))
        assert isinstance(a, jax.Array) and a.dtype == public.dtype and a.shape == public.shape, name
        assert a.sharding == public.sharding, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(public))
        np.testing.assert_array_equal(np.asarray(a), arrays[name].astype(a.dtype))
        if name != "f64" and a.size:
            assert a.unsafe_buffer_pointer() == w.address + w.info(w.find(name)).offset, f"{name} was copied"
