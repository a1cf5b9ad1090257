#!/usr/bin/env bash
# The GPU check, one command on a machine with a GPU, torch, pytest (and
# optionally jax/cupy), but no Rust and no Ray. Build the wheel first on a
# development machine (`make python`, then copy build/wheels/*.whl to .gpu/).
#   bash tests/gpu/run_gpu_checks.sh .gpu/ray_zerocopy-*.whl
# Writes test output and benchmark JSON to $OUT (default ./gpu-results).
set -euo pipefail
wheel=${1:?usage: run_gpu_checks.sh WHEEL}
out=${OUT:-gpu-results}
mkdir -p "$out"
site=$(mktemp -d)
python -m pip install -q --no-deps --no-index --target "$site" "$wheel"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L | tee "$out/gpu.txt" || true
python -m pytest -rs -q tests/gpu/test_gpu.py 2>&1 | tee "$out/tests.txt"
python tests/gpu/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.txt"
