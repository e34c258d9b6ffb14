#!/usr/bin/env bash
# One device call's GPU test run: tests/gpu split into CHUNKS pytest processes side by side
# (the tests are compile-bound), then bench/overheads.py (first use, new lengths, memory).
# Run from the repository root on the GPU machine:
#   bash bench/device_tests.sh                  (every GPU test, 6 processes, then overheads)
#   FILTER="dilated" OVERHEADS=0 bash bench/device_tests.sh
# Under $OUT: gpu.txt, gpu-tests.txt (each chunk's tail), overheads.jsonl.
set -u
source bench/device_setup.sh
export PATTERNCC_AUTOTUNE=0
chunks=${CHUNKS:-6}
logs=$(mktemp -d)
python3 -m pytest tests/gpu -q --collect-only -p no:cacheprovider ${FILTER:+-k "$FILTER"} 2>/dev/null \
  | grep "::" > "$logs/nodes.txt"
echo "$(wc -l < "$logs/nodes.txt") tests in $chunks processes"
for i in $(seq 0 $((chunks - 1))); do
  awk -v n="$chunks" -v i="$i" 'NR % n == i' "$logs/nodes.txt" > "$logs/chunk-$i.txt"
  mapfile -t nodes < "$logs/chunk-$i.txt"  # node ids hold spaces and '|' (pattern sources)
  (timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider "${nodes[@]}" \
     > "$logs/t-$i.txt" 2>&1; echo "rc $? (chunk $i)" >> "$logs/t-$i.txt") &
done
wait
for f in "$logs"/t-*.txt; do echo "== $(basename "$f")"; grep -E "FAILED|Error" "$f" | head -20; tail -n 3 "$f"; done \
  > "$OUT/gpu-tests.txt"
grep -hE "^== |passed|failed|rc " "$OUT/gpu-tests.txt"
if [ "${OVERHEADS:-1}" != 0 ]; then
  timeout ${OVERHEAD_TIMEOUT:-120} python3 bench/overheads.py > "$OUT/overheads.jsonl" 2> "$logs/overheads.err"
  echo "overheads exit $?"; cat "$OUT/overheads.jsonl"; tail -n 3 "$logs/overheads.err"
fi
