"""What a tensor is beyond its bytes, kept through a seal and a load: the
values a lazy view shows, and the modules whose inference writes their own
weights. Sealed and assembled in this process (no Ray) where the point is
the buffer; in real actors where it is what an actor does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ray_zerocopy as rzc  # noqa: E402
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


class Lookup(torch.nn.Module):
    """An embedding bounded by ``max_norm`` (torch renormalizes, in place,
    every row it looks up that is longer), its output layer tied to it, and
    a layer that is only read."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 8, max_norm=1.0)
        self.bag = torch.nn.EmbeddingBag(16, 8, max_norm=0.5, mode="sum")
        self.out = torch.nn.Linear(8, 16, bias=False)
        self.out.weight = self.emb.weight
        self.read = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.emb.weight.mul_(10.0)
            self.bag.weight.mul_(10.0)

    def forward(self, ids):
        return self.out(self.read(self.emb(ids) + self.bag(ids[:, :2])))


def _lookups(m):
    with torch.no_grad():
        return [m(torch.tensor(ids)) for ids in ([[1, 2, 3]], [[3, 4, 5]], [[1, 5, 9]])]


def test_a_module_that_writes_its_weight_in_inference_gets_its_own_copy(caplog):
    """nn.Embedding(max_norm=...) renormalizes the rows it looks up in place,
    in eval mode and under no_grad too: against the shared read-only copy
    that write killed the actor. Each load now copies that weight (tied uses
    included, so the tie holds) and nothing else, with a warning at wrap
    time; the outputs are those of the model run in plain torch."""
    import copy

    model = Lookup().eval()
    reference = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        sealed, buf = _seal.seal(model)
    assert "'emb' (Embedding with max_norm=1.0 renormalizes" in caplog.text and "'bag' (EmbeddingBag" in caplog.text
    assert len(sealed.own) == 2
    weights = Weights.from_buffer(buf)
    loaded = _load.assemble(weights, sealed)
    assert loaded.out.weight is loaded.emb.weight, "the tie holds"
    assert isinstance(loaded.emb.weight, torch.nn.Parameter) and not loaded.emb.weight.requires_grad
    shared = lambda t: buf.ctypes.data <= t.data_ptr() < buf.ctypes.data + len(buf)  # noqa: E731
    assert shared(loaded.read.weight) and not shared(loaded.emb.weight) and not shared(loaded.bag.weight)
    for got, want in zip(_lookups(loaded), _lookups(reference), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(loaded.emb.weight, reference.emb.weight), "renormalized as in torch"


def test_renormalizing_embeddings_run_in_write_protected_actors(ray_cluster):
    ray = ray_cluster
    import copy

    model = Lookup().eval()
    reference = copy.deepcopy(model)
    wrapper = ActorWrapper(model)

    @ray.remote(num_cpus=0)
    class Server:
        def __init__(self, w):
            self.m = w.load()

        def run(self):
            return _lookups(self.m)

    servers = [Server.remote(wrapper) for _ in range(2)]
    want = _lookups(reference)
    for s in servers:
        got = ray.get(s.run.remote())
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    for s in servers:
        ray.kill(s)


def test_a_memmap_is_shared_not_pickled(tmp_path):
    """What ``np.load(..., mmap_mode="r")`` returns, a common way to hold big
    weights, was pickled by value into the skeleton every process receives
    (16 MiB there for a 16 MiB array); it is sealed as an array and loads
    back as a plain read-only one."""
    path = tmp_path / "w.npy"
    np.save(path, np.arange(1 << 20, dtype=np.float32))
    weights = {"w": np.load(path, mmap_mode="r"), "b": np.ones(3, np.float32)}
    sealed, _ = _seal.seal(weights)
    assert len(sealed.kinds) == 2 and len(sealed.skeleton) < 4096
    loaded = round_trip(weights)
    assert type(loaded["w"]) is np.ndarray and not loaded["w"].flags.writeable
    np.testing.assert_array_equal(loaded["w"], weights["w"])


@pytest.mark.parametrize("dtype", ["complex128", "longdouble", "int4", "float4_e2m1fn"])
def test_a_number_array_safetensors_cannot_hold_is_announced(dtype, caplog):
    """Such an array (an FFT's result kept in a pipeline, ml_dtypes' int4
    weights) travels pickled, a copy in each process, as before, but no
    longer without a word. (A torch tensor of such a dtype is refused, as
    before.)"""
    if dtype in ("int4", "float4_e2m1fn"):
        dtype = np.dtype(getattr(pytest.importorskip("ml_dtypes"), dtype))
    elif np.dtype(dtype).name not in ("complex128", "float128"):
        pytest.skip(f"{dtype} is {np.dtype(dtype).name} here")
    x = (np.arange(4) * 1.5).astype(dtype)
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        loaded = round_trip({"x": x, "y": np.zeros(4, np.float32)})
    assert f"1 numpy array(s) of {np.dtype(dtype)}" in caplog.text and "travel pickled" in caplog.text
    np.testing.assert_array_equal(loaded["x"], x)
    with pytest.raises(rzc.UnshareableTensorError, match="tensor 'x' has dtype torch.complex128"):
        _seal.seal({"x": torch.zeros(4, dtype=torch.complex128)})


def test_a_large_skeleton_is_announced(caplog):
    """Data that is not a tensor travels by value to every process that
    loads: a large one is named in a warning (an np.matrix of 9 MiB here)."""
    pipeline = {"m": np.asmatrix(np.zeros((1536, 768), np.float64)), "w": np.ones(4, np.float32)}
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        _seal.seal(pipeline)
    assert "besides its 1 shared tensors, the pipeline pickles to 9.0 MiB" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        _seal.seal({"w": np.ones((1536, 768), np.float64)})
    assert "pickles to" not in caplog.text


def test_a_strided_nested_tensor_is_named_as_such():
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(rzc.InvalidInputError, match="tensor 'nt' is a nested tensor of the strided layout"):
        _seal.seal({"nt": nested, "w": torch.ones(2)})


def test_a_jax_typed_key_is_pickled_not_taken_for_an_array():
    jax = pytest.importorskip("jax")
    pipeline = {"rng": jax.random.key(7), "w": jax.numpy.arange(4.0)}
    loaded = round_trip(pipeline)
    assert jax.numpy.array_equal(jax.random.key_data(loaded["rng"]), jax.random.key_data(pipeline["rng"]))
    assert jax.numpy.array_equal(loaded["w"], pipeline["w"])


class ShardedParam(torch.nn.Parameter):
    """A parameter class of the user's own (tensor-parallel code has them)."""


class Tagged(torch.Tensor):
    """A plain tensor subclass (torchvision's tv_tensors are such)."""


def test_a_tensor_keeps_its_class_and_attributes_as_torch_pickling_does():
    """Tensor-parallel code tags parameters (``weight.partition_dim = 0``)
    and has parameter classes of its own; a plain tensor subclass carries
    meaning in its class. Sealing dropped both (the data went into the
    buffer, the rest was lost); each now comes back, on the same shared
    data, and a tensor used twice is still one object."""
    m = torch.nn.Linear(4, 4)
    m.weight.partition_dim = 1
    m.extra = ShardedParam(torch.arange(4.0))
    m.extra.axis = "tp"
    pipeline = {"m": m, "t": torch.arange(3.0).as_subclass(Tagged), "again": m.weight}
    pipeline["t"].note = {"unit": "m"}
    sealed, buf = _seal.seal(pipeline)
    assert len(sealed.kinds) == 4
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    lm = loaded["m"]
    assert type(lm.weight) is torch.nn.Parameter and lm.weight.partition_dim == 1
    assert loaded["again"] is lm.weight
    assert type(lm.extra) is ShardedParam and lm.extra.axis == "tp" and not lm.extra.requires_grad
    assert dict(lm.named_parameters()).keys() == {"weight", "bias", "extra"}
    assert type(loaded["t"]) is Tagged and loaded["t"].note == {"unit": "m"}
    for got, want in ((lm.weight, m.weight), (lm.extra, m.extra), (loaded["t"], pipeline["t"])):
        assert torch.equal(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))
        assert buf.ctypes.data <= got.data_ptr() < buf.ctypes.data + len(buf), "the shared data"
    assert not hasattr(lm.bias, "partition_dim")


