"""A sentence-transformers model embedding a Ray Data dataset: the model is
sealed once, and each actor of the pool loads it zero-copy (`as_udf`). The
model is a small BERT with a tiny WordPiece vocabulary written here, plus
mean pooling: nothing is downloaded.

Run: python examples/python/sentence_embeddings.py
"""

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from ray_zerocopy import ActorWrapper
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, BertTokenizer

WORDS = "the a cat dog sat on mat ran in park red blue big small quick brown fox jumps over lazy".split()


def tiny_sentence_transformer(directory: str) -> SentenceTransformer:
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(os.path.join(directory, "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=32)).save_pretrained(directory)
    encoder = models.Transformer(directory, max_seq_length=16)
    pooling = models.Pooling(encoder.get_word_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[encoder, pooling], device="cpu")


def embed(model, batch: dict) -> dict:
    return {"text": batch["text"], "embedding": model.encode(list(batch["text"]), convert_to_numpy=True)}


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)  # as the actors run: the same arithmetic, bit for bit
    sentences = [" ".join(WORDS[i % 7 : i % 7 + 3 + i % 5]) for i in range(64)]
    with tempfile.TemporaryDirectory() as d:
        model = tiny_sentence_transformer(d).eval()
        expected = model.encode(sentences, convert_to_numpy=True)
        actor_wrapper = ActorWrapper(model)  # seals the weights once

    ds = ray.data.from_items([{"text": s} for s in sentences])
    out = ds.map_batches(actor_wrapper.as_udf(embed), batch_size=16, compute=ActorPoolStrategy(size=2)).take_all()
    got = {row["text"]: row["embedding"] for row in out}
    assert len(out) == len(sentences)
    # Batches group sentences differently here (encode sorts them by length),
    # so padding and the order of float sums differ: equal to float rounding.
    worst = max(float(np.abs(got[s] - e).max()) for s, e in zip(sentences, expected, strict=True))
    assert worst < 1e-5, worst
    print(f"sentence-transformers: {actor_wrapper.num_tensors} tensors, {actor_wrapper.nbytes / 2**20:.1f} MiB sealed; "
          f"{len(out)} sentences embedded by "
          f"2 actors on Ray Data, each {expected.shape[1]}-d embedding within {worst:.1e} of the original model's")


if __name__ == "__main__":
    main()
