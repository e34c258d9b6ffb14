"""Each kernel's rate from recorded results: which pass limits forward+backward.

Reads result files of ``bench/bench_attention.py`` (their ``pcc_fwdbwd_kernels``, the
profiler's per-kernel times of one forward+backward) and prints, per row, each kernel's
matrix-product rate in TFLOP/s on the blocks it walks (``kernel_blocks``, masked parts of
PARTIAL blocks included: the work the kernel does, not the pairs the pattern allows) next to
dense flash attention's forward and backward rates from the same run. No GPU needed.

A kernel's products per walked 64x64 block: forward 2 (QK^T, PV), dQ 3 (QK^T, dO V^T, dS K),
dK/dV 4 (K Q^T, P^T dO, V dO^T, dS^T Q); each is 2 * 64 * 64 * D flops. Dense flash's forward
does 4 * T^2 * D flops per head and its backward 2.5 times that (five products to two).

    python bench/kernel_rates.py bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3-run24-longformer-2fe6da0.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# kernel name: (column, matrix products per walked block)
KERNELS = {"_attn_fwd": ("fwd", 2), "_attn_bwd_dq": ("dq", 3), "_attn_bwd_dkdv": ("dkdv", 4)}


def kernel_tflops(row: dict) -> dict[str, float]:
    """TFLOP/s of each of patterncc's kernels in one result row (walked blocks' products)."""
    block = row.get("block_size", 64)
    per_product = 2 * block * block * row["D"] * row["kernel_blocks"]
    return {KERNELS[name][0]: KERNELS[name][1] * per_product / (ms * 1e-3) / 1e12
            for name, ms in row["pcc_fwdbwd_kernels"].items() if name in KERNELS and ms}


def dense_tflops(row: dict, heads: int, batch: int) -> dict[str, float]:
    """Dense flash attention's forward and backward TFLOP/s in the same run."""
    fwd_flops = 4 * row["T"] ** 2 * row["D"] * heads * batch
    bwd_ms = row["dense_fwdbwd_ms"] - row["dense_fwd_ms"]
    return {"dense_fwd": fwd_flops / (row["dense_fwd_ms"] * 1e-3) / 1e12,
            "dense_bwd": 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12}


def rates(path: str) -> list[dict]:
    """One dict per row of a results file that has per-kernel times."""
    data = json.loads(Path(path).read_text())
    setup, meta = data.get("setup", {}), data.get("meta", {})
    out = []
    for row in data["rows"]:
        if not row.get("pcc_fwdbwd_kernels") or not row.get("kernel_blocks"):
            continue
        row = {"block_size": setup.get("block_size", 64), **row}
        got = {"pattern": row["pattern"], "T": row["T"], "D": row["D"], "device": meta.get("device"),
               **kernel_tflops(row), **dense_tflops(row, setup.get("H", 16), setup.get("B", 1))}
        out.append({k: round(v, 1) if isinstance(v, float) else v for k, v in got.items()})
    return out


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    for path in paths:
        for row in rates(path):
            print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
