"""Where the time of one forward+backward goes: CUDA kernels vs host overhead.

    PATTERN=longformer T=16384 D=64 python bench/profile_op.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from patterncc.backends import triton_backend as tb  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402


class Direct(torch.autograd.Function):
    """The kernels without the custom-op layer, to measure what that layer costs."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        out, lse = tb.forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = tb.backward(do, q, k, v, out, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def main():
    T, D = int(os.environ.get("T", 16384)), int(os.environ.get("D", 64))
    for name in os.environ.get("PATTERNS", "longformer,causal_window").split(","):
        op = patterncc.compile(PATTERNS[name], backend="triton")
        q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        lay = op.layout(T, 16)
        scale = D ** -0.5
        def via_op():
            op(q, k, v).backward(do)
        def direct():
            Direct.apply(q, k, v, lay, scale).backward(do)
        for label, fn in (("op", via_op), ("direct", direct)):
            fn(); torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=[q, k, v])
            print(f"{name} T={T} D={D} {label}: f+b {ms:.3f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                via_op()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
