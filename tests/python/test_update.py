"""New versions that store only what changed (``ActorWrapper.update``) on a
real local Ray cluster, with real torch and transformers models: what the
delta holds, where every loaded tensor's memory is, chains of updates, and
the errors."""

import copy
import gc
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from models import Encoder, Pipeline, ids  # noqa: E402
from ray_zerocopy import ActorWrapper, InvalidInputError, RayZeroCopyError  # noqa: E402
from ray_zerocopy.packing import GUARD_NBYTES  # noqa: E402


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _object_size(ray, ref) -> int:
    """Bytes the object takes in Ray's object store, as Ray reports them."""
    return ray.experimental.get_object_locations([ref])[ref]["object_size"]


def _ranges(ray, refs) -> list:
    """``[start, end)`` of each object's mapping in this process."""
    out = []
    for ref in refs:
        buf = ray.get(ref)
        start = buf.__array_interface__["data"][0]
        out.append((start, start + buf.nbytes))
    return out


def _where(ptr, ranges):
    """Index of the range ``ptr`` lies in, or None."""
    return next((k for k, (lo, hi) in enumerate(ranges) if lo <= ptr < hi), None)


class _Holder:
    """An actor that loads versions and reports on them."""

    def __init__(self, wrappers):
        self.models = [w.load() for w in wrappers]

    def logits(self, k, x):
        with torch.no_grad():
            return self.models[k](x).logits

    def places(self, k, refs):
        """For each state-dict tensor of model ``k``: which of ``refs``'
        objects its memory lies in (None: private memory)."""
        import ray

        ranges = _ranges(ray, refs)
        return {n: _where(t.data_ptr(), ranges) for n, t in self.models[k].state_dict().items()}

    def tied(self, k):
        m = self.models[k]
        return m.lm_head.weight is m.model.embed_tokens.weight


def _fine_tune(model, names, delta=0.25):
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            tuned.get_parameter(n).add_(delta)
    return tuned


CHANGED = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight", "model.norm.weight"]


def test_a_fine_tuned_transformers_model_stores_only_what_changed(ray_cluster):
    """The delta of a fine-tuned Llama over its base holds the changed
    tensors only (plus header, guards and alignment); loaded in an actor,
    the new version computes as the fine-tuned model, its unchanged
    tensors' memory is the base object's, its changed ones the delta's, and
    tied weights stay tied."""
    ray = ray_cluster
    base_model = _llama()
    tuned = _fine_tune(base_model, CHANGED)
    base = ActorWrapper(base_model)
    new = base.update(tuned)

    assert new.object_refs[0] == base.object_ref and new.object_refs[-1] == new.object_ref
    assert len(new.object_refs) == 2 and new.num_tensors == base.num_tensors
    changed = sum(tuned.get_parameter(n).nbytes for n in CHANGED)
    delta, whole = _object_size(ray, new.object_ref), _object_size(ray, base.object_ref)
    # What Ray stores beside the buffer: its serialization header.
    assert 0 <= delta - new.nbytes < 1024 and 0 <= whole - base.nbytes < 1024
    # Header (a few hundred bytes a tensor), one guard page on each side,
    # at most 255 bytes of padding a tensor: nothing else.
    assert changed <= new.nbytes <= changed + 2 * GUARD_NBYTES + 4096 + 256 * len(CHANGED), (delta, changed)
    assert delta < 0.25 * whole, f"the delta is {delta} bytes for a {whole}-byte base"
    print(f"\nbase object {whole} B, delta object {delta} B, changed tensors {changed} B")

    actor = ray.remote(_Holder).remote([base, new])
    x = ids(n=2, seq=7, vocab=256)
    with torch.no_grad():
        assert torch.equal(ray.get(actor.logits.remote(1, x)), tuned(x).logits)
        assert torch.equal(ray.get(actor.logits.remote(0, x)), base_model(x).logits)
    places = ray.get(actor.places.remote(1, list(new.object_refs)))
    assert {n for n, k in places.items() if k == 1} == set(CHANGED)
    assert all(k == 0 for n, k in places.items() if n not in CHANGED), places
    assert ray.get(actor.tied.remote(1))
    ray.kill(actor)


