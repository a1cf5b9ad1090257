"""The models and checkpoints users have, through ActorWrapper on a real
local Ray: transformers models built from small configs (no downloads),
sharded save_pretrained directories filled into their model class, and
checkpoint layouts that must fail with a clear error."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ray_zerocopy import ActorWrapper  # noqa: E402


def llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg), cfg


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg), cfg


def bert_bf16():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).to(torch.bfloat16), cfg


def t5():
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg), cfg


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    return transformers.ViTModel(cfg), cfg


def inputs(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": ids}


def first_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def actor(ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0.25)
    class Runner:
        def run(self, wrapper, kwargs):
            model = wrapper.load()
            with torch.no_grad():
                return first_output(model(**kwargs))

    return Runner


@pytest.mark.parametrize("make", [llama, gpt2, bert_bf16, t5, vit], ids=lambda f: f.__name__)
def test_transformers_models_load_in_an_actor(ray_cluster, actor, make):
    torch.manual_seed(0)
    model, _ = make()
    model.eval()
    kwargs = inputs(make.__name__)
    w = ActorWrapper(model)
    with torch.no_grad():
        expected = first_output(model(**kwargs))
    got = ray_cluster.get(actor.remote().run.remote(w, kwargs))
    assert got.dtype == expected.dtype and torch.equal(got, expected), make.__name__


def wav2vec2_ctc():
    cfg = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2ForCTC(cfg), cfg


class SpectralNormed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv1d(4, 8, 3))
        self.head = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(8, 8))

    def forward(self, input_values):
        return self.head(self.conv(input_values).mean(-1))


@pytest.mark.parametrize(
    "make", [wav2vec2_ctc, lambda: (SpectralNormed(), None)], ids=["wav2vec2_ctc", "spectral_norm"]
)
def test_parametrized_modules_load_zero_copy_in_actors(ray_cluster, actor, make):
    """Modules with parametrizations (weight_norm in wav2vec2's positional
    convolution, spectral_norm, orthogonal), which torch refuses to pickle,
    load in actors with equal outputs; their `original*` tensors are the
    shared ones."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model, _ = make()
    model.eval()
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    x = {"input_values": torch.randn(2, 4, 16) if isinstance(model, SpectralNormed) else torch.randn(2, 400)}
    w = ActorWrapper(model)
    names = [n for n, _ in model.named_parameters()]
    assert any(".parametrizations." in n and ".original" in n for n in names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (Ray gives each one thread): the same reduction order
    try:
        with torch.no_grad():
            expected = first_output(model(**x)) if not isinstance(model, SpectralNormed) else model(**x)
    finally:
        torch.set_num_threads(threads)

    @ray_cluster.remote(num_cpus=0.25)
    class Runner:
        def run(self, wrapper, kwargs):
            m = wrapper.load()
            originals = [p for n, p in m.named_parameters() if ".original" in n]
            from ray_zerocopy import _load

            opened = _load.open_sealed(wrapper.object_ref, True, wrapper.content_digest)
            lo, hi = opened.address, opened.address + opened.nbytes
            shared = all(lo <= p.data_ptr() < hi for p in originals)
            with torch.no_grad():
                out = m(**kwargs)
            return (out if isinstance(out, torch.Tensor) else first_output(out)), shared, type(m).__name__

    for got, shared, name in ray_cluster.get([Runner.remote().run.remote(w, x) for _ in range(2)]):
        assert torch.equal(got, expected) and shared, name


def test_what_still_cannot_be_pickled_is_named(ray_cluster):
    """Anything in a pipeline that cannot be pickled is a TypeError naming
    its path in the pipeline and what to do."""
    import threading

    class Tokenizer:
        def __init__(self):
            self.lock = threading.Lock()

    pipeline = {"model": torch.nn.Linear(4, 4), "pre": [{"tokenizer": Tokenizer()}]}
    with pytest.raises(
        TypeError, match=r"pre\.0\.tokenizer\.lock \(a _thread\.lock\) does not pickle.*build it in the actor"
    ):
        ActorWrapper(pipeline)


@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig", "IntxWeightOnlyConfig"])
def test_a_torchao_quantized_llama_loads_zero_copy_in_two_actors(ray_cluster, config):
    """torchao's quantized weights (tensor subclasses made of inner tensors)
    are sealed as their inner tensors and rebuilt around them zero-copy: two
    actors give the logits of the quantized model, their weights' inner
    tensors point into the sealed buffer, and loading grows neither's
    private memory by a fifth of the model."""
    torchao = pytest.importorskip("torchao.quantization")
    ray = ray_cluster
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()  # 17 M parameters in its linear layers
    torchao.quantize_(model, getattr(torchao, config)())
    kind = type(model.model.layers[0].mlp.up_proj.weight)
    assert kind.__module__.startswith("torchao"), kind
    kwargs = inputs("llama")
    # On one thread here and in the actors: with AVX-512, torchao's int8
    # kernels sum in another order on two threads than on one (measured: a
    # 1e-6 difference), and Ray gives a fractional-CPU actor one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = model(**kwargs).logits
    finally:
        torch.set_num_threads(threads)
    w = ActorWrapper(model)
    nbytes = w.nbytes

    @ray.remote(num_cpus=0.25)
    class Runner:
        def run(self, wrapper, kwargs):
            from ray_zerocopy.diagnostics import pss_breakdown

            before = pss_breakdown()
            m = wrapper.load()
            # What loading costs in private memory (running the model then
            # allocates work memory of its own: dequantized tiles, caches).
            grew = pss_breakdown()["anon"] - before["anon"]
            torch.set_num_threads(1)
            with torch.no_grad():
                out = m(**kwargs).logits
            weight = m.model.layers[0].mlp.up_proj.weight
            from ray_zerocopy import _load

            opened = _load.open_sealed(wrapper.object_ref, True, wrapper.content_digest)
            inner = [getattr(weight, a) for a in weight.__tensor_flatten__()[0]]
            shared = all(opened.address <= t.data_ptr() < opened.address + opened.nbytes for t in inner)
            return out, grew, type(weight), isinstance(weight, torch.nn.Parameter), shared

    for out, grew, got_kind, is_param, shared in ray.get([Runner.remote().run.remote(w, kwargs) for _ in range(2)]):
        assert torch.equal(out, expected) and got_kind is kind and is_param
        assert shared, "the quantized weight's inner tensors point into the sealed buffer"
        assert grew < 0.2 * nbytes, (
            f"loading grew private memory by {grew / 2**20:.1f} MiB for a {nbytes / 2**20:.1f} MiB model"
        )


def test_packed_quantized_modules_are_named_with_advice_that_works(ray_cluster, actor):
    """quantize_dynamic keeps weights in packed parameters that cannot be
    shared: the error names the module and says what to do; what it says
    works (the float model wrapped, quantized in the actor after load)."""
    from ray_zerocopy import UnsupportedDtypeError

    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    import copy

    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(
        UnsupportedDtypeError, match=r"module 'model\.0' .*quantize_dynamic\(model, \{torch.nn.Linear\}"
    ):
        ActorWrapper({"model": quantized})
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = quantized(x)

    @ray_cluster.remote(num_cpus=0.25)
    class Quantizer:
        def run(self, wrapper, x):
            model = wrapper.load()
            torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            with torch.no_grad():
                return model(x)

    assert torch.equal(ray_cluster.get(Quantizer.remote().run.remote(ActorWrapper(float_model), x)), expected)


def save_sharded(model, path):
    model.save_pretrained(path, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "several shards"
    return index


def test_a_sharded_directory_fills_the_users_model(ray_cluster, actor, tmp_path):
    torch.manual_seed(0)
    model, cfg = llama()
    model.eval()
    save_sharded(model, tmp_path)
    torch.manual_seed(1)
    fresh = transformers.LlamaForCausalLM(cfg)  # other random weights: the checkpoint must replace them
    w = ActorWrapper.from_safetensors(tmp_path, model=fresh)
    kwargs = inputs("llama")
    with torch.no_grad():
        expected = model(**kwargs).logits
    assert torch.equal(ray_cluster.get(actor.remote().run.remote(w, kwargs)), expected)
    loaded = w.load()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, "tied stays tied"
    # The same checkpoint through the index file, a list of shards, or a
    # factory; or without a model, as {name: tensor}.
    shards = sorted(tmp_path.glob("*.safetensors"))
    for source in (tmp_path / "model.safetensors.index.json", shards):
        assert (
            ActorWrapper.from_safetensors(source, model=lambda: transformers.LlamaForCausalLM(cfg)).num_tensors
            == w.num_tensors
        )
    tensors = ActorWrapper.from_safetensors(tmp_path).load()
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_checkpoint_errors_name_the_problem(ray_cluster, tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ActorWrapper.from_safetensors(empty)
    torch.manual_seed(0)
    model, cfg = gpt2()
    ckpt = tmp_path / "ckpt"
    index = save_sharded(model, ckpt)
    missing = sorted(set(index["weight_map"].values()))[1]
    (ckpt / missing).rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=f"shard {missing}.*is missing"):
        ActorWrapper.from_safetensors(ckpt)
    twice = tmp_path / "twice"
    twice.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(twice / "one.safetensors"))
    save_file({"b": torch.zeros(3)}, str(twice / "two.safetensors"))
    with pytest.raises(ValueError, match="tensor 'b' is in two shards"):
        ActorWrapper.from_safetensors(twice)
    # The model needs what the checkpoint lacks, or has it in another shape or dtype.
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if "h.1." not in k}, str(partial))
    with pytest.raises(ValueError, match=r"lacks tensor 'transformer\.h\.1\."):
        ActorWrapper.from_safetensors(partial, model=gpt2()[0])
    other = tmp_path / "other.safetensors"
    save_file({k: v.to(torch.float16) for k, v in state.items()}, str(other))
    with pytest.raises(ValueError, match="the checkpoint has F16 .*the model F32"):
        ActorWrapper.from_safetensors(other, model=gpt2()[0])


