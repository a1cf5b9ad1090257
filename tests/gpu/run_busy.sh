#!/usr/bin/env bash
# The GPU tests whose outcome depends on timing pass on a busy machine: two
# runs of them at once, each with its own driver log, temporary directory
# and no pytest cache, on the stand-in driver (LD_LIBRARY_PATH and
# RZC_FAKECUDA set by the caller, as `make test-gpu` does).
#
#   tests/gpu/run_busy.sh PYTHON OUTDIR
#
# Chosen because they wait on other processes or threads, or time them:
# every sharing test between processes (the rendezvous waits for an upload
# in progress, a server that never answers is named in under 10 s, stalled
# clients hold up no loader for 5 s, an uploader killed mid-way), uploads
# whose copies complete late, two uploads of one buffer at once, two
# versions sharing a base part, and the threads tests (fresh processes
# whose threads make their first calls together). The rest of tests/gpu
# (fault injection, one process each) does not depend on timing, and two
# full runs at once would take over 5 minutes on 2 cores.
set -u
py=$1
out=$2
tests=(
  tests/gpu/test_share.py
  tests/gpu/test_faults.py::test_copies_that_complete_late_are_waited_for
  tests/gpu/test_faults.py::test_two_uploads_of_one_buffer_at_once
  tests/gpu/test_update_gpu.py
  tests/gpu/test_threads.py
)
rm -rf "$out"
mkdir -p "$out"
# Each run's temporary directory is short: a sharing test's socket path
# (107 bytes at most) lies in it, and a longer one sends the rendezvous to
# a directory both runs share.
tmp=$(mktemp -d /tmp/rzc-busy-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
pids=()
for run in a b; do
  FAKECUDA_LOG="$out/$run-driver.jsonl" "$py" -m pytest -q -rs -p no:cacheprovider \
    --basetemp="$tmp/$run" "${tests[@]}" >"$out/$run.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
for run in a b; do
  if ! tail -n 1 "$out/$run.log" | grep -q ' passed' || tail -n 1 "$out/$run.log" | grep -q 'failed\|error'; then
    status=1
    tail -n 60 "$out/$run.log"
  fi
  echo "busy run $run: $(tail -n 1 "$out/$run.log")"
done
echo "two runs at once took $(($(date +%s) - start)) s"
exit $status