def test_a_state_dict_update_of_a_module(ray_cluster):
    """A state dict applied onto the base module by its state-dict names: the
    named tensors (a parameter, a persistent buffer) take the new values,
    the rest stay the base's, in an actor, and parameters stay parameters."""
    ray = ray_cluster
    enc = Encoder().eval()
    base = ActorWrapper(enc)
    weight = torch.randn(32, 32)
    new = base.update({"block.0.weight": weight, "norm.running_mean": torch.full((32,), 0.5)})
    assert new.nbytes < 3 * GUARD_NBYTES + weight.nbytes + 1024

    @ray.remote
    def check(wrappers, refs):
        old, cur = (w.load() for w in wrappers)
        ranges = _ranges(ray, refs)
        where = {n: _where(t.data_ptr(), ranges) for n, t in cur.state_dict().items()}
        is_param = isinstance(cur.block[0].weight, torch.nn.Parameter)
        return cur.block[0].weight.clone(), cur.norm.running_mean.clone(), old.block[0].weight.clone(), where, is_param

    w, mean, old_w, where, is_param = ray.get(check.remote([base, new], list(new.object_refs)))
    assert torch.equal(w, weight) and torch.equal(mean, torch.full((32,), 0.5)) and is_param
    assert torch.equal(old_w, enc.block[0].weight)
    assert where["block.0.weight"] == where["norm.running_mean"] == 1
    # A non-persistent buffer (in no state dict) is named as it is in the module.
    assert base.update({"scale": torch.tensor(2.0)}).load().scale.item() == 2.0
    assert all(k == 0 for n, k in where.items() if n not in ("block.0.weight", "norm.running_mean")), where


def test_a_chain_of_updates_keeps_only_the_parts_it_uses(ray_cluster):
    """An update of an update refers to the first version and the earlier
    delta it still uses, copying nothing either holds; once a delta's
    tensors are all superseded (or reverted to the base's values) the new
    version no longer refers to it."""
    enc = Encoder().eval()
    enc.unchanged = torch.nn.Linear(128, 128)  # the changes are a small share of the model, as in a fine-tune
    v0 = ActorWrapper(enc)
    a0, b0 = enc.block[0].weight.detach().clone(), enc.emb.weight.detach().clone()
    a1, b2, a3 = torch.randn(32, 32), torch.randn(64, 32), torch.randn(32, 32)
    v1 = v0.update({"block.0.weight": a1})
    v2 = v1.update({"emb.weight": b2})  # a1 lives on in v1's delta
    assert v2.object_refs[:2] == (v0.object_ref, v1.object_ref) and len(v2.object_refs) == 3
    assert v2.nbytes < 3 * GUARD_NBYTES + b2.nbytes + 1024, "v2 stores only its own change"
    v3 = v2.update({"block.0.weight": a3})  # supersedes v1's only tensor
    assert v1.object_ref not in v3.object_refs
    assert v3.object_refs[:2] == (v0.object_ref, v2.object_ref) and len(v3.object_refs) == 3
    # Reverted to the base's values: the base's tensors, nothing stored.
    v4 = v3.update({"block.0.weight": a0, "emb.weight": b0})
    assert v4.object_refs[0] == v0.object_ref and len(v4.object_refs) == 2
    assert v4.nbytes <= 2 * GUARD_NBYTES + 4096, "a revert stores no tensor"
    # A whole pipeline equal to an older version's: nothing stored either.
    v5 = v4.update(copy.deepcopy(enc))
    assert len(v5.object_refs) == 2 and v5.nbytes <= 2 * GUARD_NBYTES + 4096

    ray = pytest.importorskip("ray")

    @ray.remote
    def values(wrappers):
        return [(m.block[0].weight.clone(), m.emb.weight.clone()) for m in (w.load() for w in wrappers)]

    got = ray.get(values.remote([v0, v1, v2, v3, v4, v5]))
    want = [(a0, b0), (a1, b0), (a1, b2), (a3, b2), (a0, b0), (a0, b0)]
    for k, ((a, b), (wa, wb)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, wa) and torch.equal(b, wb), f"version {k}"


