#!/usr/bin/env bash
# One device call: Nsight Compute metrics of patterncc's and FlexAttention's forward on the same
# patterns (64K, D=64), and a per-instruction stall profile of patterncc's causal-window forward.
set -u
source bench/device_setup.sh >/dev/null
NCU=/usr/local/cuda/bin/ncu
M=sm__inst_executed.sum,sm__cycles_elapsed.avg,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_uniform.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,lts__t_sector_hit_rate.pct
for p in causal_window bigbird; do
  FLEX=1 PATTERNS=$p timeout 150 $NCU --clock-control none --kernel-name regex:triton_tem --launch-skip 2 --launch-count 1 --metrics $M python3 bench/ncu_fwd.py > $OUT/ncu_flex_$p.txt 2>&1; echo "flex $p $?"
  PATTERNS=$p timeout 60 $NCU --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --metrics $M python3 bench/ncu_fwd.py > $OUT/ncu_pcc_$p.txt 2>&1; echo "pcc $p $?"
done
PATTERNS=causal_window timeout 90 $NCU --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --section SourceCounters --section WarpStateStats --page source --print-source sass --csv python3 bench/ncu_fwd.py > $OUT/ncu_src_causal.csv 2>&1; echo "src $?"
for f in $OUT/ncu_flex_*.txt $OUT/ncu_pcc_*.txt; do echo "== $f"; grep -E "^\s+(sm|smsp|launch|gpu|lts)__" $f | awk '{print $1, $NF}'; done
