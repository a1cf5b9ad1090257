#!/usr/bin/env bash
# The GPU check, one command on a machine with a GPU, torch and pytest (and
# optionally jax/cupy), but no Rust and no Ray. Build the wheel first on a
# development machine (`make gpu-bundle` puts it in .gpu/).
#   bash tests/gpu/run_gpu_checks.sh .gpu/ray_zerocopy-*.whl
# Runs the device tests (tests/gpu, the same ones `make test` runs on the
# stand-in driver), the framework tests (tests/hardware) and the upload
# benchmark; writes their output and JSON to $OUT (default ./gpu-results).
set -uo pipefail
wheel=${1:?usage: run_gpu_checks.sh WHEEL}
out=${OUT:-gpu-results}
mkdir -p "$out"
site=$(mktemp -d)
python -m pip install -q --no-deps --no-index --target "$site" "$wheel" \
  || python -m zipfile -e "$wheel" "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
unset RZC_FAKECUDA
nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
python -m pytest -rs -q tests/gpu tests/hardware 2>&1 | tee "$out/tests.txt"
status=${PIPESTATUS[0]}
python tests/hardware/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
python tests/hardware/bench_share.py --out "$out" 2>&1 | tee "$out/share.txt"
exit $(( status || bench || PIPESTATUS[0] ))
