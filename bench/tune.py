"""Sweep the Triton kernels' launch configurations on a GPU: the table behind tuning.TUNED.

Each kernel is timed alone (forward; dK/dV alone; dQ alone, from a saved forward) for
every candidate of its row class (``tuning.candidates``: patterns whose layout takes tall
rows try all, the others the flat ones), on the reference patterns, B=1, H=16, bf16, at a
GPU-bound length (T=65536 by default: at 16K the host-bound spread hides differences;
see bench/RESULTS.md). Candidates are interleaved per pattern (all candidates of one
pattern back to back) so drift hits them alike. The score is the geometric mean over
patterns of the time relative to the first candidate (the old 64x64/4/2 default). Prints
the best per (kernel, head dim, row class), records it in the tuning cache (so later runs
on this machine use it) and writes $OUT/tune.json with the entries for ``tuning.TUNED``.

    TS=65536 DS=64,128 python bench/tune.py
    STACK_BANDS=1 DS=64 KINDS=fwd,dq python bench/tune.py   # the causal window in the tall class too

SHORTLIST=1 sweeps only SHORTLIST's candidates (the winners and runners-up of the H200's sweeps:
a GPU of the same die that needs a table of its own at a fraction of the compiles).
COMPILE_ONLY=1 launches each candidate once and times nothing: several such processes side by
side (one per D and kernel) fill Triton's cache, so the timed sweep that follows finds every
kernel compiled (bench/device_tune.sh).

STACK_BANDS=1 turns lowering.TALL_ONLY_GATHERED off for the sweep, so contiguous bands that
stack well (the causal window) are swept with the tall candidates (the capped 8-warp ones
among them); it measures, and records nothing in the tuning cache.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
from patterncc import codegen, lowering  # noqa: E402
from patterncc.backends import triton_backend as tb, tuning  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402


K = tuning.KernelConfig
# The first of each list is the baseline the scores are relative to (CANDIDATES' first).
SHORTLIST = {
    "fwd": [K(64, 64, 4, 2), K(64, 64, 4, 2, True, 128), K(64, 64, 4, 3, True), K(64, 64, 4, 3),
            K(128, 64, 4, 3)],
    "dq": [K(64, 64, 4, 2), K(64, 64, 4, 2, True, 128), K(64, 64, 4, 2, True), K(64, 64, 4, 3, True),
           K(64, 32, 4, 3)],
    "dkdv": [K(64, 64, 4, 2), K(32, 64, 4, 3), K(64, 64, 4, 3, True), K(64, 64, 4, 2, True), K(32, 128, 4, 3)],
}


def sweep_candidates(kind: str, tall: bool) -> list:
    """What the sweep tries for a class: tuning.candidates, or its SHORTLIST part."""
    cands = tuning.candidates(kind, tall)
    if os.environ.get("SHORTLIST") == "1":
        cands = [c for c in SHORTLIST[kind] if c in cands]
    return cands


def kernel_runner(kind, q, k, v, do, layout, scale, out, lse):
    if kind == "fwd":
        return lambda cfg: tb.forward(q, k, v, layout, scale, configs={"fwd": cfg})
    if kind == "dkdv":
        return lambda cfg: tb.backward(do, q, k, v, out, lse, layout, scale, need_q=False, configs={"dkdv": cfg})
    return lambda cfg: tb.backward(do, q, k, v, out, lse, layout, scale, need_kv=False, configs={"dq": cfg})


def main():
    T = int(os.environ.get("TS", "65536"))
    Ds = [int(x) for x in os.environ.get("DS", "64,128").split(",")]
    names = os.environ.get("PATTERNS", ",".join(PATTERNS)).split(",")
    kinds = os.environ.get("KINDS", ",".join(tuning.KINDS)).split(",")
    H = int(os.environ.get("HEADS", "16"))
    os.environ["PATTERNCC_AUTOTUNE"] = "0"
    compile_only = os.environ.get("COMPILE_ONLY") == "1"
    if os.environ.get("STACK_BANDS") == "1":  # tall rows for contiguous bands too (the causal window)
        lowering.TALL_ONLY_GATHERED = False
    dev = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1: a smoke test of this script
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "interpreter"
    results = []
    for D in Ds:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        scale = D ** -0.5
        layouts = {name: patterncc.compile(PATTERNS[name]).layout(T, H) for name in names}
        for kind in kinds:
            by_class: dict[bool, list[str]] = {}
            for name, lay in layouts.items():
                tall = lowering.row_class(lay, codegen.analyse(lay.pattern), 1, kind)
                by_class.setdefault(tall, []).append(name)
            for tall, members in sorted(by_class.items()):
                cands = sweep_candidates(kind, tall)
                ms = {c: [] for c in cands}
                for name in members:  # candidates back to back per pattern: drift hits them alike
                    layout = layouts[name]
                    out, lse = tb.forward(q, k, v, layout, scale)
                    run = kernel_runner(kind, q, k, v, do, layout, scale, out, lse)
                    for cfg in cands:
                        try:
                            run(cfg)
                            if compile_only:  # compiled by that call: nothing to time
                                continue
                            t = do_bench(lambda: run(cfg), warmup=10, rep=50, return_mode="median")
                        except Exception as e:  # registers / shared memory
                            print(f"{kind} D={D} {cfg} {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                            t = float("inf")
                        ms[cfg].append(t)
                        print(json.dumps({"T": T, "D": D, "kind": kind, "tall": tall, "pattern": name,
                                          "config": vars(cfg), "ms": t}), flush=True)
                if compile_only:
                    continue
                base = ms[cands[0]]
                rel = {c: math.exp(sum(math.log(t / b) for t, b in zip(ms[c], base)) / len(base)) for c in cands}
                best = min(cands, key=lambda c: rel[c])
                for dtype in (torch.bfloat16, torch.float16):  # so later runs on this machine use it
                    if os.environ.get("STACK_BANDS") != "1":  # a what-if class is not what the library runs
                        tuning.record(kind, D, dtype, gpu, best, tall)
                results.append({"D": D, "kind": kind, "tall": tall, "patterns": members, "best": vars(best),
                                "candidates": [{"config": vars(c), "ms": ms[c], "relative": rel[c]} for c in cands]})
                print(f"== D={D} {kind} {'tall' if tall else 'flat'} ({', '.join(members)}): best {best} at "
                      f"{rel[best]:.3f}x the first candidate ({', '.join(f'{x:.3f}' for x in ms[best])} ms)", flush=True)
    if compile_only:
        return
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "tune.json").write_text(json.dumps({"T": T, "device": gpu, "results": results}, indent=1))
    print("\nTUNED table entries:")
    for r in results:
        b = r["best"]
        cap = f", maxnreg={b['maxnreg']}" if b.get("maxnreg") else ""
        print(f"    ({r['kind']!r}, {tuning.width_class(r['D'])}, {r['tall']}): K({b['block_m']}, {b['block_n']}, "
              f"{b['num_warps']}, {b['num_stages']}, {b['tma']}{cap}),")


if __name__ == "__main__":
    main()