def test_a_lazy_module_not_yet_run_is_named():
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.ReLU())
    with pytest.raises(rzc.InvalidInputError, match=r"'0.weight' is an uninitialized parameter of a lazy module"):
        _seal.seal(lazy)
    lazy(torch.ones(2, 3))
    loaded = round_trip(lazy)
    assert torch.equal(loaded(torch.ones(2, 3)), lazy(torch.ones(2, 3)))


class Noisy(torch.nn.Module):
    """A module whose own train() does more than set the flag."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.stochastic = True

    def train(self, mode=True):
        super().train(mode)
        self.stochastic = mode
        return self

    def forward(self, x):
        return self.lin(x) + (torch.randn_like(x) if self.stochastic else 0)


def test_a_module_wrapped_in_training_mode_is_switched_by_its_own_train():
    """Loaded modules are in eval mode; one with a train() of its own must
    have gone through it (the flag alone left its sampling noise on)."""
    model = torch.nn.Sequential(Noisy(), torch.nn.Dropout(0.5)).train()
    sealed, buf = _seal.seal(model)
    assert sealed.needs_eval
    assert model.training and model[0].stochastic, "the caller's model is left as it was"
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    assert not loaded.training and not loaded[0].training and not loaded[0].stochastic
    x = torch.ones(1, 4)
    assert torch.equal(loaded(x), loaded(x)) and torch.equal(loaded(x), model.eval()(x))


class _Slotted:
    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model


def _run(model, x):
    return model(x)


@pytest.mark.parametrize("holder", ["partial", "deque", "slots", "nested_partial"])
def test_a_module_in_training_mode_is_switched_wherever_the_pipeline_holds_it(holder):
    """A module with a train() of its own is pickled in training mode and
    switched by eval() after loading. That switch walked the loaded pipeline,
    which reaches no module held by a functools.partial, a deque or an
    object with __slots__: such a module came back in training mode, its
    noise (a transformers model's dropout) on, two calls differing, without
    a word. The skeleton now lists the modules to switch, wherever they lie."""
    import collections
    import functools

    def wrap(model):
        return {
            "partial": lambda: {"fn": functools.partial(_run, model)},
            "deque": lambda: {"q": collections.deque([model])},
            "slots": lambda: {"s": _Slotted(model)},
            "nested_partial": lambda: [functools.partial(_run, functools.partial(_run, model).args[0])],
        }[holder]()

    def find(p):
        return {
            "partial": lambda: p["fn"].args[0],
            "deque": lambda: p["q"][0],
            "slots": lambda: p["s"].model,
            "nested_partial": lambda: p[0].args[0],
        }[holder]()

    model = torch.nn.Sequential(Noisy(), torch.nn.Dropout(0.5)).train()
    sealed, buf = _seal.seal(wrap(model))
    assert sealed.needs_eval and model.training and model[0].stochastic, "the caller's model is left as it was"
    loaded = find(_load.assemble(Weights.from_buffer(buf), sealed))
    assert not loaded.training and not loaded[0].training and not loaded[0].stochastic
    x = torch.ones(1, 4)
    assert torch.equal(loaded(x), loaded(x)) and torch.equal(loaded(x), model.eval()(x))


class _Counted(torch.nn.Module):
    """A module whose own train() counts its calls; ``recurse=False``: one
    that switches itself only, not its submodules."""

    def __init__(self, inner=None, recurse=True):
        super().__init__()
        self.inner, self.recurse, self.calls = inner, recurse, 0
        self.lin = torch.nn.Linear(2, 2)

    def train(self, mode=True):
        self.calls += 1
        if self.recurse:
            return super().train(mode)
        self.training = mode
        return self

    def forward(self, x):
        return x if self.inner is None else self.inner(x)


def test_nested_modules_with_a_train_of_their_own_are_switched_once_each():
    """A module with its own train() inside another one was switched twice
    at load (once by its parent's eval(), once from the list): one inside a
    parent whose train() switches it is switched once, by the parent; one
    inside a parent whose train() does not reach it is still switched."""
    model = torch.nn.Sequential(_Counted(_Counted()), _Counted(_Counted(), recurse=False)).train()
    for m in model.modules():
        if isinstance(m, _Counted):
            m.calls = 0
    sealed, buf = _seal.seal(model)
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    assert not any(m.training for m in loaded.modules())
    assert [m.calls for m in loaded.modules() if isinstance(m, _Counted)] == [1, 1, 1, 1]


def test_tensors_inside_another_s_memory_are_sealed_once_as_views():
    """Tied weights that are two objects (every state dict's: GPT-2's
    ``wte`` and ``lm_head``), a weight tied through ``.data``, a transposed
    view kept as a buffer, slices of one tensor in a pytree: each was sealed
    again, its bytes copied once more into every node's object store and
    loaded apart from its base. Each is now a view of its base's shared
    memory, equal to the original."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(64, 16)
    out = torch.nn.Linear(16, 64, bias=False)
    out.weight.data = emb.weight.data
    holder = torch.nn.Module()
    holder.emb, holder.out = emb, out
    holder.register_buffer("emb_t", emb.weight.data.T, persistent=False)
    base = torch.arange(4096.0).reshape(64, 64)
    pipeline = {
        "model": holder,
        "state": holder.state_dict(),
        "base": base,
        "flat": base.view(-1),
        "half": base[:32],
        "column": base[:, 3],
        "flipped": base.flip(0),  # runs backwards: its own bytes
        "cast": base.view(torch.int32),  # another dtype: its own bytes
    }
    sealed, buf = _seal.seal(pipeline)
    own_bytes = emb.weight.nbytes + base.nbytes * 3  # emb, base, flipped, cast
    assert len(sealed.kinds) == 4 and len(buf) < own_bytes + 64 * 1024
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    m = loaded["model"]
    assert isinstance(m.out.weight, torch.nn.Parameter) and m.out.weight is not m.emb.weight
    assert m.out.weight.data_ptr() == m.emb.weight.data_ptr() == loaded["state"]["out.weight"].data_ptr()
    assert m.emb_t.data_ptr() == m.emb.weight.data_ptr() and m.emb_t.stride() == (1, 16)
    assert loaded["flat"].data_ptr() == loaded["half"].data_ptr() == loaded["base"].data_ptr()
    assert loaded["column"].data_ptr() == loaded["base"].data_ptr() + 3 * 4
    for k in ("base", "flat", "half", "column", "flipped", "cast"):
        assert torch.equal(loaded[k], pipeline[k]), k
    for k, t in holder.state_dict().items():
        assert torch.equal(loaded["state"][k], t) and torch.equal(m.get_parameter(k), t), k
    assert torch.equal(m.emb_t, holder.emb_t)
    assert not m.out.weight.requires_grad


class _LooseAliases(torch.nn.Module):
    """Plain tensor attributes (no parameter, no buffer) on a weight's memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 64)
        self.w_data = self.lin.weight.data
        self.w_t = self.lin.weight.data.t()
        self.row = self.lin.weight.data[3]
        self.own = torch.arange(4.0)


def test_a_module_s_plain_tensor_attributes_on_a_weight_are_sealed_as_views(ray_cluster):
    """A tensor a module keeps as a plain attribute on a parameter's memory
    (``self.w = lin.weight.data``, a transpose of it) was sealed as a copy of
    its own: the weight's bytes again in every node's store, and loaded apart
    from the weight. It is now a view of the weight's shared memory; and an
    update giving the weight a new value shows in it, as ``load_state_dict``
    (a copy into that memory) shows it; an attribute of its own keeps its
    values."""
    model = _LooseAliases()
    sealed, buf = _seal.seal(model)
    weight = model.lin.weight
    assert len(sealed.kinds) == 3 and len(buf) < weight.nbytes + 64 * 1024, "the weight sealed once"
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    at = loaded.lin.weight.data_ptr()
    assert loaded.w_data.data_ptr() == at and loaded.w_t.data_ptr() == at and loaded.row.data_ptr() == at + 3 * 64 * 4
    for k in ("w_data", "w_t", "row", "own"):
        assert torch.equal(getattr(loaded, k), getattr(model, k)), k
    assert loaded.w_t.stride() == (1, 64)
    v1 = ActorWrapper(model)
    new = torch.randn(64, 64)
    updated = v1.update({"lin.weight": new}).load()
    with torch.no_grad():
        model.load_state_dict({**model.state_dict(), "lin.weight": new})  # torch's way: a copy into the memory
    for k in ("w_data", "w_t", "row", "own"):
        assert torch.equal(getattr(updated, k), getattr(model, k)), k
    assert torch.equal(updated.w_data, new) and torch.equal(updated.own, torch.arange(4.0))


def test_views_in_a_pytree_load_as_numpy_views_too():
    base = torch.arange(24.0).reshape(4, 6)
    tree = {"base": base, "t": base.T, "row": base[1]}
    sealed, buf = _seal.seal(tree)
    assert len(sealed.kinds) == 1
    loaded = _load.assemble(Weights.from_buffer(buf), sealed, framework="numpy")
    for k, t in tree.items():
        np.testing.assert_array_equal(loaded[k], t.numpy())
    assert np.shares_memory(loaded["t"], loaded["base"]) and not loaded["t"].flags.writeable


class TiedEmbedding(torch.nn.Module):
    """An output layer tied to the embedding: one parameter, two names."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight


def test_an_update_writes_a_new_value_through_to_the_memory_it_shares(ray_cluster):
    """A state dict applied by update() writes as ``load_state_dict`` does
    (``copy_``): a tensor that shares memory with others in the base (a
    tied model's state dict, two objects on one memory; a view kept as a
    buffer) shows the new values in all of them. The update changed the
    one named only, and its partners kept the old values without a word:
    a tied model came back untied. Values for one memory that disagree are
    refused."""
    torch.manual_seed(0)
    weight = torch.nn.Embedding(8, 4).weight.detach()
    state = {"a": weight, "b": weight.detach(), "c": torch.ones(3)}
    w = ActorWrapper(state)
    assert len(w._sealed.kinds) == 2
    for name in ("a", "b"):
        loaded = w.update({name: weight + 1.0}).load()
        assert torch.equal(loaded["a"], weight + 1.0) and torch.equal(loaded["b"], weight + 1.0), name
        assert loaded["a"].data_ptr() == loaded["b"].data_ptr(), f"{name}: the pair stays one memory"
        assert torch.equal(loaded["c"], state["c"])
    with pytest.raises(rzc.InvalidInputError, match="'a', 'b' share memory in the base"):
        w.update({"a": weight + 1.0, "b": weight + 2.0})

    # A tied model's own state dict, and a module whose buffer is a
    # transposed view of its weight (torch's load_state_dict changes both).
    class Viewed(TiedEmbedding):
        def __init__(self):
            super().__init__()
            self.register_buffer("emb_t", self.emb.weight.data.t())
            self.register_buffer("row", self.emb.weight.data[2])

    model = Viewed()
    new = torch.arange(32.0).reshape(8, 4)
    for base in (model.state_dict(), model):
        loaded = ActorWrapper(base).update({"emb.weight": new}).load()
        got = loaded if isinstance(base, dict) else dict(loaded.state_dict(keep_vars=True))
        assert torch.equal(got["emb.weight"], new) and torch.equal(got["head.weight"], new)
        assert torch.equal(got["emb_t"], new.t()) and torch.equal(got["row"], new[2])
        assert got["emb_t"].data_ptr() == got["emb.weight"].data_ptr(), "still a view of the shared memory"
    # A part of the memory given a new value: written where it lies.
    loaded = ActorWrapper(model).update({"row": torch.full((4,), -1.0)}).load()
    expected = model.emb.weight.detach().clone()
    expected[2] = -1.0
    assert torch.equal(loaded.emb.weight, expected) and torch.equal(loaded.emb_t, expected.t())
    reference = Viewed()
    reference.load_state_dict(model.state_dict())
    reference.load_state_dict({"row": torch.full((4,), -1.0)}, strict=False)
    assert torch.equal(reference.emb.weight, loaded.emb.weight), "as torch's load_state_dict"

    # Both given one new tensor's memory (a tied model's next state dict):
    # sealed once, loaded as one memory (it was sealed once per name).
    big = torch.randn(256, 256)
    tied = ActorWrapper({"a": big, "b": big.detach()})
    new = big * 3.0
    v4 = tied.update({"a": new, "b": new.detach()})
    assert v4.nbytes < 1.5 * big.nbytes, f"{v4.nbytes} bytes for one changed tensor of {big.nbytes}"
    loaded = v4.load()
    assert torch.equal(loaded["a"], new) and loaded["a"].data_ptr() == loaded["b"].data_ptr()


def test_one_new_value_in_another_layout_given_to_two_tensors(ray_cluster):
    """One transposed (or channels_last) value given to two untied weights:
    the second was sealed as a view of the first, whose bytes lie in memory
    order, with the value's own strides: it loaded transposed, without a
    word."""
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    v = torch.arange(16.0).reshape(4, 4).t()
    loaded = ActorWrapper(seq).update({"0.weight": v, "1.weight": v}).load()
    assert torch.equal(loaded[0].weight, v) and torch.equal(loaded[1].weight, v)
    convs = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 2, bias=False), torch.nn.Conv2d(2, 3, 2, bias=False))
    cl = torch.randn(3, 2, 2, 2).contiguous(memory_format=torch.channels_last)
    loaded = ActorWrapper(convs).update({"0.weight": cl, "1.weight": cl}).load()
    assert torch.equal(loaded[0].weight, cl) and torch.equal(loaded[1].weight, cl)


