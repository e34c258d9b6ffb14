#!/usr/bin/env bash
# One device call: the launch-configuration sweep (bench/tune.py) with its compiles done first,
# side by side, then timed alone; optionally GPU tests beside the compiles. Run from the
# repository root on the GPU machine:
#   bash bench/device_tune.sh                                  (SHORTLIST=1, T=65536, D=64,128)
#   SHORTLIST=0 DS=64 KINDS=fwd bash bench/device_tune.sh     (every candidate of one kernel)
#   GPU_FILTER=candidate bash bench/device_tune.sh             (and those tests/gpu tests)
# Under $OUT: gpu.txt, tune.log (one JSON line per timing), tune.json, gpu-tests.txt (GPU_FILTER).
set -u
source bench/device_setup.sh
export PATTERNCC_AUTOTUNE=0 SHORTLIST=${SHORTLIST:-1} TS=${TS:-65536}
DS=${DS:-64,128} KINDS=${KINDS:-fwd,dq,dkdv}
logs=$(mktemp -d)
[ -n "${GPU_FILTER:-}" ] && gpu_tests_start "$logs" "$GPU_FILTER"  # beside the compiles
# Compiles: one process per (D, kernel); each launches every candidate once, timing nothing.
for d in ${DS//,/ }; do
  for kind in ${KINDS//,/ }; do
    (COMPILE_ONLY=1 DS=$d KINDS=$kind timeout ${COMPILE_TIMEOUT:-240} python3 bench/tune.py \
       > "$logs/c-$d-$kind.txt" 2>&1; echo "rc $? (compile $d $kind)" >> "$logs/c-$d-$kind.txt") &
  done
done
wait
[ -n "${GPU_FILTER:-}" ] && gpu_tests_report "$logs"
tail -qn 2 "$logs"/c-*.txt
DS=$DS KINDS=$KINDS timeout ${TUNE_TIMEOUT:-240} python3 bench/tune.py > "$OUT/tune.log" 2>&1; echo "tune exit $?"
grep -E "^==|Error|error" "$OUT/tune.log" | head -30; sed -n '/TUNED table/,$p' "$OUT/tune.log"
