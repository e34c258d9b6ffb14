#!/usr/bin/env bash
# One device call: Nsight Compute metrics of patterncc's and FlexAttention's kernels on the same
# patterns (64K, D=64 unless T / D are set), forward and backward, and a per-instruction stall
# profile of patterncc's causal-window forward. Logs under $OUT; summary lines at the end.
#   bash bench/ncu_compare.sh            PATTERNS=bigbird D=128 bash bench/ncu_compare.sh
set -u
source bench/device_setup.sh >/dev/null
NCU=${NCU:-/usr/local/cuda/bin/ncu}
M=sm__inst_executed.sum,sm__cycles_elapsed.avg,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_uniform.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,lts__t_sector_hit_rate.pct
prof() {  # prof LABEL KERNEL_REGEX SKIP COUNT ENV...
  local label=$1 regex=$2 skip=$3 count=$4; shift 4
  env "$@" timeout ${NCU_TIMEOUT:-150} $NCU --clock-control none --kernel-name regex:$regex --launch-skip $skip \
    --launch-count $count --metrics $M python3 bench/ncu_calls.py > $OUT/ncu_$label.txt 2>&1; echo "$label $?"
}
for p in ${PATTERNS:-causal_window bigbird}; do
  prof flex_$p triton_tem 2 1 FLEX=1 PATTERNS=$p
  prof pcc_$p _attn_fwd 2 1 PATTERNS=$p
  [ "${BWD:-1}" = 0 ] && continue
  prof flex_bwd_$p triton_tem 4 2 FLEX=1 BWD=1 PATTERNS=$p    # the third call's forward and backward
  prof pcc_bwd_$p _attn_bwd_d 4 2 BWD=1 PATTERNS=$p            # the third call's dQ and dK/dV
done
if [ "${SOURCE:-1}" != 0 ]; then
  PATTERNS=causal_window timeout 90 $NCU --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 \
    --launch-count 1 --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
    python3 bench/ncu_calls.py > $OUT/ncu_src_causal.csv 2>&1; echo "src $?"
fi
for f in $OUT/ncu_*.txt; do
  echo "== $f"; grep -E "^\s+(sm|smsp|launch|gpu|lts)__|^\s+_attn|triton_tem|^  [a-z_]+.*\(" $f | tr -s ' ' | cut -c1-160
done
