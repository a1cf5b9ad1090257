#!/bin/sh
# Builds the fakecuda test double (libcuda.so.1) and its self-test.
# Usage: tests/fakecuda/build.sh [OUTDIR]   (default build/fakecuda; run from the repo root)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-build/fakecuda}
mkdir -p "$out"
gcc -std=gnu11 -O2 -g -fPIC -shared -Wall -Wextra -Werror -pthread -Wl,-soname,libcuda.so.1 \
    -o "$out/libcuda.so.1" "$here"/*.c -ldl
ln -sf libcuda.so.1 "$out/libcuda.so"
gcc -std=gnu11 -Wall -Wextra -Werror -pthread -o "$out/selftest" "$here"/selftest/*.c -ldl