def test_what_a_review_of_the_write_through_found(ray_cluster):
    """Five things the first write-through got wrong (the last four new
    with it), each with its fix."""
    ray = ray_cluster

    # 1. A renormalizing embedding's weight given a value in another layout
    # (transposed, broadcast) lost the copy each process makes of it: its
    # first lookup wrote into the shared read-only memory (SIGSEGV).
    @ray.remote
    def look_up(wrapper):
        loaded = wrapper.load()
        return loaded(torch.tensor([1])).norm().item()

    emb = torch.nn.Sequential(torch.nn.Embedding(4, 4, max_norm=0.5))
    for value in (torch.arange(16.0).reshape(4, 4).t(), (torch.arange(4.0) + 1).expand(4, 4)):
        assert ray.get(look_up.remote(ActorWrapper(emb).update({"0.weight": value}))) == pytest.approx(0.5)

    # 2. A buffer that is an expand of another tensor, given a value: a raw
    # RuntimeError (a write into memory it repeats). A value that repeats
    # as it does is taken; one that does not is refused, by name.
    m = torch.nn.Module()
    m.scale = torch.nn.Parameter(torch.randn(4, 1))
    m.register_buffer("scale_b", m.scale.data.expand(4, 8))
    v2 = ActorWrapper(m).update({k: v.clone() for k, v in m.state_dict().items()})
    assert torch.equal(v2.load().scale_b, m.scale_b)
    loaded = ActorWrapper(m).update({"scale_b": torch.full((4, 1), 2.0).expand(4, 8).clone()}).load()
    assert torch.equal(loaded.scale, torch.full((4, 1), 2.0)) and loaded.scale_b.stride() == (1, 0)
    with pytest.raises(rzc.InvalidInputError, match="'scale_b' repeats its values along a dimension"):
        ActorWrapper(m).update({"scale_b": torch.randn(4, 8)})

    # 3. A value holding NaN, for a tensor that shares memory: refused as
    # disagreeing with itself (NaN != NaN); compared by bytes now.
    tied = {"a": torch.randn(4, 4)}
    tied["b"] = tied["a"].t()
    nan = torch.full((4, 4), float("nan"))
    loaded = ActorWrapper(tied).update({"b": nan}).load()
    assert loaded["a"].isnan().all() and loaded["b"].isnan().all()

    # 4. One value given to two weights with a view buffer each: the second
    # weight was sealed twice, and its view no longer shared its memory.
    two = torch.nn.Module()
    for n in ("p", "q"):
        two.register_parameter(n, torch.nn.Parameter(torch.randn(256, 256)))
        two.register_buffer(f"{n}_t", getattr(two, n).data.t())
    same = torch.randn(256, 256)
    v2 = ActorWrapper(two).update({"p": same, "q": same})
    assert v2.nbytes < 1.5 * same.nbytes, f"{v2.nbytes} bytes for one new value of {same.nbytes}"
    loaded = v2.load()
    assert torch.equal(loaded.q_t, same.t()) and loaded.q_t.data_ptr() == loaded.q.data_ptr()

    # 5. A tied pair given a tensor and its lazy conjugate (one memory, two
    # values): the conjugate was taken for the plain values.
    c = torch.randn(3, dtype=torch.complex64)
    pair = {"a": c, "b": c.detach()}
    with pytest.raises(rzc.InvalidInputError, match="values that disagree"):
        ActorWrapper(pair).update({"a": c, "b": c.conj()})


