"""A/B two launch configurations in one run, interleaved, to separate a change from noise.

    T=16384 D=64 python bench/ab_configs.py
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from patterncc.backends import triton_backend as tb  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402

K = tb.KernelConfig
VARIANTS = {
    "default": {},
    "tuned": {("dkdv", 64): K(16, 64, 4, 3), ("dq", 64): K(64, 16, 4, 3)},
    "dkdv-only": {("dkdv", 64): K(16, 64, 4, 3)},
    "w8-dkdv": {("dkdv", 64): K(64, 64, 8, 2)},
}


def main():
    T, D = int(os.environ.get("T", 16384)), int(os.environ.get("D", 64))
    q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    for name in os.environ.get("PATTERNS", "longformer,causal_window,bigbird").split(","):
        op = patterncc.compile(PATTERNS[name], backend="triton")
        times = {v: [] for v in VARIANTS}
        for _ in range(3):
            for label, cfg in VARIANTS.items():
                tb.CONFIGS.clear(); tb.CONFIGS.update(cfg)
                def fb():
                    op(q, k, v).backward(do)
                fb()
                times[label].append(do_bench(fb, warmup=25, rep=100, return_mode="median", grad_to_none=[q, k, v]))
        print(name, {l: f"{statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f})" for l, t in times.items()}, flush=True)


if __name__ == "__main__":
    main()