def test_a_version_holds_at_most_twice_its_size_whatever_chain_of_updates_made_it(ray_cluster):
    """Each update of a chain changes layers k to 15 of 16: a version kept
    every earlier delta it took one layer from (the 16th held 16 objects,
    8.5 times its size, for as long as it lived). The tensors it takes from
    an object it uses less than half of are copied into its delta instead,
    with their values, and what the version holds stays under twice its
    size; an object it uses more of is still shared."""
    layers = 16
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64, bias=False) for _ in range(layers))).eval()
    size = sum(p.nbytes for p in model.parameters())
    versions, want = [ActorWrapper(model)], copy.deepcopy(model)
    for k in range(1, layers):
        changed = {f"{i}.weight": torch.full((64, 64), float(k)) for i in range(k, layers)}
        versions.append(versions[-1].update(changed))
        want.load_state_dict(changed, strict=False)
        held = versions[-1].total_nbytes
        assert held < 2 * size + (len(versions[-1].object_refs) + 1) * 4 * GUARD_NBYTES, (k, held / size)
    newest = versions[-1]
    assert len(newest.object_refs) < layers // 2, "parts it uses little of are not kept (16 were)"
    x = torch.randn(2, 64)
    assert torch.equal(newest.load()(x), want(x))
    # A small change refers to the base for everything else, as before.
    small = versions[0].update({"0.weight": torch.zeros(64, 64)})
    assert small.object_refs[0] == versions[0].object_ref and small.nbytes < 3 * GUARD_NBYTES + 64 * 64 * 4 + 1024


def test_tied_weights_stay_tied_across_an_update(ray_cluster):
    """A tied tensor replaced under one of its names is replaced under all;
    given two different values under its two names it is an error."""
    pipe = Pipeline()
    base = ActorWrapper(pipe)
    emb = torch.randn(64, 32)
    new = base.update({"decoder.proj.weight": emb})
    loaded = new.load()
    assert loaded.decoder.proj.weight is loaded.encoder.emb.weight
    assert torch.equal(loaded.encoder.emb.weight, emb)
    same = base.update({"decoder.proj.weight": emb, "encoder.emb.weight": emb.clone()})
    assert same.nbytes == new.nbytes
    with pytest.raises(InvalidInputError, match="'encoder.emb.weight'.*'decoder.proj.weight'|one tied tensor"):
        base.update({"encoder.emb.weight": emb, "decoder.proj.weight": emb + 1})


class _Fresh:
    """An object whose state is an array made anew each time it is pickled
    (as a ``__reduce__`` that converts its weights does)."""

    def __init__(self, k):
        self.k, self.w = k, None

    def __reduce__(self):
        return (_Fresh, (0,), np.full(1024, self.k, np.float32))

    def __setstate__(self, state):
        self.w = state


def test_arrays_made_while_pickling_an_update_keep_their_own_values(ray_cluster):
    """Each array ``__reduce__`` makes is freed once pickled unless the
    sealer keeps it; one equal to the base's was not kept, so the next array
    could take its id, and with it its reference: version 2 loaded as
    [1, 1, 1] instead of [1, 3, 4]."""
    base = ActorWrapper([_Fresh(1), _Fresh(2), _Fresh(5)])
    new = base.update([_Fresh(1), _Fresh(3), _Fresh(4)])
    assert [float(h.w[0]) for h in base.load()] == [1.0, 2.0, 5.0]
    assert [float(h.w[0]) for h in new.load()] == [1.0, 3.0, 4.0]


def test_a_version_s_digest_and_key_name_its_weights_not_its_delta(ray_cluster):
    """Two different models given the same change have equal deltas; the
    versions' content digests and share keys must still differ (a cache by
    either would otherwise hand one model's weights for the other's), while
    a version sealed once keeps its own."""
    head = np.full(64, 9.0, np.float32)
    a = ActorWrapper({"body": np.full(256, 1.0, np.float32), "head": np.zeros(64, np.float32)})
    b = ActorWrapper({"body": np.full(256, 2.0, np.float32), "head": np.zeros(64, np.float32)})
    a2, b2 = a.update({"head": head}), b.update({"head": head})
    assert a2._sealed.content_digest == b2._sealed.content_digest, "equal deltas: the case in point"
    assert a2.content_digest != b2.content_digest and a2.share_key != b2.share_key
    assert a2.content_digest not in (a.content_digest, b.content_digest)
    assert a2.share_key not in (a.share_key, b.share_key)
    again = pickle.loads(pickle.dumps(a2))
    assert (again.content_digest, again.share_key) == (a2.content_digest, a2.share_key)
    np.testing.assert_array_equal(a2.load()["body"], np.full(256, 1.0, np.float32))
    np.testing.assert_array_equal(b2.load()["head"], head)


