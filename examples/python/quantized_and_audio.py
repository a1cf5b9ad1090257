"""Models that need more than plain tensors, each sealed once and loaded
zero-copy by actors: a torchao-quantized Llama (int8 weight-only: its
quantized weights are tensor subclasses made of plain tensors, and those are
what actors share), and a wav2vec2 CTC model (its positional convolution
uses weight_norm, a parametrization torch refuses to pickle). Both are built
from small configs: nothing is downloaded.

Run: python examples/python/quantized_and_audio.py
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
import transformers
from ray_zerocopy import ActorWrapper
from torchao.quantization import Int8WeightOnlyConfig, quantize_


@ray.remote(num_cpus=0.5)
class Runner:
    def __init__(self, actor_wrapper):
        self.model = actor_wrapper.load()  # zero-copy, once per actor

    def __call__(self, kwargs):
        with torch.no_grad():
            return self.model(**kwargs).logits


def check(name, model, kwargs):
    torch.set_num_threads(1)  # as the actors run: the same arithmetic, bit for bit
    with torch.no_grad():
        expected = model(**kwargs).logits
    actor_wrapper = ActorWrapper(model)
    outs = ray.get([Runner.remote(actor_wrapper).__call__.remote(kwargs) for _ in range(2)])
    assert all(torch.equal(o, expected) for o in outs), name
    print(f"{name}: {actor_wrapper.num_tensors} tensors, {actor_wrapper.nbytes / 2**20:.1f} MiB sealed; "
          f"2 actors, logits equal to the original's")


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    quantize_(llama, Int8WeightOnlyConfig())  # every Linear's weight becomes an int8 tensor subclass
    check("torchao int8 Llama", llama, {"input_ids": torch.randint(0, 256, (2, 12))})

    cfg = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    check("wav2vec2 CTC", transformers.Wav2Vec2ForCTC(cfg).eval(), {"input_values": torch.randn(2, 1600)})


if __name__ == "__main__":
    main()
