"""A few attention calls per pattern for Nsight Compute to profile (no timing here).

    ncu --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis python bench/ncu_calls.py

Env: PATTERNS (comma list of bench_attention names), T, D; FLEX=1 runs FlexAttention on the
same pattern instead (its kernels: regex:triton_tem); BWD=1 runs forward+backward (the
backward kernels: regex:_attn_bwd_d for patterncc's dQ and dK/dV, Flex's backward is its
second triton_tem launch). Three calls per pattern: skip the first two (compile, warm-up)
and profile the third. bench/ncu_compare.sh is the routine that uses it.
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


def attention(name: str, T: int):
    """The call to profile: patterncc's op, or FlexAttention's (FLEX=1)."""
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
    backward = os.environ.get("BWD") == "1"
    for name in os.environ.get("PATTERNS", "causal_window,bigbird").split(","):
        fn = attention(name, T)
        q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
        do = torch.randn_like(q)
        for _ in range(3):
            if backward:
                fn(q, k, v).backward(do)
            else:
                with torch.no_grad():
                    fn(q, k, v)
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