def test_errors_name_the_tensor(ray_cluster):
    base = ActorWrapper(Encoder().eval())
    with pytest.raises(InvalidInputError, match="no tensor 'block.9.weight'"):
        base.update({"block.9.weight": torch.zeros(32, 32)})
    with pytest.raises(InvalidInputError, match=r"'block.0.weight' is F32 \[32, 32\] in the base.*F32 \[32, 31\]"):
        base.update({"block.0.weight": torch.zeros(32, 31)})
    with pytest.raises(InvalidInputError, match=r"'block.0.bias' is F32 \[32\] in the base.*F16 \[32\]"):
        base.update({"block.0.bias": torch.zeros(32, dtype=torch.float16)})
    with pytest.raises(InvalidInputError, match="'block.0.bias' is a torch tensor in the base, not a ndarray"):
        base.update({"block.0.bias": np.zeros(32, np.float32)})
    assert issubclass(InvalidInputError, RayZeroCopyError)


def test_a_new_value_in_another_layout_takes_the_base_s_as_load_state_dict_gives(ray_cluster):
    """A state dict's value in another memory order than its tensor in the
    base (a transposed copy, a contiguous value for a channels_last weight)
    loads in the base's layout, as after ``load_state_dict``, with its
    values; one of the base's values in another order is no change at all.
    A value of another shape is refused, never broadcast into the base's."""
    lin = torch.nn.Linear(6, 4)
    conv = torch.nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
    model = torch.nn.ModuleDict({"lin": lin, "conv": conv}).eval()
    base = ActorWrapper(model)
    sd = {
        "lin.weight": torch.randn(6, 4).t(),  # column-major
        "conv.weight": torch.randn(5, 3, 3, 3),  # contiguous, the base channels_last
    }
    new = base.update(sd)
    ref = copy.deepcopy(model)
    ref.load_state_dict(sd, strict=False)
    got = new.load()
    for name in sd:
        t, r = got.get_submodule(name.split(".")[0]).weight, ref.get_submodule(name.split(".")[0]).weight
        assert t.stride() == r.stride() and torch.equal(t, r), name
    assert got.lin.weight.view(-1).numel() == 24  # a view of the weight, as the model's own code may take

    same = base.update({"lin.weight": lin.weight.detach().t().contiguous().t()})
    assert same.nbytes < 3 * GUARD_NBYTES + 1024  # nothing changed: no tensor stored
    with pytest.raises(InvalidInputError, match=r"'lin.weight' is F32 \[4, 6\] in the base.*F32 \[6\]"):
        base.update({"lin.weight": torch.randn(6)})


def test_old_and_new_versions_side_by_side_in_one_process(ray_cluster):
    """Both versions loaded in one process are right, and share the memory
    of every unchanged tensor (one opened base object for both)."""
    pipe = Pipeline()
    base = ActorWrapper(pipe)
    tuned = copy.deepcopy(pipe)
    with torch.no_grad():
        tuned.heads["extra"][0].weight.mul_(-1)
    new = base.update(tuned)
    old_p, new_p = base.load(), new.load()
    x = ids()
    with torch.no_grad():
        assert torch.equal(old_p(x), pipe(x)) and torch.equal(new_p(x), tuned(x))
    assert new_p.encoder.emb.weight.data_ptr() == old_p.encoder.emb.weight.data_ptr()
    assert new_p.heads["extra"][0].weight.data_ptr() != old_p.heads["extra"][0].weight.data_ptr()


def test_an_update_of_the_base_loaded_here_reads_no_unchanged_tensor(ray_cluster):
    """The base pipeline loaded in the driver with a few tensors replaced:
    every unchanged tensor is the base's by its address (identity), not by
    comparing bytes; a pytree of numpy arrays updates as well."""
    from ray_zerocopy import _delta

    calls = []
    real = _delta._equal

    def counting(a, b, n):
        calls.append(n)
        return real(a, b, n)

    tree = {"a": np.arange(4096, dtype=np.float32), "b": np.ones((64, 64), np.float32), "c": np.zeros(7, np.int64)}
    base = ActorWrapper(tree)
    loaded = base.load()
    loaded = dict(loaded, b=np.full((64, 64), 2, np.float32))
    _delta._equal = counting
    try:
        new = base.update(loaded)
    finally:
        _delta._equal = real
    assert calls == [64 * 64 * 4], "only the replaced array is compared (with the base array of its name)"
    got = new.load()
    assert np.array_equal(got["a"], tree["a"]) and np.array_equal(got["b"], loaded["b"])
    assert got["a"].__array_interface__["data"][0] == loaded["a"].__array_interface__["data"][0]
    assert not got["b"].flags.writeable


