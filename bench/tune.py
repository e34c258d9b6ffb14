"""Sweep the Triton kernels' launch configurations on a GPU and report the best per kernel.

For each head dim and kernel ("fwd", "dkdv", "dq"), every candidate KernelConfig is timed
on the reference patterns (the other kernels keep the default), B=1, H=16, bf16; the
score is the geometric mean over patterns of the time relative to the default. Prints a
table and the CONFIGS entries to paste into patterncc/backends/triton_backend.py, and
writes $OUT/tune.json.

    TS=16384 DS=64,128 python bench/tune.py
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patterncc  # noqa: E402
from patterncc.backends import triton_backend as tb  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402

K = tb.KernelConfig
CANDIDATES = {
    "fwd": [K(64, 64, 4, 2), K(64, 64, 4, 3), K(64, 64, 8, 3), K(64, 32, 4, 3), K(64, 64, 4, 4), K(32, 64, 4, 3)],
    "dkdv": [K(64, 64, 4, 2), K(32, 64, 4, 2), K(32, 64, 4, 3), K(64, 64, 8, 2), K(16, 64, 4, 3)],
    "dq": [K(64, 64, 4, 2), K(64, 32, 4, 2), K(64, 32, 4, 3), K(64, 64, 8, 2), K(64, 16, 4, 3)],
}


def main():
    dev = "cuda"
    T = int(os.environ.get("TS", "16384"))
    Ds = [int(x) for x in os.environ.get("DS", "64,128").split(",")]
    names = os.environ.get("PATTERNS", "longformer,causal_window,bigbird").split(",")
    results = []
    for D in Ds:
        width = 64 if D <= 64 else 128
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for kind, cands in CANDIDATES.items():
            scores = []
            for cfg in cands:
                tb.CONFIGS.clear()
                tb.CONFIGS[(kind, width)] = cfg
                times = []
                for name in names:
                    op = patterncc.compile(PATTERNS[name], backend="triton")
                    if kind == "fwd":
                        fn, g = (lambda: op(q, k, v)), None
                    else:
                        def fn():
                            op(q, k, v).backward(do)
                        g = [q, k, v]
                    try:
                        fn()
                        times.append(do_bench(fn, warmup=10, rep=60, return_mode="median", grad_to_none=g))
                    except Exception as e:  # a config that does not compile (registers, shared memory)
                        print(f"{kind} D={D} {cfg} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        times.append(float("inf"))
                scores.append(times)
                print(json.dumps({"D": D, "kind": kind, "config": cfg.__dict__, "patterns": names, "ms": times}), flush=True)
            base = scores[0]
            rel = [math.exp(sum(math.log(t / b) for t, b in zip(ts, base)) / len(base)) for ts in scores]
            best = min(range(len(cands)), key=lambda i: rel[i])
            results.append({"D": D, "kind": kind, "best": cands[best].__dict__, "relative": rel,
                            "candidates": [c.__dict__ for c in cands], "ms": scores, "patterns": names})
            print(f"== D={D} {kind}: best {cands[best]} at {rel[best]:.3f}x the default", flush=True)
    tb.CONFIGS.clear()
    out = Path(os.environ.get("OUT", "."))
    (out / "tune.json").write_text(json.dumps({"T": T, "device": torch.cuda.get_device_name(), "results": results}, indent=1))
    print("\nCONFIGS = {")
    for r in results:
        b = r["best"]
        print(f"    ({r['kind']!r}, {64 if r['D'] <= 64 else 128}): KernelConfig({b['block_m']}, {b['block_n']}, "
              f"{b['num_warps']}, {b['num_stages']}),  # {min(r['relative']):.3f}x")
    print("}")


if __name__ == "__main__":
    main()
