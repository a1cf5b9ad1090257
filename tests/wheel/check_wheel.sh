#!/usr/bin/env bash
# Checks the distributions in DIST (default build/dist): the wheel installs
# with pip alone into a fresh virtual environment of every Python 3.10-3.13
# this machine has (at least the current one) and works there; the sdist
# builds into a wheel.
#   bash tests/wheel/check_wheel.sh [DIST]
set -euo pipefail
dist=${1:-build/dist}
wheel=$(ls "$dist"/ray_zerocopy-*-py3-none-manylinux_2_28_x86_64.whl)
sdist=$(ls "$dist"/ray_zerocopy-*.tar.gz)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

smoke='
import numpy as np, ray_zerocopy as rzc
a = np.arange(1000, dtype=np.float32)
buf = rzc.pack([rzc.PackInput("a", rzc.Dtype.F32, a.shape, a.ctypes.data, a.nbytes)], guard_bytes=4096)
w = rzc.Weights.from_buffer(buf, write_protect=True)
assert np.array_equal(np.from_dlpack(w.dlpack(0)), a) and w.names() == ["a"]
print("ray_zerocopy", rzc.__version__, "works on Python", __import__("sys").version.split()[0])
'
pythons=()
for v in 3.10 3.11 3.12 3.13; do
  for p in ${PYENV_ROOT:-$HOME/.pyenv}/versions/$v*/bin/python$v "python$v"; do
    # (a pyenv shim is on PATH for every version, but runs only the selected ones)
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "" 2>/dev/null; then pythons+=("$(command -v "$p")"); break; fi
  done
done
[ ${#pythons[@]} -gt 0 ] || pythons=("$(command -v python3)")
for py in "${pythons[@]}"; do
  env="$work/venv-$(basename "$py")"
  "$py" -m venv "$env"
  "$env/bin/python" -m pip install -q --upgrade pip
  "$env/bin/python" -m pip install -q "$wheel"
  (cd "$work" && "$env/bin/python" -c "$smoke")
done
echo "wheel: installed with pip and used on ${#pythons[@]} Python version(s)"
"${pythons[0]}" -m venv "$work/sdist"
"$work/sdist/bin/python" -m pip install -q --upgrade pip
"$work/sdist/bin/python" -m pip wheel -q --no-deps -w "$work/from-sdist" "$sdist"
ls "$work"/from-sdist/ray_zerocopy-*.whl >/dev/null
echo "sdist: builds a wheel"