def test_a_tensor_s_memory_layout_is_kept():
    """A model converted to ``channels_last`` (for faster convolutions)
    loaded back in the default layout, without a word. A dense tensor whose
    dimensions lie in another order is now sealed in the order its bytes lie
    in and loads with the original's strides, zero-copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    model = model.to(memory_format=torch.channels_last)
    transposed = torch.arange(12.0).reshape(3, 4).T.contiguous().T  # a transposed copy, on its own
    pipeline = {"model": model, "t": transposed}
    sealed, buf = _seal.seal(pipeline)
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    w = loaded["model"][0].weight
    assert w.stride() == model[0].weight.stride() and w.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert buf.ctypes.data <= w.data_ptr() < buf.ctypes.data + len(buf), "the shared data"
    assert loaded["t"].stride() == transposed.stride() and torch.equal(loaded["t"], transposed)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded["model"](x), model(x))
    as_numpy = round_trip({"t": transposed}, framework="numpy")["t"]
    np.testing.assert_array_equal(as_numpy, transposed.numpy())
    assert as_numpy.strides == transposed.numpy().strides


def test_a_broadcast_tensor_is_sealed_once_not_once_per_repeat(ray_cluster):
    """An ``expand``ed tensor (stride 0: a mask or a bias broadcast over a
    dimension) was sealed as a full copy of its values, in every node's
    store and in every actor that loaded it as many bytes as it shows. It is
    now sealed as the values it repeats, each once, and loads with the
    original's strides, as torch's own pickling keeps it; a numpy load gets
    the same read-only view, a JAX load a copy."""
    ray = ray_cluster
    m = torch.nn.Module()
    m.register_buffer("mask", torch.tril(torch.ones(1, 1024)).expand(1024, 1024))  # 4 MiB shown, 4 KiB held
    m.scale = torch.nn.Parameter(torch.randn(8, 1).expand(8, 4096))
    m.register_buffer("both", torch.randn(4, 1, 5).expand(4, 300, 5).transpose(0, 2))  # broadcast and permuted
    m.register_buffer("plain", torch.arange(64).expand(1, -1))  # a dimension of one: nothing repeated
    sealed, buf = _seal.seal(m)
    assert len(buf) < 128 * 1024, f"{len(buf)} bytes sealed: the repeated values once"
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    for name in ("mask", "scale", "both", "plain"):
        got, want = getattr(loaded, name), getattr(m, name)
        assert torch.equal(got, want) and got.stride() == want.stride(), name
        assert buf.ctypes.data <= got.data_ptr() < buf.ctypes.data + len(buf), f"{name}: the shared data"
    assert isinstance(loaded.scale, torch.nn.Parameter) and not loaded.scale.requires_grad

    pytree = {"mask": m.mask, "both": m.both}
    as_numpy = round_trip(pytree, framework="numpy")
    for name, t in pytree.items():
        np.testing.assert_array_equal(as_numpy[name], t.numpy())
        assert as_numpy[name].strides == t.numpy().strides and not as_numpy[name].flags.writeable, name
    # In an actor, and through update(): a new broadcast value replaces the
    # old one, sealed once too.
    new = {"mask": torch.zeros(1, 1024).expand(1024, 1024)}
    v2 = ActorWrapper(m).update(new)
    assert v2.nbytes < 128 * 1024, f"{v2.nbytes} bytes in the update"

    @ray.remote
    def load(wrapper):
        t = wrapper.load()
        return t.mask.stride(), int(t.mask.sum()), t.scale.stride()

    assert ray.get(load.remote(v2)) == ((0, 1), 0, (1, 0))

    pytest.importorskip("jax")
    as_jax = round_trip(pytree, framework="jax")
    for name, t in pytree.items():
        np.testing.assert_array_equal(np.asarray(as_jax[name]), t.numpy())


# -- what a review of the above found -----------------------------------------


def test_an_update_gives_a_permuted_or_tied_tensor_its_new_value(ray_cluster):
    """A channels_last weight (sealed in its memory order) and a transposed
    tied weight given a new value by update(): the value was dropped (the
    tensor reached the update's sealer as another object) and the old one
    loaded."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).eval()
    new = {"weight": torch.full_like(conv.weight, 7.0, memory_format=torch.contiguous_format)}
    loaded = ActorWrapper(conv).update(new).load()
    assert torch.equal(loaded.weight, new["weight"]) and torch.equal(loaded.bias, conv.bias)

    # A whole state dict of a channels_last model, one weight changed: the
    # unchanged ones are the base's (they were sealed again, in the other
    # order, doubling the delta) and every weight keeps its layout.
    torch.manual_seed(0)
    convs = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.Conv2d(64, 64, 3)).eval()
    convs = convs.to(memory_format=torch.channels_last)
    changed = {k: v.clone(memory_format=torch.preserve_format) for k, v in convs.state_dict().items()}
    changed["0.weight"] += 1.0
    v2 = ActorWrapper(convs).update(changed)
    assert v2.nbytes < 1.5 * convs[0].weight.nbytes, f"{v2.nbytes} bytes: only the changed weight is in the delta"
    loaded = v2.load()
    for k, t in changed.items():
        got = loaded.get_parameter(k)
        assert torch.equal(got, t) and got.stride() == t.stride(), k

    tied = torch.nn.Module()
    tied.emb = torch.nn.Parameter(torch.randn(6, 4))
    tied.head = torch.nn.Parameter(tied.emb.data.t())
    loaded = ActorWrapper(tied).update({"head": torch.ones(4, 6)}).load()
    # written through to the memory head shares with emb, as load_state_dict does
    assert torch.equal(loaded.head, torch.ones(4, 6)) and torch.equal(loaded.emb, torch.ones(6, 4))


