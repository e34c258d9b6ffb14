"""Compile report: what a program costs at one sequence length, as text, JSON and pictures.

Example:
    >>> from patterncc import parse_program
    >>> from patterncc.report import compile_report
    >>> rep = compile_report(parse_program("window(16) | global([0])"), seq_len=256, num_heads=2, block_size=16)
    >>> rep["groups"][0]["touched_blocks"]
    148
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import ir
from .layout import Layout, get_layout


def layer_groups(program: ir.Program) -> list[tuple[str, ir.Pattern]]:
    """(label, pattern) for every layer section of a program.

    >>> from patterncc import parse_program
    >>> [label for label, _ in layer_groups(parse_program("layers 0..2: causal\\nlayers 2..3: dense"))]
    ['layers 0..2', 'layers 2..3']
    """
    if program.single:
        return [("all layers", program.sections[0].pattern)]
    return [(f"layers {s.start}..{s.stop}", s.pattern) for s in program.sections]


def layout_summary(lay: Layout, head_dim: int) -> dict:
    """Density, touched blocks, FLOPs and K/V bytes of one layout, overall and per head group."""
    pairs = lay.pairs_per_head()
    t2 = float(lay.seq_len) ** 2
    counts = lay.row_counts()
    fwd = lay.flops(head_dim)
    bwd = lay.flops(head_dim, backward=True)
    groups = []
    for heads in display_groups(lay):
        rows = [np.arange(h * lay.nblocks, (h + 1) * lay.nblocks) for h in heads]
        full = np.concatenate([lay.full[lay.indptr[r[0]]:lay.indptr[r[-1] + 1]] for r in rows])
        touched = int(counts[heads].sum())
        groups.append({
            "heads": heads, "pattern": _shape(lay.heads[heads[0]]),
            "density": float(pairs[heads].mean()) / t2,
            "touched_blocks": touched,
            "block_density": touched / (len(heads) * lay.nblocks ** 2),
            "full_fraction": float(full.mean()) if full.size else 0.0,
            "max_blocks_per_row": int(counts[heads].max()),
        })
    return {
        "density": lay.density,
        "block_density": lay.block_density,
        "touched_blocks": lay.nnz,
        "full_fraction": lay.full_fraction,
        "empty_rows": int((counts == 0).sum()),
        "blocks_per_row": {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())},
        "flops_fwd": fwd, "flops_fwdbwd": {k: fwd[k] + bwd[k] for k in fwd},
        "kv_bytes": lay.kv_bytes(head_dim),
        "head_groups": groups,
        "kernel": kernel_summary(lay),
    }


def kernel_summary(lay: Layout) -> dict:
    """The blocks the kernels walk: in token order, or in residue order on dilated heads
    (see :mod:`patterncc.lowering`), where a dilated window's blocks become FULL.

    >>> from patterncc import parse
    >>> k = kernel_summary(get_layout(parse("window(256) | dilate(2)"), 4096, 1, 64))
    >>> k["residue_heads"], k["full_fraction"] > 0.5, k["touched_blocks"] < k["token_order_blocks"]
    ([0], True, True)
    """
    from . import codegen, lowering

    klay = lowering.kernel_layout(lay, codegen.analyse(lay.pattern))
    moved = [h for h in range(lay.num_heads) if klay.dil[h] > 1]
    return {
        "residue_heads": moved,
        "residue_factors": sorted({int(klay.dil[h]) for h in moved}),
        "touched_blocks": klay.nnz,
        "block_density": klay.block_density,
        "full_fraction": klay.full_fraction,
        "token_order_blocks": lay.nnz,
        "token_order_block_density": lay.block_density,
        "token_order_full_fraction": lay.full_fraction,
    }


def compile_report(program: ir.Program, seq_len: int, num_heads: int, block_size: int,
                   head_dim: int = 64) -> dict:
    """JSON-able report of every layer group of ``program`` at ``seq_len``."""
    groups = []
    for label, pattern in layer_groups(program):
        lay = get_layout(pattern, seq_len, num_heads, block_size)
        groups.append({"layers": label, "pattern": str(pattern), **layout_summary(lay, head_dim)})
    return {
        "source": program.source, "program": str(program), "seq_len": seq_len, "num_heads": num_heads,
        "block_size": block_size, "head_dim": head_dim, "num_layers": program.num_layers,
        "groups": groups,
    }


def _shape(p: ir.Pattern) -> str:
    """A head's pattern with random streams left out: heads differing only in their
    random draws have the same shape."""
    return re.sub(r", stream=\d+", "", str(p))


def display_groups(lay: Layout) -> list[list[int]]:
    """Heads grouped by shape (their pattern up to the random draws)."""
    groups: dict[str, list[int]] = {}
    for h, p in enumerate(lay.heads):
        groups.setdefault(_shape(p), []).append(h)
    return list(groups.values())


def _si(x: float) -> str:
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f}{unit}"
    return f"{x:.0f}"


def format_report(rep: dict) -> str:
    """Aligned terminal summary of a compile report.

    >>> from patterncc import parse_program
    >>> text = format_report(compile_report(parse_program("window(16)"), 256, 1, 16))
    >>> text.splitlines()[1].split()[:3]
    ['layers', 'density', 'blocks']
    """
    lines = [f"{rep['source']}: seq_len={rep['seq_len']} heads={rep['num_heads']} "
             f"block_size={rep['block_size']} head_dim={rep['head_dim']}"]
    header = ("layers", "density", "blocks", "blk dens", "FULL", "max/row", "FLOPs fwd", "vs dense", "K/V bytes", "vs dense")
    rows = []
    for g in rep["groups"]:
        f, b = g["flops_fwd"], g["kv_bytes"]
        rows.append((g["layers"], f"{g['density']:.4f}", str(g["touched_blocks"]), f"{g['block_density']:.4f}",
                     f"{g['full_fraction']:.0%}", str(g["blocks_per_row"]["max"]), _si(f["sparse"]),
                     f"{f['sparse'] / f['dense']:.3f}x", _si(b["sparse"]), f"{b['sparse'] / b['dense']:.3f}x"))
    lines += _table(header, rows)
    for g in rep["groups"]:
        lines.append("")
        lines.append(f"{g['layers']}: {g['pattern']}")
        sub = [(head_ranges(h["heads"]), f"{h['density']:.4f}", str(h["touched_blocks"]),
                f"{h['full_fraction']:.0%}", str(h["max_blocks_per_row"]), h["pattern"]) for h in g["head_groups"]]
        lines += ["  " + s for s in _table(("heads", "density", "blocks", "FULL", "max/row", "pattern on these heads"), sub)]
        k = g.get("kernel")
        if k and k["residue_heads"]:
            factors = "/".join(map(str, k["residue_factors"]))
            lines.append(f"  kernels: heads {head_ranges(k['residue_heads'])} run in residue order (tokens grouped "
                         f"by t mod {factors}): {k['token_order_blocks']} -> {k['touched_blocks']} blocks, block "
                         f"density {k['token_order_block_density']:.4f} -> {k['block_density']:.4f}, FULL "
                         f"{k['token_order_full_fraction']:.0%} -> {k['full_fraction']:.0%}")
        if g["empty_rows"]:
            lines.append(f"  note: {g['empty_rows']} query blocks attend no key (their output is 0)")
    return "\n".join(lines)


def head_ranges(heads: list[int]) -> str:
    """Head numbers as ranges: [0, 1, 2, 5] -> "0-2,5".

    >>> head_ranges([0, 1, 2, 5, 7, 8])
    '0-2,5,7-8'
    """
    out, start = [], None
    for i, h in enumerate(heads):
        if start is None:
            start = h
        if i + 1 == len(heads) or heads[i + 1] != h + 1:
            out.append(str(start) if start == h else f"{start}-{h}")
            start = None
    return ",".join(out)


def _table(header, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def fmt(r):
        cells = [str(x).ljust(w) if i == 0 or i == len(r) - 1 else str(x).rjust(w)
                 for i, (x, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def block_picture(lay: Layout, head: int, max_pixels: int = 512) -> np.ndarray:
    """[n, n] picture of a head's block layout (0 empty, 1 PARTIAL, 2 FULL), max-pooled if large."""
    nb = lay.nblocks
    if nb <= max_pixels:
        return lay.block_matrix(head)
    f = -(-nb // max_pixels)
    n = -(-nb // f)
    pic = np.zeros((n, n), np.int8)
    s, e = lay.indptr[head * nb], lay.indptr[(head + 1) * nb]
    state = np.where(lay.full[s:e], 2, 1).astype(np.int8)
    np.maximum.at(pic, (lay.entry_qblock[s:e] // f, lay.kblock[s:e] // f), state)
    return pic


def save_layout_png(program: ir.Program, seq_len: int, num_heads: int, block_size: int, path: Path) -> None:
    """One panel per (layer group, head group): the block layout, FULL dark, PARTIAL light."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    panels = []
    for label, pattern in layer_groups(program):
        lay = get_layout(pattern, seq_len, num_heads, block_size)
        for heads in display_groups(lay):
            panels.append((f"{label}, heads {head_ranges(heads)}", block_picture(lay, heads[0])))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    cmap = ListedColormap(["#ffffff", "#9ecae1", "#08306b"])
    for ax, (title, pic) in zip(axes.flat, panels):
        ax.imshow(pic, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"block layout, T={seq_len}, block {block_size}\n(dark: FULL, light: PARTIAL)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
