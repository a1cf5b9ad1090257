"""The models and checkpoints users have, each sealed once and loaded by
actors zero-copy:

1. a sharded Hugging Face directory (save_pretrained) filled into its model
   class: config, then model, then the checkpoint;
2. the same directory as {name: tensor};
3. a TorchScript module and a torch.export program.

The model is a small Llama built from a config (no download), saved to a
temporary directory first, as a downloaded checkpoint would be on disk.

Run: python examples/python/checkpoints.py
"""

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from ray_zerocopy import ActorWrapper
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig


@ray.remote(num_cpus=0.5)
class Generator:
    def __init__(self, actor_wrapper):
        self.model = actor_wrapper.load()  # zero-copy, once per actor

    def logits(self, ids):
        with torch.no_grad():
            return self.model(ids).logits


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    original = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = original(ids).logits

    with tempfile.TemporaryDirectory() as path:
        original.save_pretrained(path, max_shard_size="200KB")  # a sharded checkpoint on disk
        print("checkpoint:", sorted(f for f in os.listdir(path) if "safetensors" in f)[:3], "...")

        # 1. Config, then model, then the checkpoint filled into it.
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
        actor_wrapper = ActorWrapper.from_safetensors(path, model=model)
        actors = [Generator.remote(actor_wrapper) for _ in range(2)]
        for logits in ray.get([a.logits.remote(ids) for a in actors]):
            assert torch.equal(logits, expected)
        print("sharded checkpoint in its model class: logits equal in 2 actors")

        # 2. The same checkpoint as {name: tensor}.
        tensors = ActorWrapper.from_safetensors(path).load()
        assert torch.equal(tensors["model.embed_tokens.weight"], original.model.embed_tokens.weight)
        print(f"as a dict: {len(tensors)} tensors")

    # 3. TorchScript and torch.export: the code travels, the weights are shared.
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        want = mlp(x)
    traced = ActorWrapper(torch.jit.trace(mlp, x)).load()
    program = ActorWrapper(torch.export.export(mlp, (x,))).load()
    with torch.no_grad():
        assert torch.equal(traced(x), want) and torch.equal(program.module()(x), want)
    print("TorchScript and torch.export programs: outputs equal")


if __name__ == "__main__":
    main()
