"""What the kernels compute, counted on the host: the basis of bench/RESULTS.md's predictions.

For each reference pattern, sequence length and lowering variant, the (query, key) pairs
that the kernels' tiles cover in each pass (forward, dQ, dK/dV), against the pairs the
pattern allows. ``useful / computed`` bounds eff from above if every tile ran at dense
FlashAttention's speed per pair; the share of tiles needing no predicate (FULL) and the
K/V tile loads per pass come along. No GPU needed:

    python bench/work_model.py                # T = 16384, 65536; H = 16; block 64
    TS=65536 python bench/work_model.py

Variants: "old" is the lowering of 2026-11-24 (64-row tiles, token order, whole blocks for
global columns); "rows64" adds residue order and thin columns; "rows128" also stacks two
64-token layout blocks per kernel row (as a 128-row config would); "thinrows" is rows64 with
lowering.THIN_ROWS (global query rows walked with 16-row tiles: forward, dQ, dK/dV); "chosen" is
what the Triton backend picks by default for D=64 bf16 on the tuning table's GPU: the row
class from lowering.row_class (tall where stacking pays), the row height from that class's
forward config (the H200 table's are 64-row tiles for both classes, so every reference
pattern runs 64-row tiles), thin query rows where rows are unstacked.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterncc  # noqa: E402
import torch  # noqa: E402
from patterncc import codegen, lowering  # noqa: E402
from patterncc.backends import tuning  # noqa: E402
from bench_attention import PATTERNS, switched  # noqa: E402

VARIANTS = {"old": (1, False, False, False), "rows64": (1, True, True, False),
            "rows128": (2, True, True, False), "thinrows": (1, True, True, True)}


def count(layout, factor: int, residue: bool, thin: bool, thin_rows: bool) -> dict:
    with switched({"RESIDUE_ORDER": residue, "THIN_COLUMNS": thin, "THIN_ROWS": thin_rows}):
        pred = codegen.analyse(layout.pattern)
        if not lowering.can_stack(pred):
            factor = 1
        klay = lowering.kernel_layout(layout, pred)
        bs = klay.block
        (ptr, kb, fl), (nptr, nsub, nfl) = lowering.narrow_entries(klay, *lowering.stacked_rows(klay, factor),
                                                                     stacked=factor > 1)
        rows = factor * bs
        n_thin = 0  # forward entries walked with 16-row tiles (THIN_ROWS, unstacked rows only)
        if thin_rows and factor == 1:
            ptr, kb, fl, segments = lowering.thin_rows(klay, ptr, kb, fl)
            if segments is not None:
                _, start, end, sub = segments
                n_thin = int((end - start)[sub >= 0].sum())
        fwd = (kb.size - n_thin) * rows * bs + n_thin * lowering.NARROW * bs + nsub.size * rows * lowering.NARROW
        kv = lowering.kv_rows(klay, 1, factor)
        kv_ptr, kv_thin = kv[0], None
        if thin_rows and factor == 1:
            kv_ptr, *_, kv_thin = lowering.thin_query_entries(klay, *kv)
        n_kv_thin = 0 if kv_thin is None else int(kv_thin[-1] - kv_thin[0])
        dkdv = int(kv_ptr[-1]) * rows * bs + n_kv_thin * lowering.NARROW * bs
        full = float(((fl & 1) != 0).mean()) if fl.size else 0.0
        dq = fwd  # dQ walks the same items
        return {"fwd_pairs": fwd, "dq_pairs": dq, "dkdv_pairs": dkdv, "full_tiles": round(full, 3),
                "kv_tile_loads_fwd": int(kb.size + nsub.size), "rows": rows}


def chosen_factor(layout, head_dim: int = 64) -> int:
    """Layout blocks per forward kernel row as the Triton backend would pick them (bf16, the
    tuning table's first GPU): the row class, then that class's configured tile height."""
    pred = codegen.analyse(layout.pattern)
    tall = lowering.row_class(layout, pred, 1, "fwd")
    gpu = next(iter(tuning.TUNED))
    cfg = tuning.config_for("fwd", lowering.head_pad(head_dim), torch.bfloat16, gpu, tall)
    return lowering.row_height(layout, pred, tall, tuning.owned_rows("fwd", cfg)) // layout.block_size


def main():
    ts = [int(x) for x in os.environ.get("TS", "16384,65536").split(",")]
    h = 16
    out = []
    print("| T | pattern | useful pairs | variant | fwd computed | bound fwd | bound f+b | FULL tiles | K/V tile loads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in ts:
        for name, src in PATTERNS.items():
            lay = patterncc.compile(src).layout(t, h)
            useful = float(lay.pairs_per_head().sum())
            factor = chosen_factor(lay)
            for variant, args in {**VARIANTS, "chosen": (factor, True, True, True)}.items():
                c = count(lay, *args)
                # forward: 1 unit per pair; backward ~2.5 units (dQ and dK/dV recompute the scores)
                bound_fwd = useful / c["fwd_pairs"]
                bound_fb = 3.5 * useful / (c["fwd_pairs"] + 1.25 * c["dq_pairs"] + 1.25 * c["dkdv_pairs"])
                row = {"T": t, "pattern": name, "variant": variant, "useful_pairs": useful,
                       "bound_fwd": round(bound_fwd, 3), "bound_fwdbwd": round(bound_fb, 3), **c}
                out.append(row)
                print(f"| {t} | {name} | {useful:.3g} | {variant} | {c['fwd_pairs']:.3g} | {bound_fwd:.2f} | "
                      f"{bound_fb:.2f} | {c['full_tiles']:.0%} | {c['kv_tile_loads_fwd']} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "work_model.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
