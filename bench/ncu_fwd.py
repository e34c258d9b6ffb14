"""A few forward calls per pattern for Nsight Compute to profile (no timing here).

    ncu --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis python bench/ncu_fwd.py
Env: PATTERNS (comma list of bench_attention names), T, D; FLEX=1 runs FlexAttention's
forward on the same pattern instead (its kernel: regex:triton_tem). Three launches per
pattern: skip two (compile, warm-up) and profile the third.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from bench_attention import PATTERNS, flex_mask_mod  # noqa: E402


def forward(name: str, T: int):
    """The forward call to profile: patterncc's op, or FlexAttention's (FLEX=1)."""
    op = patterncc.compile(PATTERNS[name], backend="triton")
    if os.environ.get("FLEX") != "1":
        return op
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    heads = 16 if name == "bigbird" else None
    mask = create_block_mask(flex_mask_mod(name, op, T, 16, "cuda"), None, heads, T, T, device="cuda",
                             _compile=True)  # as bench_attention.py builds it
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=mask)


def main() -> None:
    T, D = int(os.environ.get("T", 65536)), int(os.environ.get("D", 64))
    for name in os.environ.get("PATTERNS", "causal_window,bigbird").split(","):
        op = forward(name, T)
        q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.no_grad():
            for _ in range(3):
                op(q, k, v)
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