def _objects_listed() -> str:
    """Ray's table of every object some process of this cluster references
    (``ray memory``)."""
    import ray
    from ray._private.internal_api import memory_summary

    # This cluster's address: other clusters may run on the machine.
    return memory_summary(address=ray.get_runtime_context().gcs_address, units="B", num_entries=100000)


def test_a_delta_no_version_uses_is_freed_with_the_versions_that_used_it(ray_cluster):
    """v2 supersedes v1's only change: once v1 is dropped no process
    references its delta, so Ray frees it, while the base that v2 still
    uses stays (and loads)."""
    import time

    v0 = ActorWrapper({"a": torch.zeros(1 << 20), "b": torch.ones(1 << 20)})
    v1 = v0.update({"a": torch.randn(1 << 20)})
    a2 = torch.randn(1 << 20)
    v2 = v1.update({"a": a2})
    assert v1.object_ref not in v2.object_refs
    old = v1.object_ref.hex()
    assert old in _objects_listed()
    del v1
    # No garbage collection in this process meanwhile: nothing here may hold
    # the delta in a reference cycle.
    gc.disable()
    try:
        deadline = time.monotonic() + 30
        while old in _objects_listed() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        gc.enable()
    listed = _objects_listed()
    assert old not in listed and all(r.hex() in listed for r in v2.object_refs)
    got = v2.load()
    assert torch.equal(got["a"], a2) and torch.equal(got["b"], torch.ones(1 << 20))


def _quantized(tune: float = 0.0):
    """A small model quantized by torchao (its linear weights become
    ``Int8Tensor``s, tensor subclasses made of inner tensors), its last
    layer's float weights moved by ``tune`` before quantizing."""
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[2].weight.add_(tune)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    assert type(model[2].weight).__module__.startswith("torchao"), type(model[2].weight)
    return model


def test_a_state_dict_of_a_torchao_quantized_model_updates_the_model(ray_cluster):
    """``update(tuned.state_dict())`` of a torchao-quantized model: its
    values are tensor subclasses, which are not plain tensors, and the dict
    itself became the new version (actors then called a dict). Now it is a
    state dict, applied onto the model: loaded in a task, the new version is
    the model, computes bit for bit as the fine-tuned one, keeps its weights'
    class (as parameters), and its delta holds only the changed layer's
    inner tensors."""
    ray = ray_cluster
    base_model, tuned = _quantized(), _quantized(tune=0.25)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    # On one thread here and in the task: torchao's int8 kernels may sum in
    # another order on several threads (test_models).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected, before = tuned(x), base_model(x)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(expected, before)
    base = ActorWrapper(base_model)
    new = base.update(tuned.state_dict())
    one = base.update({"2.weight": tuned[2].weight})  # a single weight, as a parameter

    @ray.remote
    def run(wrapper, x):
        torch.set_num_threads(1)
        m = wrapper.load()
        if not isinstance(m, torch.nn.Module):
            return type(m).__name__, None, None, None  # what it loads as instead
        with torch.no_grad():
            return type(m).__name__, m(x), type(m[2].weight), isinstance(m[2].weight, torch.nn.Parameter)

    for version in (new, one):
        kind, out, weight_kind, is_param = ray.get(run.remote(version, x))
        assert kind == "Sequential" and weight_kind is type(tuned[2].weight) and is_param
        assert torch.equal(out, expected)
    inner = sum(getattr(tuned[2].weight, a).nbytes for a in tuned[2].weight.__tensor_flatten__()[0])
    assert new.nbytes <= 2 * GUARD_NBYTES + inner + 4096 and one.nbytes == new.nbytes, "only layer 2 is stored"
    with pytest.raises(
        InvalidInputError, match=r"'2.weight' is a torchao\..*Int8Tensor in the base, not a torch\.Tensor"
    ):
        base.update({"2.weight": torch.zeros(4, 32)})


