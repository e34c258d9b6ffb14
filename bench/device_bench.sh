#!/usr/bin/env bash
# One device call: the benchmark against dense SDPA and FlexAttention (one T per call:
# both do not fit 10 minutes; D = 64, 128; with the residue-order, division-free-token,
# thin-column and split-rows-first A/B rows), then first-use / new-length overheads and
# peak memory, then the 1M-token checks. Run from the repository root on the GPU machine:
#   bash bench/device_bench.sh                                   (T=16384, with A/B rows)
#   TS=65536 EXTRAS=0 bash bench/device_bench.sh                 (T=65536, A/B rows, no extras)
# Configs come from the tuning table / cache (PATTERNCC_AUTOTUNE=0: tuning is bench/tune.py's
# job, and an A/B variant must not tune on first use inside the timed run). The `stack` A/B
# (ABLATE=...,stack) is left out by default: with it the 16K run did not fit (RESULTS.md).
# Other rows: fold (scale fold off), rtma (residue-order TMA boxes off; dilated patterns only),
# thinrows (thin global query rows off; patterns with split rows), split (split rows' pieces
# first off), direct (direct launches off: host time, so run it at TS=16384), pointers
# (tensors, not addresses, to direct launches: host time), scratch (4x split-row scratch:
# shorter pieces), delta (Delta by a pass of its own, not in the dQ pass), spread (thin-row
# pieces first), spreadcap (spread uncapped), pairthin (thin-row items one key tile a step),
# thinkeys (dK/dV's thin-key items off: whole key blocks), seqlen16 (dK/dV compiled once for
# every length: no per-class specialisation, scalar LSE/Delta loads), posstats (residue order's
# Delta and LSE by token: strided dK/dV loads), pairs (LSE and Delta in two buffers, by token
# in token order: two dK/dV loads, not one of pairs), nocap (dK/dV at D=64 forced to the 32x64
# 3-stage tile without the H100 table's 128-register cap), cap128 (with it: the H100's tile forced
# on another GPU, e.g. an H200, whose table has no cap), cap128s2 (the capped tile, 2 stages),
# pairsall (LSE and Delta as pairs at every head dim, not only from a padded head dim of 128),
# nopeel (the forward's thin-column steps all in its pipelined loop: codegen.PEEL_THIN_COLUMN off).
# On a fresh machine the first pattern took 3-4 minutes (2026-12-02): the rows' flex_mask_s put
# 175-233 s of it in create_block_mask's compile (ptxas on Inductor's kernel that sorts each
# row's blocks, once per mask shape: BigBird's per-head mask is a shape of its own; 2026-12-07).
# The bench now builds the same block mask without a compile (bench_attention.flex_block_mask);
# FLEX_MASK=compile goes back to create_block_mask's compile.
# SKIP_FLEX=1 leaves the Flex columns out for A/B-only calls.
# SAVE_CACHE=1 packs Inductor's cache (Flex's compiled kernels) into $OUT/inductor.tgz (in 15 MiB
# parts, inductor.tgz.part-NN, where larger: 23 MiB after four 16K rows, 2026-12-07): copied to
# .devcache/ (old copies removed) and carried (carry [".whl", ".devcache"]), it spares the next
# call Flex's own compile (5-10 s a pattern), which without the block mask's compile is small.
# JSON (rewritten after each row: a timeout keeps the finished rows), logs and the Markdown
# table land under $OUT. Pattern names: longformer, bigbird, causal_window, dilated.
set -u
source bench/device_setup.sh
export PATTERNCC_AUTOTUNE=${PATTERNCC_AUTOTUNE-0}
TS=${TS:-16384} DS=${DS:-64,128} ABLATE=${ABLATE-residue,tokens,thin,split} timeout ${BENCH_TIMEOUT:-420} \
  python3 bench/bench_attention.py > "$OUT/bench.log" 2> "$OUT/bench.err"; echo "bench exit $?"
tail -40 "$OUT/bench.log"
[ "${SAVE_CACHE:-0}" = 1 ] && save_inductor_cache
[ "${EXTRAS:-1}" = 0 ] && exit 0
timeout ${OVERHEAD_TIMEOUT:-90} python3 bench/overheads.py > "$OUT/overheads.jsonl" 2> "$OUT/overheads.err"; echo "overheads exit $?"
cat "$OUT/overheads.jsonl"
timeout ${LIMITS_TIMEOUT:-60} python3 -m pytest tests/gpu/test_limits_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -3
