#!/bin/sh
# Builds the fakecuda test double and its self-test, runs every case, then
# runs each case again under valgrind (without its fork()ed checks) when
# valgrind is installed. Exit status 0 only if everything passed.
#
# Usage (from the repository root): tests/fakecuda/run_selftest.sh [OUTDIR]
#   OUTDIR defaults to build/fakecuda. FAKECUDA_SELFTEST_VALGRIND=0 skips valgrind.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-build/fakecuda}
sh "$here/build.sh" "$out" || { echo "fakecuda: build failed"; exit 1; }
lib="$out/libcuda.so.1"
status=0

"$out/selftest" "$lib" all || status=1

if [ "${FAKECUDA_SELFTEST_VALGRIND:-1}" = 0 ]; then
    echo "=== valgrind: skipped (FAKECUDA_SELFTEST_VALGRIND=0)"
elif ! command -v valgrind >/dev/null 2>&1; then
    echo "=== valgrind: not installed, skipped"
else
    for c in $("$out/selftest" "$lib" list); do
        log="$out/valgrind-$c.log"
        if SELFTEST_VALGRIND=1 valgrind -q --error-exitcode=9 "$out/selftest" "$lib" "$c" >"$log" 2>&1; then
            echo "=== valgrind $c: PASSED ($(tail -n 1 "$log"))"
        else
            echo "=== valgrind $c: FAILED, see $log"
            grep -v '^ok ' "$log" | head -n 40
            status=1
        fi
    done
fi
[ $status = 0 ] && echo "=== fakecuda self-test: all passed" || echo "=== fakecuda self-test: FAILED"
exit $status