def test_a_meta_non_persistent_buffer_is_named(ray_cluster, tmp_path):
    """A model made on the meta device takes its parameters from the
    checkpoint, but a non-persistent buffer (not in any checkpoint) has no
    data to share: the error names it."""
    torch.manual_seed(0)
    model, cfg = llama()
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"inv_freq.*meta device"):
        ActorWrapper.from_safetensors(tmp_path, model=meta_model)


def test_sharded_sealing_is_one_object(ray_cluster, tmp_path):
    torch.manual_seed(0)
    model, _ = gpt2()
    index = save_sharded(model, tmp_path)
    w = ActorWrapper.from_safetensors(tmp_path)
    buf = ray_cluster.get(w.object_ref)
    assert isinstance(buf, np.ndarray) and buf.nbytes == w.nbytes
    assert w.num_tensors == len(index["weight_map"])


class MLP(torch.nn.Module):
    def __init__(self, d=1024, h=2048):
        super().__init__()
        self.up = torch.nn.Linear(d, h)
        self.norm = torch.nn.LayerNorm(h)
        self.bn = torch.nn.BatchNorm1d(h)  # buffers too
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        return self.down(self.bn(self.norm(torch.relu(self.up(x)))))


def programs():
    torch.manual_seed(0)
    # 67 MB: a program's first run allocates a few MB of its own (the JIT's
    # caches), which must stay small beside the weights.
    m = MLP(h=8192).eval()
    x = torch.randn(4, 1024)
    return (
        m,
        x,
        {
            "script": torch.jit.script(m),
            "trace": torch.jit.trace(m, x),
            "export": torch.export.export(m, (x,)),
        },
    )


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_programs_load_zero_copy_in_two_actors(ray_cluster, kind):
    """TorchScript modules and exported programs travel without their
    weights and load zero-copy: neither of two actors that load and run one
    grows its private memory by half the model (a copy of the weights in it
    would be the whole model), both read the weights from the shared object,
    and both answer as the original.

    Private (anonymous) memory is what a copy costs; shared memory is
    counted per process as a share of the mappers, which depends on when the
    other actor maps it, so it is not summed against a bound."""
    ray = ray_cluster
    model, x, made = programs()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    w = ActorWrapper(made[kind])
    assert w.nbytes < nbytes + 2**20 and len(ray.cloudpickle.dumps(w)) < 200_000, "the code travels, not the weights"

    @ray.remote(num_cpus=0.25)
    class Runner:
        def run(self, wrapper, x):
            from ray_zerocopy.diagnostics import pss_breakdown

            before = pss_breakdown()
            self.program = wrapper.load()
            f = self.program.module() if kind == "export" else self.program
            with torch.no_grad():
                out = f(x)
            after = pss_breakdown()
            return out, {k: after[k] - before[k] for k in ("anon", "shmem")}

    actors = [Runner.remote() for _ in range(2)]
    results = ray.get([a.run.remote(w, x) for a in actors])
    with torch.no_grad():
        expected = model(x)
    for out, grew in results:
        assert torch.equal(out, expected)
        assert grew["anon"] < 0.5 * nbytes, f"an actor's private memory grew by {grew['anon'] / nbytes:.2f} x the model"
        assert grew["shmem"] > 0.2 * nbytes, f"it read {grew['shmem'] / nbytes:.2f} x the model from shared memory"


