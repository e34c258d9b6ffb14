"""Interleaved A/B of one bench switch on one pattern: default and variant timed in
alternating rounds (forward+backward, do_bench median, the profiler's kernel sum and its
kernels by name; the forward alone from CUDA-graph replay, the results table's metric), so
an order effect of bench_attention.py's ablation rows (the variant is always timed after
the default) shows as a difference between rounds rather than between variants. Each
round also records the allocator's device allocations and frees during its timing: a
cudaFree synchronises the host, which leaves gaps in do_bench's time but not in the
kernel sum. Before round 0 the default runs untimed for $HEAT_S seconds (default 5): without
it the first timed slot of an A/B ran at higher clocks than the rest (thirtieth session, six
A/Bs on the H100: 1923-1962 MHz against 1830-1920) and, in four of the six, its
forward+backward 0.6-1.1% faster than the default's later slots: a bias towards the default,
which holds that slot. Five seconds did not remove it (thirty-first session: that slot at
1855-1949 MHz against 1708-1871 after the heat-up), but the forward in graph replay, timed last
in each slot, showed no such bias there (an A/A moved it -0.2% to +0.8% a round): read a
forward change from ``graph by round`` (bench/ab_summary.py). Run on the GPU machine from the
repository root:
  TS=65536 DS=128 PATTERN=causal_window ABLATE=delta ROUNDS=3 python3 bench/ab_interleaved.py
Prints one JSON line per round and variant; bench/ab_summary.py makes a table of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import (ABLATIONS, PATTERNS, bench, bench_graph, checked_names, kernel_ms, settle,  # noqa: E402
                             switched, tuned_as)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patterncc  # noqa: E402


def allocator_counts() -> tuple[int, int]:
    stats = torch.cuda.memory_stats()
    return stats.get("num_device_alloc", 0), stats.get("num_device_free", 0)


def clock_summary(samples: str) -> dict:
    """Mean SM clock (MHz) and power draw (W) of nvidia-smi's CSV samples ("1980, 412.5" a
    line); lines it could not read (a "[N/A]") are left out; {} without any."""
    read = []
    for line in samples.splitlines():
        try:
            mhz, watts = (float(x) for x in line.split(","))
        except ValueError:
            continue
        read.append((mhz, watts))
    if not read:
        return {}
    return {"sm_clock_mhz": round(statistics.fmean(m for m, _ in read), 1),
            "power_w": round(statistics.fmean(w for _, w in read), 1)}


@contextlib.contextmanager
def gpu_clocks(period_s: float = 0.2):
    """The SM clock and power draw while the block runs, read by nvidia-smi from a thread about
    every ``period_s`` (one nvidia-smi run a reading, so each reading is whole when read: a
    looping nvidia-smi stopped mid-run may not have written what it buffered): the dict it
    yields gets clock_summary's keys on exit ({} without nvidia-smi). A variant that draws
    more power can lower the clocks of the whole step; this shows it. (The GPU index as CUDA
    counts it: nvidia-smi's on one-GPU hosts.)"""
    found: dict = {}
    cmd = ["nvidia-smi", f"--id={torch.cuda.current_device()}", "--query-gpu=clocks.sm,power.draw",
           "--format=csv,noheader,nounits"]
    readings: list[str] = []
    stop = threading.Event()

    def sample():
        while True:
            try:
                readings.append(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout)
            except (OSError, subprocess.SubprocessError):
                return
            if stop.wait(period_s):
                return
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield found
    finally:
        stop.set()
        sampler.join(timeout=15)
        found.update(clock_summary("".join(readings)))


def timed_round(step, grads: list, forward) -> dict:
    a0, f0 = allocator_counts()
    ms = bench(step, grads)
    a1, f1 = allocator_counts()
    per_kernel: dict = {}
    return {"fwdbwd_ms": ms, "kernel_ms": kernel_ms(step, grads, by_name=per_kernel),
            "kernels": {n: round(t, 4) for n, t in per_kernel.items()},
            "device_allocs": a1 - a0, "device_frees": f1 - f0, "fwd_graph_ms": bench_graph(forward, "forward")}


def chosen() -> tuple[str, str]:
    """The pattern and the A/B switch from $PATTERN and $ABLATE, checked before any GPU work."""
    name, what = os.environ.get("PATTERN", "causal_window"), os.environ.get("ABLATE", "delta")
    checked_names([name], PATTERNS, "PATTERN")
    checked_names([what], ABLATIONS, "ABLATE")
    return name, what


def heat_seconds() -> float:
    """$HEAT_S: seconds of untimed default steps right before round 0 (default 5), checked
    before any GPU work."""
    text = os.environ.get("HEAT_S", "5")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # (NaN too)
        raise SystemExit(f"HEAT_S={text!r}: give a number of seconds >= 0")
    return seconds


def main() -> None:
    name, what = chosen()
    heat = heat_seconds()
    tuned_as()
    T, D = int(os.environ.get("TS", "65536")), int(os.environ.get("DS", "128"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    B, H = 1, 16
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                   for i in range(4))
    op = patterncc.compile(PATTERNS[name], block_size=64, backend="triton")

    def step():
        op(q, k, v).backward(do)
    for variant in ("default", what):
        with switched(ABLATIONS[what] if variant != "default" else {}):
            settle(step, [q, k, v])
    settle(step, [q, k, v], heat)  # the GPU at its working clocks before the first timed slot
    for r in range(rounds):
        for variant in ("default", what) if r % 2 == 0 else (what, "default"):
            with switched(ABLATIONS[what] if variant != "default" else {}):
                row = {"T": T, "D": D, "pattern": name, "ablate": what, "round": r, "variant": variant,
                       "device": torch.cuda.get_device_name(), "tuned_as": os.environ.get("TUNED_AS")}
                with gpu_clocks() as clocks:
                    timing = timed_round(step, [q, k, v], lambda: op(q, k, v))
                print(json.dumps(row | timing | clocks), flush=True)


if __name__ == "__main__":
    main()