def test_a_dict_mixing_tensor_names_with_other_entries_is_refused(ray_cluster):
    """A dict that names tensors of the base beside entries that are not
    (a note, a value that is no tensor) is neither a state dict nor the
    pipeline: it was taken for a whole new pipeline, silently. Refused,
    naming the entries and saying how to do either."""
    base = ActorWrapper(Encoder().eval())
    w = torch.randn(32, 32)
    with pytest.raises(InvalidInputError, match=r"\('block.0.weight'\) beside 'note' \(a str\)") as e:
        base.update({"block.0.weight": w, "note": "v2"})
    assert "pass only tensors, by the names of the base's state dict" in str(e.value)
    assert "pass the whole new pipeline object" in str(e.value)
    with pytest.raises(InvalidInputError, match="'block.0.weight' names a tensor of the base, but its new value is a"):
        base.update({"block.0.weight": None, "block.0.bias": torch.zeros(32)})
    # Of the quantized model's state dict, a non-tensor entry alike.
    quantized = ActorWrapper(_quantized())
    with pytest.raises(InvalidInputError, match=r"\('2.weight'\) beside 'step' \(a int\)"):
        quantized.update({"2.weight": _quantized(tune=0.25)[2].weight, "step": 3})
    # A dict naming none of a module's tensors is no new version of it: a
    # training checkpoint holding the state dict became the version itself.
    checkpoint = {"state_dict": copy.deepcopy(Encoder().eval()).state_dict(), "epoch": 3}
    with pytest.raises(InvalidInputError, match=r"the base pipeline is a Encoder, and this dict names none") as e:
        base.update(checkpoint)
    assert "update(ckpt['state_dict'])" in str(e.value)
    with pytest.raises(InvalidInputError, match="names none of its tensors"):
        base.update({0: w})
    # What is neither still works as before: a state dict, a whole pipeline.
    assert torch.equal(base.update({"block.0.weight": w}).load().block[0].weight, w)
    assert isinstance(base.update(copy.deepcopy(Encoder().eval())).load(), Encoder)


def test_a_dict_pipeline_is_updated_by_a_state_dict_or_replaced_by_a_whole_dict(ray_cluster):
    """A base that is itself a dict: a dict of its tensors' names is a state
    dict, and a dict with every key of the base (or none of its keys) is the
    whole new pipeline; one with some of its keys but not all, beside other
    entries, could mean either a new pipeline without the missing ones or
    the base's entries changed one by one (dict.update): refused (it became
    a pipeline without ``b``), naming the keys, with the way to do each;
    ``{**version.load(), ...}`` then keeps the other entries at no copy."""
    a, b = torch.zeros(1 << 16), torch.ones(1 << 16)
    v1 = ActorWrapper({"a": a, "b": b})
    a2 = torch.full((1 << 16,), 7.0)
    with pytest.raises(
        InvalidInputError, match=r"gives 'a' of the base pipeline \(a dict\) but not 'b', beside 'note'"
    ) as e:
        v1.update({"a": a2, "note": "v2"})
    assert "{**version.load(), ...}" in str(e.value) and "pass only tensors" in str(e.value)
    got = v1.update({"a": a2}).load()  # a state dict
    assert torch.equal(got["a"], a2) and torch.equal(got["b"], b)
    v2 = v1.update({**v1.load(), "a": a2, "note": "v2"})  # the whole new dict: b is the base's, unread
    got = v2.load()
    assert set(got) == {"a", "b", "note"} and got["note"] == "v2"
    assert torch.equal(got["a"], a2) and torch.equal(got["b"], b)
    assert v2.nbytes <= 2 * GUARD_NBYTES + a2.nbytes + 4096, "only a is stored"
    # A dict that shares no key with the base is a new pipeline, as before.
    assert v1.update({"c": a2, "note": "v3"}).load()["note"] == "v3"
    # Nested: some of the base's keys, none of its tensors' names.
    nested = ActorWrapper({"model": Encoder().eval(), "config": {"top_k": 3}})
    with pytest.raises(InvalidInputError, match=r"gives 'model' of the base pipeline \(a dict\) but not 'config'"):
        nested.update({"model": Encoder().eval()})
    assert nested.update({"model": Encoder().eval(), "config": {"top_k": 5}}).load()["config"] == {"top_k": 5}
