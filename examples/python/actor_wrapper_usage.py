"""Every pattern of the ActorWrapper usage guide, runnable: basic usage, Ray
Data integration, single model, multi-model pipeline, pre/post-processing,
plain Ray actors, device placement, fast loading and per-actor device
override. Uses the first GPU when there is one, the CPU otherwise.

Run: python examples/python/actor_wrapper_usage.py
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from ray_zerocopy import ActorWrapper
from torch import nn

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
GPUS = 1 if DEVICE != "cpu" else 0


class EncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x):
        return self.net(x)


class DecoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(32, 4)

    def forward(self, x):
        return self.net(x)


class MyPipeline:
    def __init__(self):
        self.encoder = EncoderModel()
        self.decoder = DecoderModel()

    def __call__(self, data):
        return self.decoder(self.encoder(data))


class Preprocessor:
    def __call__(self, raw):
        return torch.as_tensor(np.asarray(raw, dtype=np.float32)).to(DEVICE)


class Postprocessor:
    def __call__(self, outputs):
        return {"predictions": outputs.argmax(-1).cpu().numpy()}


def dataset(n=64):
    rng = np.random.default_rng(0)
    return ray.data.from_items([{"data": rng.standard_normal(16).astype(np.float32)} for _ in range(n)])


# The actor class of the guide's "Ray Data Integration" section.
class InferenceActor:
    def __init__(self, actor_wrapper):
        self.pipeline = actor_wrapper.load()

    def __call__(self, batch):
        inputs = torch.tensor(batch["data"]).to(DEVICE)
        with torch.no_grad():
            outputs = self.pipeline(inputs)
        return {"predictions": outputs.cpu().numpy()}


# Pattern 3: preprocessing + inference + postprocessing.
class PrePostActor:
    def __init__(self, actor_wrapper):
        self.pipeline = actor_wrapper.load()
        self.preprocessor = Preprocessor()
        self.postprocessor = Postprocessor()

    def __call__(self, batch):
        inputs = self.preprocessor(batch["data"])
        with torch.no_grad():
            outputs = self.pipeline(inputs)
        return self.postprocessor(outputs)


def main():
    ray.init(num_cpus=2, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)

    # 1. Wrap your pipeline (once, on the driver).
    pipeline = MyPipeline()
    actor_wrapper = ActorWrapper(pipeline, device=DEVICE)
    print(actor_wrapper)

    # Ray Data integration: 4 actors share one copy of the weights.
    results = dataset().map_batches(
        InferenceActor,
        fn_constructor_kwargs={"actor_wrapper": actor_wrapper},
        batch_size=32,
        compute=ActorPoolStrategy(size=4),
        num_cpus=0.25,
        num_gpus=GPUS / 4,
    )
    print("Ray Data predictions:", results.count(), "rows")

    # Pattern 1: a single model.
    model_wrapper = ActorWrapper(EncoderModel(), device=DEVICE)
    single = dataset().map_batches(
        model_wrapper.as_udf(
            lambda model, batch: {"h": model(torch.as_tensor(batch["data"]).to(DEVICE)).cpu().numpy()}
        ),
        batch_size=16,
        compute=ActorPoolStrategy(size=2),
        num_cpus=0.5,
    )
    print("single model:", single.count(), "rows")

    # Pattern 3: pre/post-processing objects stay per actor.
    post = dataset().map_batches(
        PrePostActor,
        fn_constructor_kwargs={"actor_wrapper": actor_wrapper},
        batch_size=16,
        compute=ActorPoolStrategy(size=2),
        num_cpus=0.5,
    )
    print("pre/post-processing:", post.count(), "rows")

    # Plain Ray actors (no Ray Data).
    @ray.remote(num_cpus=0.5, num_gpus=GPUS / 4)
    class PlainActor:
        def __init__(self, actor_wrapper):
            self.pipeline = actor_wrapper.load()

        def predict(self, data):
            with torch.no_grad():
                return self.pipeline(data.to(DEVICE)).cpu()

    data = torch.randn(8, 16)
    actors = [PlainActor.remote(actor_wrapper) for _ in range(2)]
    outs = ray.get([a.predict.remote(data) for a in actors])
    with torch.no_grad():
        expected = pipeline(data)
    assert all(torch.equal(o, expected) for o in outs) or DEVICE != "cpu"
    print("plain actors agree with the original pipeline")

    # Device placement, fast loading, and overriding the device per load.
    cpu_wrapper = ActorWrapper(pipeline, device="cpu", use_fast_load=True)
    local = cpu_wrapper.load()
    local_gpu_or_cpu = cpu_wrapper.load(device=DEVICE)
    with torch.no_grad():
        assert torch.equal(local(data), expected)
        local_gpu_or_cpu(data.to(DEVICE))
    print("fast load and device override: ok")


if __name__ == "__main__":
    main()