class _WritesAHalf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.arange(4.0))

    def forward(self, x):
        half, rest = self.b.split(2)
        half.add_(1)  # writes the buffer, through an item of split
        return x + torch.cat([rest, rest])


class _Dequantizes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.arange(4, dtype=torch.int8))

    def forward(self, x):
        w = self.qweight.to(torch.float32)  # a copy: writing it writes no buffer
        w.mul_(0.5)
        return x + w


def test_a_program_that_writes_its_buffers_is_refused(ray_cluster):
    """A program that writes a buffer when it runs is refused when wrapped:
    BatchNorm in training mode, and an in-place op on an item of ``split``
    of a buffer (the write went unseen: the actor died on its first call).
    A copy of a buffer (``to``) written in place is no write of the buffer:
    such a program is taken and runs as in plain torch."""
    torch.manual_seed(0)
    m = MLP().train()  # BatchNorm in training mode updates its running stats
    ep = torch.export.export(m, (torch.randn(4, 1024),))
    with pytest.raises(ValueError, match="mutates buffers"):
        ActorWrapper(ep)
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"mutates buffers \['b'\]"):
        ActorWrapper(torch.export.export(_WritesAHalf().eval(), (x,)))
    dequantizes = torch.export.export(_Dequantizes().eval(), (x,))
    loaded = ActorWrapper(dequantizes).load().module()
    with torch.no_grad():
        assert torch.equal(loaded(x), _Dequantizes()(x)) and torch.equal(loaded(x), _Dequantizes()(x))


