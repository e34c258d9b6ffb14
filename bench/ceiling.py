"""What limits the kernels, measured: the per-pair rate on FULL blocks, and the causal
window with flat or tall rows under each launch configuration.

1. ``dense`` through patterncc (every block FULL, no masking, no splits) against dense
   SDPA at the same shape, flash and cuDNN backends: the ceiling of our inner loop, as
   eff (their time / ours) and TFLOP/s. A pattern's eff cannot pass this by much.
2. ``window(1023) & causal`` forward, each kernel timed alone at T=65536 under every
   forward candidate, with tall rows (``lowering.TALL_ONLY_GATHERED = False``: the band
   stacks) and with flat 64-query rows (the default since this probe's 2026-12-01 run):
   which shape and row height the pattern wants.
3. ``dense`` and the causal window over 128-token layout blocks, forward, with 128-wide
   key tiles: what the 64-token layout block costs.

    TS=16384 DS=64,128 PROBES=ceiling,rows,big python bench/ceiling.py   (JSON lines on stdout)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patterncc  # noqa: E402
from patterncc import lowering  # noqa: E402
from patterncc.backends import triton_backend as tb, tuning  # noqa: E402


def timed(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def full_block_ceiling(T: int, D: int, H: int = 16) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    op = patterncc.compile("dense")
    flops = 4 * H * T * T * D
    row = {"probe": "dense through patterncc", "T": T, "D": D}

    def fwd_bwd(fn):
        def run():
            fn(q, k, v).backward(do)
        return do_bench(run, warmup=5, rep=60, grad_to_none=[q, k, v], return_mode="median")
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(backend):
            row[f"{label}_fwd_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            row[f"{label}_fwdbwd_ms"] = fwd_bwd(F.scaled_dot_product_attention)
    row["pcc_fwd_ms"], row["pcc_fwdbwd_ms"] = timed(lambda: op(q, k, v)), fwd_bwd(op)
    for label in ("flash", "cudnn"):  # eff of an all-FULL layout: the ceiling of every pattern's eff
        row[f"ceiling_eff_fwd_vs_{label}"] = row[f"{label}_fwd_ms"] / row["pcc_fwd_ms"]
        row[f"ceiling_eff_fwdbwd_vs_{label}"] = row[f"{label}_fwdbwd_ms"] / row["pcc_fwdbwd_ms"]
    row["pcc_fwd_tflops"] = flops / row["pcc_fwd_ms"] / 1e9
    row["pcc_fwdbwd_tflops"] = 3.5 * flops / row["pcc_fwdbwd_ms"] / 1e9  # backward counted as 2.5x forward
    return row


def causal_window_rows(D: int, T: int = 65536, H: int = 16) -> list[dict]:
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = patterncc.compile("window(1023) & causal").layout(T, H)
    rows = []
    saved = lowering.STACK_WASTE, lowering.TALL_ONLY_GATHERED
    try:
        for label, waste, gathered_only in (("tall", saved[0], False), ("flat", -1.0, True)):
            lowering.STACK_WASTE, lowering.TALL_ONLY_GATHERED = waste, gathered_only
            for cfg in tuning.CANDIDATES["fwd"]:
                try:
                    tb.forward(q, k, v, layout, D ** -0.5, configs={"fwd": cfg})
                    ms = timed(lambda: tb.forward(q, k, v, layout, D ** -0.5, configs={"fwd": cfg}))
                except Exception as e:  # registers / shared memory
                    ms = float("nan")
                    print(f"# {label} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                rows.append({"probe": "causal_window fwd", "T": T, "D": D, "rows": label, "config": vars(cfg), "ms": ms})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        lowering.STACK_WASTE, lowering.TALL_ONLY_GATHERED = saved
    return rows


BIG_TILES = [tuning.KernelConfig(128, 128, 8, 3), tuning.KernelConfig(128, 128, 8, 3, True),
             tuning.KernelConfig(128, 64, 4, 3), tuning.KernelConfig(128, 128, 4, 2)]


def big_block_rows(D: int, T: int = 65536, H: int = 16) -> None:
    """The same kernels over 128-token layout blocks (``block_size=128``), forward alone:
    what 128-wide key tiles would buy."""
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for source in ("dense", "window(1023) & causal"):
        for bs in (64, 128):
            layout = patterncc.compile(source, block_size=bs).layout(T if source != "dense" else 16384, H)
            qq, kk, vv = (x[:, :, :layout.seq_len] for x in (q, k, v))
            for cfg in BIG_TILES:
                try:
                    tb.forward(qq, kk, vv, layout, D ** -0.5, configs={"fwd": cfg})
                    ms = timed(lambda: tb.forward(qq, kk, vv, layout, D ** -0.5, configs={"fwd": cfg}))
                except Exception as e:
                    ms = float("nan")
                    print(f"# {source} {bs} {cfg}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                print(json.dumps({"probe": "layout block", "pattern": source, "block_size": bs, "T": layout.seq_len,
                                  "D": D, "config": vars(cfg), "ms": ms}), flush=True)


def main() -> None:
    os.environ["PATTERNCC_AUTOTUNE"] = "0"
    Ds = [int(x) for x in os.environ.get("DS", "64,128").split(",")]
    T = int(os.environ.get("TS", "16384"))
    probes = os.environ.get("PROBES", "ceiling,rows,big").split(",")
    for D in Ds:
        if "ceiling" in probes:
            print(json.dumps(full_block_ceiling(T, D)), flush=True)
    for D in Ds:
        if "rows" in probes:
            causal_window_rows(D)
        if "big" in probes:
            big_block_rows(D)


if __name__ == "__main__":
    main()
