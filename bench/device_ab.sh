#!/usr/bin/env bash
# One device call of interleaved A/Bs (bench/ab_interleaved.py), a list of (switch, pattern, T, D)
# run one after another, then their summary table (bench/ab_summary.py). Run from the
# repository root on the GPU machine:
#   AB="pairsall longformer 16384 64|pairsall causal_window 16384 64" bash bench/device_ab.sh
#   AB="nocap longformer 65536 64" ROUNDS=4 ABT=200 bash bench/device_ab.sh
# Switch names are bench_attention.ABLATIONS' rows; ROUNDS rounds each (default 3), each A/B cut
# at ABT seconds (default 110: a 16K A/B of 3 rounds took 25-40 s on an H100, 64K 40-60 s, before
# the 5 s heat-up that now precedes round 0: HEAT_S, see ab_interleaved.py).
# Configs from the tuning table (PATTERNCC_AUTOTUNE=0). Under $OUT: ab.jsonl, ab.md.
set -u
source bench/device_setup.sh > /dev/null
export PATTERNCC_AUTOTUNE=0
: "${AB:?AB=\"switch pattern T D|...\" names the A/Bs}"
IFS='|' read -ra runs <<< "$AB"
for run in "${runs[@]}"; do
  read -r what pattern t d <<< "$run"
  echo "== $what $pattern T=$t D=$d"
  TS=$t DS=$d PATTERN=$pattern ABLATE=$what ROUNDS=${ROUNDS:-3} timeout ${ABT:-110} \
    python3 bench/ab_interleaved.py 2>> "$OUT/ab.err" >> "$OUT/ab.jsonl"; echo "exit $?"
done
python3 bench/ab_summary.py "$OUT/ab.jsonl" | tee "$OUT/ab.md"