class _Renormalizing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, max_norm=1.0)
        self.out = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.emb.weight.mul_(5.0)  # rows longer than max_norm: each lookup renormalizes them

    def forward(self, i):
        return self.out(self.emb(i))


def test_a_program_whose_graph_writes_a_weight_gets_its_own_copy(ray_cluster, caplog):
    """An exported ``nn.Embedding(max_norm=...)`` renormalizes its weight in
    place on every call (``embedding_renorm_`` of a ``detach`` of it): the
    signature lists no mutation, so the program was taken as read-only and
    its first call killed the actor. What the graph writes, through what
    aliases it, is now copied by each process that loads, as for the
    module; two actors give the outputs of the program run in plain torch."""
    import copy

    ray = ray_cluster
    torch.manual_seed(0)
    ids = [torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 9]]), torch.tensor([[1, 9, 0]])]
    ep = torch.export.export(_Renormalizing().eval(), (ids[0],))
    reference = copy.deepcopy(ep).module()
    with torch.no_grad():
        want = [reference(i) for i in ids]
    with caplog.at_level("WARNING", logger="ray_zerocopy"):
        w = ActorWrapper(ep)
    assert "writes emb.weight in place" in caplog.text

    @ray.remote(num_cpus=0)
    class Runner:
        def __init__(self, w):
            self.m = w.load().module()

        def run(self, ids):
            with torch.no_grad():
                return [self.m(i) for i in ids]

    runners = [Runner.remote(w) for _ in range(2)]
    for r in runners:
        assert all(torch.equal(g, e) for g, e in zip(ray.get(r.run.remote(ids)), want, strict=True))
    for r in runners:
        ray.kill(r)


