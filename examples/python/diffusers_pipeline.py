"""A whole diffusers text-to-image pipeline (UNet, VAE, CLIP text encoder,
tokenizer, scheduler) sealed once and run by two actors that share its
weights zero-copy. Built from small configs and a tiny tokenizer written
here: nothing is downloaded.

Run: python examples/python/diffusers_pipeline.py
"""

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from ray_zerocopy import ActorWrapper
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def byte_chars() -> list[str]:
    """The printable stand-in of every byte that byte-level BPE uses."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return list(out.values())


def tiny_tokenizer(directory: str) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer whose vocabulary is every byte (alone and
    word-final), with no merges: any prompt tokenizes, one byte a token."""
    chars = byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def tiny_pipeline(directory: str) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    tokenizer = tiny_tokenizer(directory)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt, num_inference_steps=2, height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


@ray.remote(num_cpus=0.5)
class Painter:
    def __init__(self, actor_wrapper):
        self.pipe = actor_wrapper.load()  # zero-copy, once per actor

    def paint(self, prompt):
        return generate(self.pipe, prompt)


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)  # as the actors run: the same arithmetic, bit for bit
    with tempfile.TemporaryDirectory() as d:
        pipe = tiny_pipeline(d)
        expected = generate(pipe, "a red cat")
        actor_wrapper = ActorWrapper(pipe)
    images = ray.get([Painter.remote(actor_wrapper).paint.remote("a red cat") for _ in range(2)])
    assert all(np.array_equal(img, expected) for img in images)
    print(
        f"diffusers pipeline: {actor_wrapper.num_tensors} tensors, {actor_wrapper.nbytes / 2**20:.1f} MiB sealed; "
        f"2 actors painted images {images[0].shape} equal to the original pipeline's"
    )


if __name__ == "__main__":
    main()
