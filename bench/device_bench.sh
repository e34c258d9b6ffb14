#!/usr/bin/env bash
# One device call: the benchmark against dense SDPA and FlexAttention (one T per call:
# both do not fit 10 minutes with the ablations; D = 64, 128; with the residue-order,
# thin-column and tall-row ablations), then first-use / new-length overheads and peak
# memory, then the 1M-token checks. Run from the repository root on the GPU machine:
#   bash bench/device_bench.sh                       (T=16384, with ablations)
#   TS=65536 ABLATE= bash bench/device_bench.sh      (T=65536)
# JSON, logs and the Markdown table land under $OUT.
set -u
source bench/device_setup.sh
TS=${TS:-16384} DS=${DS:-64,128} ABLATE=${ABLATE-residue,tokens,thin,stack} timeout ${BENCH_TIMEOUT:-390} \
  python3 bench/bench_attention.py > "$OUT/bench.log" 2> "$OUT/bench.err"; echo "bench exit $?"
tail -40 "$OUT/bench.log"
timeout ${OVERHEAD_TIMEOUT:-90} python3 bench/overheads.py > "$OUT/overheads.jsonl" 2> "$OUT/overheads.err"; echo "overheads exit $?"
cat "$OUT/overheads.jsonl"
timeout ${LIMITS_TIMEOUT:-90} python3 -m pytest tests/gpu/test_limits_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -3
