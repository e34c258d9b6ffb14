"""Issue-5 overheads and memory on a GPU: first use of a pattern, a new sequence length,
and peak memory against dense flash SDPA, forward and forward+backward.

    python bench/overheads.py          # prints JSON lines; run twice to see a warm Triton cache
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402


def first_use(src: str, T: int) -> dict:
    q, k, v = (torch.randn(1, 16, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    op = patterncc.compile(src, backend="triton")
    op(q, k, v)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    out = {"pattern": src, "first_call_s": round(first, 3)}
    for T2 in (T + 64, T + 4096):  # new lengths: layout + plan, kernels reused
        q2, k2, v2 = (torch.randn(1, 16, T2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        op(q2, k2, v2)
        torch.cuda.synchronize()
        out[f"new_len_{T2}_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    return out


def peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory(T: int, D: int) -> list[dict]:
    q, k, v = (torch.randn(1, 16, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    rows = []
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        dense_f = peak(lambda: F.scaled_dot_product_attention(q, k, v))
        dense_fb = peak(lambda: F.scaled_dot_product_attention(q, k, v).backward(do))
    for name, src in PATTERNS.items():
        op = patterncc.compile(src, backend="triton")
        op(q, k, v).backward(do)  # warm: plan on the device, kernels compiled
        q.grad = k.grad = v.grad = None
        f = peak(lambda: op(q, k, v))
        fb = peak(lambda: op(q, k, v).backward(do))
        q.grad = k.grad = v.grad = None
        rows.append({"T": T, "D": D, "pattern": name, "dense_fwd_bytes": dense_f, "pcc_fwd_bytes": f,
                     "fwd_ratio": round(f / dense_f, 3), "dense_fwdbwd_bytes": dense_fb, "pcc_fwdbwd_bytes": fb,
                     "fwdbwd_ratio": round(fb / dense_fb, 3)})
    return rows


def main():
    for src in PATTERNS.values():
        print(json.dumps(first_use(src, 16384)), flush=True)
    for r in memory(65536, 64):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
