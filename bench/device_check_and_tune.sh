#!/usr/bin/env bash
# One device call: set up (lark as a carried wheel), GPU correctness subset, then the
# launch-configuration sweep. Run from the repository root on the GPU machine:
#   bash bench/device_check_and_tune.sh        (writes logs and tune.json under $OUT)
#   TUNE=0 bash bench/device_check_and_tune.sh (tests only)   TESTS=0 ... (sweep only)
# Both together need about 9 of a call's 10 minutes on a fresh H200 (compiles included).
set -u
source bench/device_setup.sh
if [ "${TESTS:-1}" != 0 ]; then
  # Tests run the default and the forced candidate configurations, not the autotuner.
  PATTERNCC_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-270} python3 -m pytest tests/gpu/test_gpu_kernels.py -q -x -p no:cacheprovider \
    -k "${TEST_FILTER:-bfloat16 or long or graph or reproducible or candidate or streams or scale or strided or thin or direct or split}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
fi
if [ "${TUNE:-1}" != 0 ]; then
  timeout ${TUNE_TIMEOUT:-290} python3 bench/tune.py 2>&1 | tee "$OUT/tune.log" | grep -E "==|Error|error" | head -40
fi
