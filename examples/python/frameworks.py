"""Beyond torch modules: pytrees of numpy or JAX arrays, and an existing
safetensors checkpoint, each sealed once and loaded zero-copy by actors.

Run: python examples/python/frameworks.py
"""

import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import jax
import numpy as np
import ray
import torch
from ray_zerocopy import ActorWrapper
from safetensors.torch import save_file


@ray.remote(num_cpus=0.5)
def total(wrapper, framework=None):
    tree = wrapper.load(framework=framework)
    leaves = jax.tree_util.tree_leaves(tree)
    return type(leaves[0]).__module__.split(".")[0], float(sum(np.asarray(x, dtype=np.float64).sum() for x in leaves))


def main():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    params = {"dense": {"w": np.ones((256, 256), np.float32), "b": np.zeros(256, np.float32)}, "scale": np.array([2.0])}
    np_wrapper = ActorWrapper(params)
    print("numpy pytree ->", ray.get(total.remote(np_wrapper)))
    print("numpy pytree as torch ->", ray.get(total.remote(np_wrapper, "torch")))

    jparams = jax.tree_util.tree_map(jax.numpy.asarray, params)
    print("JAX pytree ->", ray.get(total.remote(ActorWrapper(jparams))))

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.safetensors")
        save_file({"embed.weight": torch.ones(100, 8), "head.bias": torch.zeros(8)}, path)
        ckpt = ActorWrapper.from_safetensors(path)
    for fw in ("torch", "numpy", "jax"):
        print(f"checkpoint as {fw} ->", ray.get(total.remote(ckpt, fw)))


if __name__ == "__main__":
    main()