def test_sealing_a_checkpoint_counts_every_tensor_on_its_progress_bar(tmp_path, monkeypatch):
    """The checkpoint's tensors and the ones only the model holds (here the
    rotary embedding's non-persistent buffers) all advance the bar."""
    from ray_zerocopy import _seal, _telemetry

    model, cfg = llama()
    index = save_sharded(model, tmp_path)
    counted = []

    class Bar:
        def update(self, n):
            counted.append(n)

        def close(self):
            pass

    monkeypatch.setattr(_telemetry, "progress", lambda total, what: Bar())
    _, buf = _seal.seal_checkpoint(tmp_path, _seal.TORCH, lambda: transformers.LlamaForCausalLM(cfg))
    n = int.from_bytes(buf[:8].tobytes(), "little")
    header = json.loads(buf[8 : 8 + n].tobytes())
    # Not counted: the header, and the padding entries of the layout.
    tensors = [v["data_offsets"] for k, v in header.items() if k != "__metadata__" and not k.startswith("__rzc_pad__.")]
    assert len(tensors) > len(index["weight_map"]), "the model adds tensors the checkpoint lacks"
    assert sum(counted) == sum(end - start for start, end in tensors)


def test_a_checkpoint_written_while_it_is_sealed_is_refused_not_sealed_wrong(tmp_path, monkeypatch):
    """A training job may save its next checkpoint over the one being
    sealed. Whether the shard is rewritten in place (at another size, or at
    the same size), replaced by a new file, removed, or cut short or
    rewritten while its tensors are read, sealing stops with an error
    naming the shard: it never copies tensors by the offsets of a header
    the file no longer has, and never dies of SIGBUS on a shrunk mapping."""
    import os
    import time

    from ray_zerocopy import CheckpointChangedError, IoError, _seal
    from safetensors.torch import load, load_file, save_file
    from safetensors.torch import save as save_bytes

    path = tmp_path / "model.safetensors"
    first = {"a": torch.arange(1000.0), "b": torch.full((3000,), 2.0)}
    # The same names in another order, so the same offsets hold other bytes.
    same_size = {"b": torch.full((3000,), 5.0), "a": torch.arange(1000.0) * 3}
    bigger = {**same_size, "c": torch.ones(10)}
    shard = f"shard {path} was"

    def stamp(st):
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def rewrite_in_place(tensors):
        """Writes ``tensors`` into the same file (save_file would replace
        it), again until its times move: on a file system whose timestamps
        are coarse, a rewrite within the same tick changes nothing visible."""
        before, deadline = os.stat(path), time.monotonic() + 10
        while True:
            path.write_bytes(save_bytes(tensors))
            now = os.stat(path)
            assert now.st_ino == before.st_ino
            if stamp(now) != stamp(before):
                return
            if time.monotonic() > deadline:
                pytest.skip("this file system's timestamps did not move in 10 s")
            time.sleep(0.01)

    def packed():
        save_file(first, str(path))
        return _seal.pack_checkpoint(path, _seal.TORCH)

    packing = packed()
    rewrite_in_place(bigger)
    grew = rf"{shard} written to \(\d+ bytes when its header was read, \d+ now\) before"
    with pytest.raises(CheckpointChangedError, match=grew):
        packing.to_array()
    packing = packed()
    rewrite_in_place(same_size)
    touched = rf"{shard} changed \(its modification or change time moved.* before"
    with pytest.raises(CheckpointChangedError, match=touched):
        packing.to_array()
    packing = packed()
    save_file(same_size, str(path))  # save_file writes a new file in the old one's place
    with pytest.raises(CheckpointChangedError, match=f"{shard} replaced by another file before"):
        packing.to_array()
    packing = packed()
    os.remove(path)
    with pytest.raises(CheckpointChangedError, match=f"{shard} removed after its header was read"):
        packing.to_array()

    # While its tensors are read: cut short (the read fails), or rewritten
    # at the same size once they are read (the read succeeds, with bytes
    # the header read did not describe).
    read = _seal._Progress.read

    def read_while_it_shrinks(progress, fd, reads):
        os.truncate(path, 200)
        read(progress, fd, reads)

    def read_then_rewrite(progress, fd, reads):
        read(progress, fd, reads)
        rewrite_in_place(same_size)

    packing = packed()
    monkeypatch.setattr(_seal._Progress, "read", read_while_it_shrinks)
    shrunk = rf"{shard} written to \(\d+ bytes when its header was read, 200 now\) while"
    with pytest.raises(CheckpointChangedError, match=shrunk) as e:
        packing.to_array()
    assert isinstance(e.value.__context__, IoError) and "is 200 bytes long" in str(e.value.__context__)
    packing = packed()
    monkeypatch.setattr(_seal._Progress, "read", read_then_rewrite)
    with pytest.raises(CheckpointChangedError, match=f"{shard} changed .* while its tensors were read"):
        packing.to_array()

    monkeypatch.undo()
    _, buf = packed().to_array()
    got = {k: v for k, v in load(buf.tobytes()).items() if not k.startswith("__")}
    want = load_file(str(path))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_shard_is_never_mapped_so_a_header_cut_short_is_an_error(tmp_path):
    """Reading a checkpoint's headers maps nothing: a shard whose header
    claims more bytes than the file has, or that ends inside its length
    field, is refused with the native parser's message and the shard's
    name."""
    from ray_zerocopy import BadFormatError, _checkpoint
    from safetensors.torch import save as save_bytes

    whole = save_bytes({"a": torch.arange(10.0)})
    for name, data, message in (
        ("cut.safetensors", whole[:20], "header length .* runs past the end"),
        ("tiny.safetensors", whole[:5], "buffer is 5 bytes"),
        ("empty.safetensors", b"", "buffer is 0 bytes"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadFormatError, match=f"checkpoint file {tmp_path / name}: {message}"):
            _checkpoint.read(tmp_path / name)
    (tmp_path / "ok.safetensors").write_bytes(whole)
    ckpt = _checkpoint.read(tmp_path / "ok.safetensors")
    assert [(e.name, e.shape, e.nbytes) for e in ckpt.entries] == [("a", (10,), 40)]


def _fails_if_blocked(seconds=10):
    """A context in which a call that blocks (opening a FIFO for reading
    waits for a writer) raises TimeoutError after ``seconds``, failing the
    test instead of hanging it."""
    import contextlib
    import signal

    def blocked(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    @contextlib.contextmanager
    def context():
        previous = signal.signal(signal.SIGALRM, blocked)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return context()


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO for reading waits for a writer, forever when none
    comes: a FIFO named like a shard (in a directory, a list or an index,
    or as the index itself) is refused with its name, and so is one put in
    a shard's place after its header was read. A shard that is a symlink,
    as in a Hugging Face cache, is still read."""
    import os

    from ray_zerocopy import CheckpointChangedError, InvalidInputError, _checkpoint, _seal
    from safetensors.torch import load, save_file

    blob = tmp_path / "blob"
    save_file({"a": torch.arange(10.0)}, str(blob))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    link, fifo = ckpt / "model-00001-of-00002.safetensors", ckpt / "model-00002-of-00002.safetensors"
    link.symlink_to(blob)
    os.mkfifo(fifo)
    (tmp_path / "dir.safetensors").mkdir()
    refused = f"checkpoint file {fifo}: is a FIFO, not a regular file"
    with _fails_if_blocked():
        for source in (ckpt, fifo, [link, fifo]):
            with pytest.raises(InvalidInputError, match=refused):
                _checkpoint.read(source)
        with pytest.raises(InvalidInputError, match="dir.safetensors: is a directory, not a regular file"):
            _checkpoint.read([link, tmp_path / "dir.safetensors"])
        index = ckpt / _checkpoint.INDEX
        index.write_text(json.dumps({"weight_map": {"a": link.name, "b": fifo.name}}))
        with pytest.raises(InvalidInputError, match=refused):
            _checkpoint.read(ckpt)
        index.unlink()
        fifo.unlink()
        os.mkfifo(index)
        with pytest.raises(InvalidInputError, match=f"checkpoint file {index}: is a FIFO, not a regular file"):
            _checkpoint.read(ckpt)
        index.unlink()

        _, buf = _seal.pack_checkpoint(ckpt, _seal.TORCH).to_array()
        assert torch.equal(load(buf.tobytes())["a"], torch.arange(10.0))
        packing = _seal.pack_checkpoint(link, _seal.TORCH)
        link.unlink()
        os.mkfifo(link)
        with pytest.raises(CheckpointChangedError, match=f"shard {link} was replaced by another file before"):
            packing.to_array()


def test_an_index_naming_a_file_outside_its_directory_is_refused(tmp_path):
    """An index comes with the checkpoint, from whoever wrote it: a
    weight_map entry that is absolute or climbs out of the directory with
    '..' would make the seal read (and share) any safetensors file the user
    can read. It is refused, naming the index, the tensor and the entry; a
    plain name, or a name in a subdirectory, is read."""
    import re

    from ray_zerocopy import InvalidInputError, _checkpoint
    from safetensors.torch import save_file

    secret = tmp_path / "secret.safetensors"
    save_file({"s": torch.ones(3)}, str(secret))
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    save_file({"b": torch.zeros(4)}, str(ckpt / "sub" / "b.safetensors"))
    index = ckpt / _checkpoint.INDEX
    for entry in (str(secret), "../secret.safetensors", "sub/../../secret.safetensors", ""):
        index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "s": entry}}))
        refused = f"{index}: tensor 's' is mapped to {entry!r}, which is not a file in {ckpt}"
        with pytest.raises(InvalidInputError, match=re.escape(refused)):
            _checkpoint.read(ckpt)
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "sub/b.safetensors"}}))
    assert [e.name for e in _checkpoint.read(ckpt).entries] == ["a", "b"]


class _Tagger(torch.nn.Module):
    """A recurrent layer and a head (a scripted nn.LSTM alone has no
    ``forward`` to call: TorchScript names its overloads ``forward__0``...)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, torch.nn.Linear(16, 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_a_scripted_rnn_loads_with_its_flat_weights_shared(rnn):
    """A scripted nn.LSTM or nn.GRU keeps its parameters a second time in a
    list attribute (``_flat_weights``), which was refused as a container of
    tensors. The list's tensors are its parameters under other names: the
    list is stripped with them and rebuilt from the same loaded tensors."""
    from ray_zerocopy import Weights, _load, _seal

    torch.manual_seed(0)
    # Frozen as loaded parameters are (torch's LSTM takes another kernel
    # for parameters that need no gradient: the last bits differ).
    eager = _Tagger(getattr(torch.nn, rnn)(8, 16, num_layers=2, batch_first=True)).requires_grad_(False)
    model = torch.jit.script(eager.eval())
    x = torch.randn(3, 5, 8)
    sealed, buf = _seal.seal(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(sealed.kinds) == len(list(model.parameters())) and len(buf) < params + 64 * 1024
    loaded = _load.assemble(Weights.from_buffer(buf), sealed)
    flat = loaded.rnn._c.getattr("_flat_weights")
    inside = lambda t: buf.ctypes.data <= t.data_ptr() < buf.ctypes.data + len(buf)  # noqa: E731
    assert len(flat) == len(list(model.rnn.parameters())) and all(inside(t) for t in flat)
    assert [t.data_ptr() for t in flat] == [p.data_ptr() for p in loaded.rnn.parameters()]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_of_another_layout_than_the_model_s_says_so_and_what_to_do(ray_cluster, tmp_path):
    """transformers 5 keeps a mixture-of-experts layer's experts fused in
    one tensor, where Mixtral's checkpoints (its own save_pretrained's too)
    hold one per expert, and converts them as it loads. Filling such a
    model from the directory names the problem for what it is, a layout
    other than the model's, and the way that works."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    model = transformers.MixtralForCausalLM(config)
    from safetensors import safe_open

    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        saved = set(f.keys())
    assert not saved <= set(model.state_dict()), "this transformers saved Mixtral in the model's own layout"
    with pytest.raises(ValueError, match=r"lacks \d+ of the model's \d+ tensors and holds \d+ the model has no name"):
        ActorWrapper.from_safetensors(tmp_path, model=model)
    with pytest.raises(ValueError, match=r"from_pretrained\(path\)"):
        ActorWrapper.from_safetensors(tmp_path, model=model)