@pytest.mark.parametrize("how", ["tied", "transposed"])
def test_a_renormalizing_embedding_weight_that_is_a_view_gets_its_copy_too(how):
    """The max_norm embedding's weight sealed as a view (tied through
    ``.data`` to a layer seen first) or in another memory order: its copy
    was lost (no reference of its own), and the first lookup wrote to the
    read-only shared memory. Where it is a view, its base is copied, so the
    write reaches what shares its memory, as in torch."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.head = torch.nn.Linear(4, 10, bias=False)
    m.emb = torch.nn.Embedding(10, 4, max_norm=1.0)
    if how == "tied":
        m.head.weight.data.mul_(10.0)
        m.emb.weight.data = m.head.weight.data
    else:
        m.emb.weight = torch.nn.Parameter(torch.randn(4, 10).t() * 5)
    sealed, buf = _seal.seal(m)
    assert len(sealed.own) == 1
    loaded = _load.assemble(Weights.from_buffer(buf, write_protect=True), sealed)
    ids = torch.tensor([1, 2, 7])
    with torch.no_grad():  # the original is the reference (deepcopy would untie it); sealing left it as it was
        assert torch.equal(loaded.emb(ids), m.emb(ids))
    assert torch.equal(loaded.emb.weight, m.emb.weight)
    assert torch.equal(loaded.head.weight, m.head.weight), "the write reached what shares its memory"


def test_a_checkpoint_fills_a_model_whose_template_ties_two_tensors(tmp_path):
    """from_safetensors(model=...) takes values from the checkpoint: a tie in
    the template model (tie_weights() run at init) must not make one tensor
    a view of the other when the checkpoint has a value for each."""
    from safetensors.torch import save_file

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            self.b.weight.data = self.a.weight.data

    ckpt = {"a.weight": torch.zeros(4, 4), "b.weight": torch.ones(4, 4)}
    save_file(ckpt, tmp_path / "m.safetensors")
    sealed, buf = _seal.seal_checkpoint(tmp_path / "m.safetensors", "torch", Two)
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    assert torch.equal(loaded.a.weight, ckpt["a.weight"]) and torch.equal(loaded.b.weight, ckpt["b.weight"])


def test_a_checkpoint_giving_one_tied_tensor_two_values_is_refused(tmp_path):
    """A model whose two names are one tensor (``head.weight = emb.weight``)
    filled from a checkpoint that gives the two names different values:
    the first name's was taken without a word. Equal values are one
    tensor, as before; different ones are refused, as update() refuses
    them."""
    from safetensors.torch import save_file

    Tied = TiedEmbedding
    w = torch.randn(8, 4)
    save_file({"emb.weight": w, "head.weight": w.clone()}, tmp_path / "same.safetensors")
    sealed, buf = _seal.seal_checkpoint(tmp_path / "same.safetensors", "torch", Tied)
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    assert torch.equal(loaded.emb.weight, w) and loaded.head.weight is loaded.emb.weight
    save_file({"emb.weight": w, "head.weight": w + 1.0}, tmp_path / "two.safetensors")
    with pytest.raises(rzc.InvalidInputError, match="'emb.weight' and 'head.weight' are one tied tensor"):
        _seal.seal_checkpoint(tmp_path / "two.safetensors", "torch", Tied)


def test_a_parametrized_module_with_its_own_train_seals_in_training_mode():
    from torch.nn.utils.parametrizations import weight_norm

    class Own(torch.nn.Linear):
        def train(self, mode=True):
            self.switched = mode
            return super().train(mode)

    m = weight_norm(Own(4, 4))
    loaded = round_trip(m)
    assert not loaded.training and loaded.switched is False
    with torch.no_grad():
        assert torch.equal(loaded(torch.ones(1, 4)), m.eval()(torch.ones(1, 4)))


def test_a_tensor_with_attributes_loads_as_numpy_and_jax():
    t = torch.arange(4.0)
    t.scale = 2.0
    sealed, buf = _seal.seal({"a": t, "b": torch.ones(3)})
    frameworks = ["numpy"] + (["jax"] if pytest.importorskip("jax") else [])
    for fw in frameworks:
        out = _load.assemble(Weights.from_buffer(buf), sealed, framework=fw)
        np.testing.assert_array_equal(np.asarray(out["a"]), t.numpy())


def test_a_checkpoint_filled_into_a_model_keeps_its_tensors_classes_and_attributes(tmp_path):
    """The model given to from_safetensors(model=...) says what its tensors
    are; the checkpoint, their values. A tag on a parameter
    (``weight.partition_dim``) or a parameter class of its own was dropped."""
    from safetensors.torch import save_file

    class Tagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.lin.weight.partition_dim = 1
            self.extra = ShardedParam(torch.zeros(4))

    ckpt = {"lin.weight": torch.full((4, 4), 2.0), "lin.bias": torch.ones(4), "extra": torch.arange(4.0)}
    save_file(ckpt, tmp_path / "m.safetensors")
    sealed, buf = _seal.seal_checkpoint(tmp_path / "m.safetensors", "torch", Tagged)
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    assert loaded.lin.weight.partition_dim == 1 and type(loaded.extra) is ShardedParam
    assert torch.equal(loaded.lin.weight, ckpt["lin.weight"]) and torch.equal(loaded.extra, ckpt["extra"])
    assert buf.ctypes.data <= loaded.extra.data_ptr() < buf.ctypes.data + len(buf)


def test_a_module_s_dicts_come_back_as_they_were_and_sealing_changes_none():
    """A module's state is set by nn.Module's own ``__dict__`` setter and its
    empty hook dicts are unpickled without their constructor (the load's
    quick ways): each loaded module has every attribute the original has,
    hooks registered on it (``prepend`` included) run in order on it alone,
    and an ``OrderedDict`` with entries or attributes of its own keeps them.
    Sealing reads the caller's dicts without adding to them: none of the
    model's dicts gains an instance dict (64 bytes each, 14 MB for a model
    of 13,335 modules, where sealing asked for one to see it was empty)."""
    import collections
    import gc

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.ReLU()).eval()
    model[1].notes = collections.OrderedDict(a=1)
    model[1].notes.tag = "kept"
    model[1].empty_with_attr = collections.OrderedDict()
    model[1].empty_with_attr.tag = "also kept"
    dicts = [v for m in model.modules() for v in vars(m).values() if type(v) is collections.OrderedDict]
    had = [gc.get_referents(d) for d in dicts]
    loaded = round_trip(model)
    assert [gc.get_referents(d) for d in dicts] == had, "sealing gave the caller's dicts instance dicts"
    for original, got in zip(model.modules(), loaded.modules(), strict=True):
        assert type(got) is type(original) and vars(got).keys() == vars(original).keys()
        for k, v in vars(original).items():
            if type(v) is collections.OrderedDict and k not in ("_parameters", "_buffers", "_modules"):
                assert type(vars(got)[k]) is collections.OrderedDict and vars(got)[k] == v, k
                assert vars(got)[k] is not v
    assert loaded[1].notes == {"a": 1} and loaded[1].notes.tag == "kept"
    assert loaded[1].empty_with_attr.tag == "also kept"
    hooks = [m._forward_hooks for m in loaded.modules()]
    assert len({id(h) for h in hooks}) == len(hooks), "two modules share a hook dict"
    calls = []
    loaded[0].register_forward_hook(lambda m, i, o: calls.append("after"))
    loaded[0].register_forward_hook(lambda m, i, o: calls.append("first"), prepend=True)
    loaded[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
    assert calls == ["pre", "first", "after"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not loaded[1]._forward_hooks and not loaded[2]._forward_pre_hooks


def _longrope_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    )
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval()


def _qat_model():
    from torch.ao import quantization as q

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).train()
    model.qconfig = q.get_default_qat_qconfig("fbgemm")
    model = q.prepare_qat(model)
    with torch.no_grad():
        model(torch.randn(16, 8))  # observe once, as after training
    return model.eval()


# Inputs each run in turn: for the longrope model a short prompt, one past
# the pretraining length (its long frequencies) and a short one again.
_WRITER_INPUTS = {
    "longrope": lambda: [torch.arange(3, 11)[None], torch.arange(3, 23)[None], torch.arange(5, 9)[None]],
    "qat": lambda: [torch.randn(4, 8, generator=torch.Generator().manual_seed(k)) * (k + 1) for k in range(3)],
}


def _writer_outputs(model, kind):
    with torch.no_grad():
        outs = [model(x) for x in _WRITER_INPUTS[kind]()]
    return [o.logits if hasattr(o, "logits") else o for o in outs]


@pytest.mark.parametrize("kind", ["longrope", "qat"])
def test_modules_that_write_their_buffers_as_they_run_get_their_own_copy(ray_cluster, kind, caplog):
    """transformers' longrope rotary embedding (Phi-3, Phi-3.5, Phi-4-mini)
    copies its frequencies into its ``inv_freq`` buffer on every call, and
    quantization-aware training's observers and fake quantizers update their
    statistics, scale and zero point in eval mode too: against the shared
    read-only copy, the first forward killed the actor (and, unguarded, one
    actor's long prompt changed every actor's frequencies). Each process now
    copies those tensors, the wrap says which, and two actors give the
    outputs of the model run in plain torch, in turn, on their own."""
    import copy

    ray = ray_cluster
    model = _longrope_model() if kind == "longrope" else _qat_model()
    reference = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        wrapper = ActorWrapper(model)
    assert "write tensors of their own in place as they run" in caplog.text
    assert ("longrope" in caplog.text) if kind == "longrope" else ("quantization-aware training" in caplog.text)

    @ray.remote(num_cpus=0)
    class Server:
        def __init__(self, w):
            self.m = w.load()

        def run(self):
            return _writer_outputs(self.m, kind)

    servers = [Server.remote(wrapper) for _ in range(2)]
    want = _writer_outputs(reference, kind)
    for s in servers:
        got = ray.get(s.run.remote())
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    for s in servers:
        ray.kill(s)


def test_a_pytree_key_named_like_the_header_s_metadata_is_a_key_like_any_other():
    """safetensors reserves the name ``__metadata__`` in its header; a
    pytree holding a tensor at that key (a model's dict of extras) could
    not be wrapped: its tensor is now given another name in the buffer and
    comes back at its key."""
    tree = {"__metadata__": torch.arange(3.0), "cfg": {"__metadata__": torch.ones(2)}, "__metadata___": torch.zeros(1)}
    loaded = round_trip(tree)
    assert loaded.keys() == tree.keys() and loaded["cfg"].keys() == {"__metadata__"}
    assert torch.equal(loaded["__metadata__"], tree["__metadata__"])
    assert torch.equal(loaded["cfg"]["__metadata__"], tree["cfg"]["__metadata__"])
    assert torch.equal(loaded["__metadata___"], tree["__metadata___"])


def test_a_pipeline_loads_in_another_framework_unless_it_holds_modules():
    """Tensors load as numpy or JAX arrays where asked, modules only as
    torch. The check looked at parameters instead: a pytree holding an
    ``nn.Parameter`` (no module) was refused as holding modules, and a
    module with buffers but no parameters loaded as a module of numpy
    arrays, which failed only when run."""
    tree = {"t": torch.arange(3.0), "p": torch.nn.Parameter(torch.arange(2.0))}
    loaded = round_trip(tree, framework="numpy")
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
    np.testing.assert_array_equal(loaded["p"], [0.0, 1.0])
    norm = torch.nn.BatchNorm1d(4, affine=False).eval()
    with torch.no_grad():
        norm.running_mean.add_(1.0)
    for framework in ("numpy", "jax"):
        with pytest.raises(rzc.InvalidInputError, match="holds torch modules"):
            round_trip({"norm": norm}, framework=framework)
    assert torch.equal(round_trip(norm, framework="torch").running_mean, norm.running_mean)


def test_a_pipeline_in_a_reference_cycle_loaded_after_the_first_is_freed_by_a_young_collection():
    """Every load moved the process's live objects to the oldest generation
    (to keep a due collection from scanning a fresh actor's first load), so
    a model in a reference cycle (``weight_norm``) loaded and dropped
    waited for a full collection, which such moves make rare: a replica
    that loaded and evicted models kept dozens of them, and their sealed
    objects, alive. Only a process's first load does it now."""
    import gc
    import weakref

    from torch.nn.utils.parametrizations import weight_norm

    model = torch.nn.Sequential(weight_norm(torch.nn.Linear(8, 8)), torch.nn.ReLU()).eval()
    sealed, buf = _seal.seal(model)
    first = _load.assemble(Weights.from_buffer(buf), sealed)  # the first load of this process, or a later one
    x = torch.randn(2, 8)
    # No collection but the test's own: one due could promote the model on
    # its own, and a load keeps collection off where it finds it off.
    gc.disable()
    try:
        for _ in range(3):
            loaded = _load.assemble(Weights.from_buffer(buf), sealed)
            assert torch.equal(loaded(x), model(x))
            cyclic = weakref.ref(loaded[0])  # the parametrized module is in a reference cycle
            del loaded
            assert cyclic() is not None
            gc.collect(1)  # the young generations only
            assert cyclic() is None, "a dropped pipeline waited for a full collection"
    finally:
        gc.enable()
    assert first is not None
