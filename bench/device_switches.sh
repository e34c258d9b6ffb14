#!/usr/bin/env bash
# One device call for the switches that stay off until a GPU measures them
# (triton_backend.SKIP_TAIL_MASK, codegen.MERGE_BANDS, lowering.CLASS_MASK): their exactness
# tests run natively on the GPU, the main walks' SASS counts with the device's Triton, then
# the A/B rows at T=65536 (no FlexAttention), each against the default re-timed after it.
# Run from the repository root on the GPU machine:
#   bash bench/device_switches.sh
#   DS=128 PATTERNS=dilated,causal_window TESTS=0 SASS=0 bash bench/device_switches.sh
#   GPU_FILTER="dilated or residue" bash bench/device_switches.sh   (and those tests/gpu tests)
# A GPU that tuning.TUNED lacks can borrow another GPU's configs: TUNED_AS="NVIDIA H200".
# Under $OUT: gpu.txt, gpu-tests.txt, sass.jsonl, bench-$TAG.log and the results JSON.
set -u
source bench/device_setup.sh
export PATTERNCC_AUTOTUNE=0 TUNED_AS="${TUNED_AS-}"
logs=$(mktemp -d)
if [ "${TESTS:-1}" != 0 ]; then
  # Compile-bound: one process per (test, tile configuration), side by side.
  n=0
  for sel in "(tail_free and default) or full_entries" "tail_free and stacked" "tail_free and tma" \
             "class_coordinate and default" "class_coordinate and stacked" "class_coordinate and tma"; do
    n=$((n + 1))
    (timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider \
       -k "$sel" > "$logs/t-$n.txt" 2>&1; echo "rc $? ($sel)" >> "$logs/t-$n.txt") &
  done
  [ -n "${GPU_FILTER:-}" ] && (timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/gpu/test_gpu_kernels.py -q \
    -p no:cacheprovider -k "$GPU_FILTER" > "$logs/t-gpu.txt" 2>&1; echo "rc $?" >> "$logs/t-gpu.txt") &
fi
if [ "${SASS:-1}" != 0 ]; then
  (for sw in "" SKIP_TAIL_MASK,MERGE_BANDS SKIP_TAIL_MASK,MERGE_BANDS,CLASS_MASK; do
     SWITCHES=$sw timeout 150 python3 bench/sass_loops.py
   done > "$OUT/sass.jsonl" 2> "$logs/sass.err") &
fi
wait
for f in "$logs"/t-*.txt; do echo "== $(basename "$f")"; tail -n 15 "$f"; done > "$OUT/gpu-tests.txt" 2>/dev/null
grep -hE "^== |passed|failed|rc " "$OUT/gpu-tests.txt" 2>/dev/null
tail -n 3 "$logs/sass.err" 2>/dev/null
TS=65536 DS=${DS:-64} PATTERNS=${PATTERNS:-dilated,causal_window,longformer,bigbird} \
  ABLATE=${ABLATE-classmask,bands,tailfree} SKIP_FLEX=1 TAG=${TAG:-switches} timeout ${BENCH_TIMEOUT:-330} \
  python3 bench/bench_attention.py > "$OUT/bench-${TAG:-switches}.log" 2> "$logs/bench.err"; echo "bench exit $?"
tail -n 5 "$logs/bench.err"
tail -n 30 "$OUT/bench-${TAG:-switches}.log"
