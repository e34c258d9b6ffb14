#!/usr/bin/env bash
# One device call's GPU test run: tests/gpu split into CHUNKS pytest processes side by side
# (device_setup.sh gpu_tests_start), then bench/overheads.py (first use, new lengths, memory).
# Run from the repository root on the GPU machine:
#   bash bench/device_tests.sh                  (every GPU test, 6 processes, then overheads)
#   FILTER="dilated" OVERHEADS=0 bash bench/device_tests.sh
# Under $OUT: gpu.txt, gpu-tests.txt (each chunk's failures and tail), overheads.jsonl.
set -u
source bench/device_setup.sh
export PATTERNCC_AUTOTUNE=0
logs=$(mktemp -d)
gpu_tests_start "$logs" "${FILTER:-}"
wait
gpu_tests_report "$logs"
if [ "${OVERHEADS:-1}" != 0 ]; then
  timeout ${OVERHEAD_TIMEOUT:-120} python3 bench/overheads.py > "$OUT/overheads.jsonl" 2> "$logs/overheads.err"
  echo "overheads exit $?"; cat "$OUT/overheads.jsonl"; tail -n 3 "$logs/overheads.err"
fi
