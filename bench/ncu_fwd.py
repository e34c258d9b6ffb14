"""A few forward calls per pattern for Nsight Compute to profile (no timing here).

    ncu --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis python bench/ncu_fwd.py
Env: PATTERNS (comma list of bench_attention names), T, D. Three launches per pattern:
skip two (compile, warm-up) per pattern and profile the third.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402


def main() -> None:
    T, D = int(os.environ.get("T", 65536)), int(os.environ.get("D", 64))
    for name in os.environ.get("PATTERNS", "causal_window,bigbird").split(","):
        op = patterncc.compile(PATTERNS[name], backend="triton")
        q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.no_grad():
            for _ in range(3):
                op(q, k, v)
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
