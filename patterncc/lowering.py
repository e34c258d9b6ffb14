"""Lowering: a Layout -> the kernel plan the generated Triton kernels walk.

The plan is built on the host with NumPy (no Python loop over blocks) and cached on the
layout per (device, GQA group, tile shape, scratch budget). The decisions made here:

* **Kernel order** (:func:`kernel_layout`). A head whose pattern has a form in *residue
  order* (``ir.Pattern.residue``: tokens grouped by t mod d, d the gcd of its window
  dilations) runs in that order: a dilated window's blocks, mostly PARTIAL in token order,
  become a band of FULL blocks half as wide (for d = 2). The kernels load and store
  through each position's token, so outputs and gradients stay in token order; layouts,
  diagnostics and reports keep token order too. With GQA/MQA the query heads of one kv
  head must share an order, else they all stay in token order.
* **Row tiles** (:func:`stacked_rows`). A kernel row may stack several layout blocks (a
  128-query tile over a 64-token layout): its entries are the union of their key blocks,
  FULL (bit 0) only where every stacked block is, with bit ``1 + j`` marking the entries
  where stacked block j is FULL. Stacking halves the K/V tile loads but computes every
  entry for all stacked blocks, so it is only done where that covers at most
  ``STACK_WASTE`` more pairs (:func:`stacks_well`): the causal window and the dilated
  window in residue order pass (+6%, +11%); longformer (+20%: its 64-row tiles already skip
  the global key block) and BigBird (+39%: stacked blocks draw different random blocks) do
  not. Random terms inside intersections need their own flag bits, so such patterns are
  never stacked. Measured on an H200, tall rows pay only where K/V loads are gathers
  (residue order), so by default (``TALL_ONLY_GATHERED``) only such layouts take them
  (:func:`row_class`): the dilated window does, the causal window runs 64-row tiles.
* **Thin global columns** (:func:`narrow_entries`). A key block that only a top-level
  ``global(...)`` term's key column touches (no other term, no global query in the row)
  costs a whole tile for a few keys: the forward and dQ walk instead the 16-key sub-blocks
  that hold global keys, in a loop of their own with 16-wide tiles, evaluating the
  ordinary (exact) predicate there. dK/dV owns key tiles: with ``THIN_KEYS`` (on by
  default) it moves such entries into work items of their own that walk the 16-key
  sub-blocks against a whole query block a step (:func:`thin_key_rows`), merged with the key
  row's other items; else it walks the whole key block.
* **Thin global query rows** (:func:`thin_rows`; ``THIN_ROWS``). The
  transpose in the forward: a key block that only a global term's query rows touch (the
  far blocks of a global query row) costs a whole 64-row tile for a few queries; such
  entries become items of their own that walk them with 16-row tiles (the 16-row sub-blocks
  holding global queries) and write a partial merged with the row's other items; dQ walks
  the same items, and dK/dV walks those blocks' global queries as 16-query sub-tiles
  (:func:`thin_query_entries`). Only unstacked rows.
* **Work items** (:func:`make_items`): runs of at most ``split`` entries of one row. A row
  longer than ``split`` (a global row touching every block, a global key column in the
  backward) becomes several items writing partials to scratch slots, merged in-kernel by
  the last one to finish; every row, even an empty one, has an item so every output row is
  written. ``split`` is about twice the mean row, raised where needed to keep the scratch
  within ``SCRATCH_FRACTION`` of the output's bytes. With ``SPLIT_FIRST`` (on) the pieces of
  split rows launch first, so the long pieces start in the grid's first waves rather than
  its last, except thin pieces (thin rows, thin keys), spread over the first
  ``SPREAD_PIECES`` of the grid; the other items keep row order (neighbouring rows share
  K/V blocks in L2).

Flag words (int32 per entry): bit 0 FULL (every pair allowed, no predicate); bits
``1 + i``: random term ``i`` of the predicate plan drew this block (unstacked rows) or
stacked layout block ``i`` is FULL (stacked rows); bit 30 (``TAIL``): the key block holds
positions that are not tokens (the sequence tail, an empty residue slot), which a FULL
block must still mask in the forward; bit 29 (``COLUMN``, host side only): only a global
key column touches the block.

Example:
    >>> import patterncc, torch
    >>> from patterncc import codegen, lowering
    >>> from patterncc.layout import get_layout
    >>> lay = get_layout(patterncc.parse("window(16) | global([0])"), 256, 2, 16)
    >>> plan = lowering.plan_for(lay, codegen.analyse(lay.pattern), torch.device("cpu"), group=1, split=4)
    >>> plan.fwd.items.n_items > 2 * lay.nblocks, plan.fwd.items.n_merge   # rows 0 of both heads are split
    (True, 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import ir
from .codegen import PredicatePlan
from .ir import FULL, Ctx
from .layout import Layout, build_head

TAIL = 1 << 30  # flag bit: the key block holds positions that are not tokens
COLUMN = 1 << 29  # flag bit: only a global key column touches this block (see column_only)
ROW = 1 << 28  # flag bit: only global query rows touch this block (see row_only)
NARROW = 16  # key tile of thin global columns
MIN_SPLIT = 16  # never cut rows shorter than this many blocks
STACK_WASTE = 0.15  # stack rows only if the tiles then cover at most 15% more pairs
TALL_ONLY_GATHERED = True  # tall rows only for residue-ordered (gathered) walks; False: any band (A/B)
TALL_ROWS, FLAT_ROWS = 128, 64  # positions per kernel row: tall rows, and at most this if not tall
SCRATCH_FRACTION = 0.05  # split-row scratch at most this fraction of the output's bytes
RESIDUE_ORDER = True  # run dilated heads in residue order (False: token order, for A/B runs)
# Larger residue factors stay in token order: the kernels find a position's class by a float
# reciprocal, exact while the class index is below this (kernels/common.py _class_of).
MAX_RESIDUE_FACTOR = 2 ** 21
THIN_COLUMNS = True  # walk thin global key columns as 16-key tiles (False: whole blocks, for A/B runs)
FAST_RESIDUE_TOKENS = True  # order mode 1 where it applies (False: always the general mode 2, for A/B runs)
# Walk global query rows' far blocks with 16-row / 16-query tiles (False: for A/B runs). Longformer
# at 64K on an H100 (bench/RESULTS.md, twentieth session, interleaved A/B): forward level, dQ 2-3%
# and dK/dV 2-6% slower without them.
THIN_ROWS = True
# The dK/dV walk's transpose of thin columns: a key row's far query blocks that only its
# global keys touch (longformer's key block 0 against every query block) walked by items of
# their own with 16-key tiles, a whole query block a step, instead of the whole key block
# (thin_key_rows). Built and checked under the interpreter and in sm_90 SASS in the
# twenty-third session (bench/RESULTS.md: a 16-key step 0.39 / 0.58 of a 64-key block's
# instructions at D=64 / 128, dK/dV predicted -6% / -4% for longformer); on since the
# twenty-fourth session's H100 run measured longformer's dK/dV 0.4-3.6% faster (A/B row
# `thinkeys` turns it off). False: whole key blocks.
THIN_KEYS = True
SPLIT_FIRST = True  # launch the pieces of split rows before all other items (False: row order, for A/B runs)
# With SPLIT_FIRST: thin-row pieces (a few global queries against many key blocks) spread
# evenly over the first SPREAD_PIECES of the other items instead of launched first (0). All
# first, a global query row's pieces sweep K and V through HBM at once, at its bandwidth while
# no row computes; spread, the sweep runs beside the rows' compute. At 64K on an H100
# (bench/RESULTS.md, twenty-first session) longformer's forward -3% (D=64) and -4 to -7%
# (D=128); pieces of whole rows stay first: spread, BigBird's were 2-6% slower. Less where a
# launch is too short for a piece started that late to end with it (spread_fraction).
SPREAD_PIECES = 0.8
SPREAD_SLOTS = 528  # programs a launch runs at once, for spread_fraction: 132 SMs x 4 (an H100, at most)
FOLD_SCALE = True  # forward: scale scores inside exp2's FFMA when the scale is > 0 (False: for A/B runs)
RESIDUE_TMA = True  # residue-order walks through strided TMA boxes where residue_stride allows (False: for A/B runs)
# Residue-order forward and dQ launches test PARTIAL tiles on class coordinates
# (codegen.class_forms, see class_gap): a dilated window's masked tile, forward 371 -> 109
# and dQ 369 -> 104 sm_90 SASS instructions (Triton 3.6, with the tail-free forward).
# Measured at 64K on an H100 (bench/RESULTS.md, sixteenth session): dilated forward -6..-7%
# at D=64 and -4..-7% at D=128, forward+backward -1..-2% at D=64. dK/dV keeps the token test
# (kernels/common.py _walked_mask says why). False: tokens everywhere (A/B row `classmask`).
CLASS_MASK = True


# ----------------------------------------------------------------------------------------
# kernel order


@dataclass(frozen=True)
class KernelLayout:
    """A layout in kernel order: per head and layout block of positions, the key blocks.

    ``seq_len`` positions per head (at least T; d * L for a head in residue order, its
    classes padded to L = ir.residue_length(T, d, block) positions), ``nblocks`` =
    ceil(seq_len / block). ``dil`` / ``seg`` per head: residue factor and class length
    (1 and T in token order). ``indptr`` [H * nblocks + 1], ``kblock`` and
    ``flags`` [nnz]: CSR rows ``head * nblocks + block``, key blocks increasing.
    ``head_class`` [H]: the first head whose rows are the same (heads of one behaviour are
    lowered once and copied). ``columns[h]``: positions every query of head h attends
    through a top-level ``global(...)`` (its key column).
    """

    tokens: int
    seq_len: int
    block: int
    dil: np.ndarray
    seg: np.ndarray
    indptr: np.ndarray
    kblock: np.ndarray
    flags: np.ndarray
    head_class: np.ndarray
    columns: tuple = ()
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def head_entries(self, head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query block, key block, flags) of every entry of one head."""
        return _head_entries(self.indptr, self.kblock, self.flags, head, self.nblocks)

    @property
    def nblocks(self) -> int:
        return -(-self.seq_len // self.block)

    @property
    def num_heads(self) -> int:
        return int(self.dil.size)

    @property
    def permuted(self) -> bool:
        return bool((self.dil > 1).any())

    @property
    def nnz(self) -> int:
        return int(self.kblock.size)

    @property
    def full_fraction(self) -> float:
        return float((self.flags & 1).mean()) if self.nnz else 0.0

    @property
    def block_density(self) -> float:
        """Touched blocks over the blocks of the token-order grid (T / block squared per head)."""
        nb = -(-self.tokens // self.block)
        return self.nnz / (self.num_heads * nb ** 2)


def switches() -> tuple:
    """The module's tuning switches above, as a key: what was built under other values (an
    A/B run flips them) is not reused."""
    return (STACK_WASTE, TALL_ONLY_GATHERED, SCRATCH_FRACTION, RESIDUE_ORDER, THIN_COLUMNS, THIN_ROWS,
            THIN_KEYS, FAST_RESIDUE_TOKENS, SPLIT_FIRST, SPREAD_PIECES, SPREAD_SLOTS, FOLD_SCALE, RESIDUE_TMA,
            MIN_SPLIT, NARROW, TALL_ROWS, FLAT_ROWS, CLASS_MASK, MAX_RESIDUE_FACTOR)


def _head_entries(indptr, kblock, flags, head: int, nb: int):
    """(query block, key block, flags) of the entries of rows head * nb .. head * nb + nb - 1."""
    ptr = indptr[head * nb:(head + 1) * nb + 1]
    s, e = ptr[0], ptr[-1]
    qb = np.repeat(np.arange(nb, dtype=np.int64), np.diff(ptr))
    return qb, kblock[s:e].astype(np.int64), flags[s:e]


def head_orders(layout: Layout, group: int = 1) -> list[tuple[int, ir.Pattern | None]]:
    """Per head: (residue factor, pattern in residue order), or (1, None) for token order.

    The query heads of one kv head (``group`` consecutive heads) share one order: if they
    would not, they all stay in token order.
    """
    t = layout.seq_len
    by_pattern: dict = {}
    for p in layout.heads:
        if p not in by_pattern:
            d = ir.residue_factor(p) if RESIDUE_ORDER else 1
            moved = p.residue(d, t, layout.block_size) if 1 < d < MAX_RESIDUE_FACTOR and t > 1 else None
            by_pattern[p] = (d, moved) if moved is not None else (1, None)
    orders = [by_pattern[p] for p in layout.heads]
    for g in range(0, len(orders), group):
        if len({d for d, _ in orders[g:g + group]}) > 1:
            orders[g:g + group] = [(1, None)] * group
    return orders


def kernel_layout(layout: Layout, pred: PredicatePlan, group: int = 1) -> KernelLayout:
    """The layout in kernel order (cached on the layout per GQA group)."""
    return layout._cached(("kernel_layout", group, pred.random_nodes, RESIDUE_ORDER),
                          lambda: _build_kernel_layout(layout, pred, group))


def _build_kernel_layout(layout: Layout, pred: PredicatePlan, group: int) -> KernelLayout:
    t, bs, h, nb = layout.seq_len, layout.block_size, layout.num_heads, layout.nblocks
    orders = head_orders(layout, group)
    # Token-order entries: TAIL on the block holding the sequence end (if T % block).
    flags = entry_flags(layout, pred)
    flags = np.where(np.isin(layout.kblock, _not_tokens_token_order(t, bs)), flags | TAIL, flags).astype(np.int32)
    head_class = _first_of_each(list(zip(layout.heads, (d for d, _ in orders))))
    kernel_patterns = [(p, Ctx(t, bs)) if d == 1 else (moved, Ctx(_positions(t, d, bs), bs))
                       for p, (d, moved) in zip(layout.heads, orders)]
    per_class = {c: column_keys(kernel_patterns[c][0], kernel_patterns[c][1].seq_len) for c in set(head_class.tolist())}
    columns = tuple(per_class[c] for c in head_class.tolist())
    if all(d == 1 for d, _ in orders):
        flags = _mark_columns(flags, layout.indptr, layout.kblock, kernel_patterns, columns, head_class, nb)
        ones = np.ones(h, np.int64)
        return KernelLayout(t, t, bs, ones, ones * t, layout.indptr, layout.kblock, flags, head_class, columns)

    seq = max(_positions(t, d, bs) for d, _ in orders)
    nbk = -(-seq // bs)
    built: dict = {}
    qbs, kbs, fls = [], [], []
    for hd, (d, moved) in enumerate(orders):
        if d == 1:
            qb, kb, fl = _head_entries(layout.indptr, layout.kblock, flags, hd, nb)
            qbs.append(qb)
            kbs.append(kb)
            fls.append(fl)
            continue
        if (d, moved) not in built:
            length = _positions(t, d, bs)
            hl = build_head(moved, Ctx(length, bs))
            fl = hl.full.astype(np.int32) | np.where(np.isin(hl.kb, _not_tokens_residue(t, d, bs)), TAIL, 0)
            built[d, moved] = (hl.qb, hl.kb, fl.astype(np.int32))
        qb, kb, fl = built[d, moved]
        qbs.append(qb)
        kbs.append(kb)
        fls.append(fl)
    heads = np.repeat(np.arange(h, dtype=np.int64), [q.size for q in qbs])
    rows = heads * nbk + np.concatenate(qbs)
    indptr = np.zeros(h * nbk + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=h * nbk), out=indptr[1:])
    dil = np.array([d for d, _ in orders], np.int64)
    seg = np.array([_class_length(t, d, bs) for d, _ in orders], np.int64)
    kblock = np.concatenate(kbs).astype(np.int32)
    flags = _mark_columns(np.concatenate(fls).astype(np.int32), indptr, kblock, kernel_patterns, columns,
                          head_class, nbk)
    return KernelLayout(t, seq, bs, dil, seg, indptr, kblock, flags, head_class, columns)


def column_keys(pattern: ir.Pattern, seq_len: int) -> np.ndarray:
    """Positions every query attends through a top-level ``global(...)`` term: its key column."""
    terms = pattern.terms if isinstance(pattern, ir.Union) else (pattern,)
    idx = [t.indices(seq_len) for t in terms if isinstance(t, ir.Global)]
    return np.unique(np.concatenate(idx)) if idx else np.zeros(0, np.int64)


def column_only(pattern: ir.Pattern, ctx: Ctx, columns: np.ndarray, qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Which blocks (qb, kb) only the key column of ``pattern``'s global terms touches, in key
    blocks the column fills at most half of (in 16-key sub-blocks): no other term touches
    them and the query block holds no global query (those rows attend every key)."""
    return _only_global(pattern, ctx, columns, qb, kb, keys=True)


def row_only(pattern: ir.Pattern, ctx: Ctx, rows: np.ndarray, qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Which blocks (qb, kb) only the query rows of ``pattern``'s global terms touch (a global
    term is symmetric: its rows are its column's positions), in query blocks those rows fill
    at most half of (in 16-row sub-blocks): no other term touches them and the key block
    holds no global key (every query attends those)."""
    return _only_global(pattern, ctx, rows, qb, kb, keys=False)


def _only_global(pattern, ctx: Ctx, positions: np.ndarray, qb: np.ndarray, kb: np.ndarray, keys: bool) -> np.ndarray:
    """column_only (``keys``: the global positions are the key side) or row_only."""
    out = np.zeros(qb.size, bool)
    if positions.size == 0:
        return out
    thin_side, other = (kb, qb) if keys else (qb, kb)
    blocks, per_block = np.unique(np.unique(positions // NARROW) * NARROW // ctx.block, return_counts=True)
    thin = blocks[per_block <= max(1, ctx.block // NARROW // 2)]
    cand = np.flatnonzero(np.isin(thin_side, thin) & ~np.isin(other, np.unique(positions // ctx.block)))
    if cand.size:
        terms = pattern.terms if isinstance(pattern, ir.Union) else (pattern,)
        rest = ir.union(t for t in terms if not isinstance(t, ir.Global))
        out[cand] = rest.classify(ctx, qb[cand], kb[cand]) == ir.EMPTY
    return out


def _mark_columns(flags, indptr, kblock, kernel_patterns, columns, head_class, nb):
    """Set COLUMN on the entries :func:`column_only` finds and ROW on those :func:`row_only`
    finds (each head behaviour once)."""
    if not any(c.size for c in columns):
        return flags
    flags = flags.copy()
    marks: dict = {}
    for h, c in enumerate(map(int, head_class)):
        if c not in marks:
            qb, kb, _ = _head_entries(indptr, kblock, flags, h, nb)
            marks[c] = (np.where(column_only(*kernel_patterns[h], columns[h], qb, kb), COLUMN, 0)
                        | np.where(row_only(*kernel_patterns[h], columns[h], qb, kb), ROW, 0)).astype(np.int32)
        s = indptr[h * nb]
        flags[s:s + marks[c].size] |= marks[c]
    return flags


def _global_sub_blocks(klay: KernelLayout, sel: np.ndarray, blocks: np.ndarray, heads: np.ndarray) -> tuple:
    """Entries ``sel`` expanded into the 16-position sub-blocks of their global side's block
    (``blocks``, of head ``heads``, one per entry of sel) that hold global positions of the
    head. Returns, per sub-block: (its entry, the sub-block in 16-position units, whether all
    16 positions are global)."""
    entry, subs, full = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, bool)]
    for c in np.unique(klay.head_class[heads]):
        mine = np.flatnonzero(klay.head_class[heads] == c)
        sub, count = np.unique(klay.columns[c] // NARROW, return_counts=True)
        sub_block = sub * NARROW // klay.block
        first = np.searchsorted(sub_block, blocks[mine], "left")
        n = np.searchsorted(sub_block, blocks[mine], "right") - first
        pick = np.repeat(first, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        entry.append(np.repeat(sel[mine], n))
        subs.append(sub[pick])
        full.append(count[pick] == NARROW)
    return tuple(np.concatenate(x) for x in (entry, subs, full))


def narrow_entries(klay: KernelLayout, indptr: np.ndarray, kblock: np.ndarray, flags: np.ndarray,
                   stacked: bool) -> tuple:
    """Split a walk's entries into the regular ones and the narrow ones of thin columns.

    Returns (indptr, key block, flags) of the regular entries and (indptr, 16-key sub-block,
    flags) of the narrow ones, both over the same rows. A narrow sub-block is FULL when
    every key in it is a column key; else the predicate decides (random-term bits kept on
    unstacked rows; stacked-row bits dropped: they would claim whole sub-rows).
    """
    n_rows = indptr.size - 1
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    col = (flags & COLUMN) != 0 if THIN_COLUMNS else np.zeros(flags.size, bool)
    reg_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row[~col], minlength=n_rows), out=reg_ptr[1:])
    regular = (reg_ptr, kblock[~col], (flags[~col] & ~COLUMN).astype(np.int32))
    sel = np.flatnonzero(col)
    entry, subs, full = _global_sub_blocks(klay, sel, kblock[sel], row[sel] // (n_rows // klay.num_heads))
    keep = 0 if stacked else flags[entry] & ~(COLUMN | ROW | TAIL | 1)
    rows, nflags = row[entry], np.where(full, 1, keep).astype(np.int32)
    order = np.argsort(rows * (klay.seq_len // NARROW + 1) + subs, kind="stable")
    n_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=n_ptr[1:])
    return regular, (n_ptr, subs[order], nflags[order])


def thin_rows(klay: KernelLayout, indptr: np.ndarray, kblock: np.ndarray, flags: np.ndarray) -> tuple:
    """Move the ROW entries of unstacked forward rows into thin-row runs (``THIN_ROWS``).

    Returns (indptr, key block, flags, segments): per row its other entries first, then its
    ROW entries once per 16-row sub-block of the row that holds global queries (FULL there
    when all 16 rows are global queries, else the exact predicate decides; random and TAIL
    bits kept). ``segments`` = (row, start, end, sub) of every run, in row order: each row's
    regular run (sub -1, possibly empty), then one run per thin sub-block (``sub``: which
    16 rows of the row it walks). None when no entry moves (the input comes back).
    """
    heads = np.repeat(np.arange(indptr.size - 1, dtype=np.int64) // klay.nblocks, np.diff(indptr))
    runs = _thin_runs(klay, indptr, flags, ROW if THIN_ROWS else 0, heads)
    if runs is None:
        return indptr, kblock, flags, None
    ptr, entry, fl, segments = runs
    return ptr, kblock[entry], fl, segments


def thin_key_rows(klay: KernelLayout, indptr: np.ndarray, qblock: np.ndarray, qhead: np.ndarray,
                  flags: np.ndarray) -> tuple:
    """:func:`thin_rows` for the dK/dV walk (``THIN_KEYS``): a key row's COLUMN entries (far
    query blocks that attend only its global keys) move into runs of their own, one per
    16-key sub-block holding global keys of the entry's query head, which work items then walk
    with 16-key tiles instead of the whole key block.

    Returns (indptr, query block, query head, flags, segments) as thin_rows does; None
    segments when no entry moves (the input comes back).
    """
    runs = _thin_runs(klay, indptr, flags, COLUMN if THIN_KEYS else 0, qhead)
    if runs is None:
        return indptr, qblock, qhead, flags, None
    ptr, entry, fl, segments = runs
    return ptr, qblock[entry], qhead[entry], fl, segments


def _thin_runs(klay: KernelLayout, indptr: np.ndarray, flags: np.ndarray, bit: int, heads: np.ndarray):
    """thin_rows / thin_key_rows on entry indices: the entries flagged ``bit`` of each row
    (a block of the row's own side, whose global positions come from the entry's head
    ``heads``) moved into one run per 16-position sub-block holding global positions.
    Returns (indptr, entry of each new entry, flags, segments), or None when none moves."""
    thin = (flags & bit) != 0
    if not thin.any():
        return None
    n_rows, nb = indptr.size - 1, klay.nblocks
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    sel, other = np.flatnonzero(thin), np.flatnonzero(~thin)
    moved, sub, full = _global_sub_blocks(klay, sel, row[sel] % nb, heads[sel])
    keep = flags[moved] & ~(ROW | COLUMN | 1)
    entry = np.concatenate([other, moved])
    sub = np.concatenate([np.full(other.size, -1, np.int64), sub - (row[moved] % nb) * (klay.block // NARROW)])
    fl = np.concatenate([flags[other], np.where(full, keep | 1, keep)])
    order = np.lexsort((entry, sub, row[entry]))
    entry, sub, fl = entry[order], sub[order], fl[order]
    new_row = row[entry]
    new_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(new_row, minlength=n_rows), out=new_ptr[1:])
    # runs: the regular run of every row (maybe empty), then each (row, sub) run
    regular_end = new_ptr[:-1] + np.bincount(new_row[sub < 0], minlength=n_rows)
    at = np.flatnonzero(sub >= 0)
    key = new_row[at] * (klay.block // NARROW) + sub[at]
    firsts = at[np.concatenate([[True], key[1:] != key[:-1]])] if at.size else at
    # a run ends where the next one starts, or at its row's end
    ends = np.minimum(np.append(firsts[1:], entry.size), new_ptr[new_row[firsts] + 1])
    seg_row = np.concatenate([np.arange(n_rows, dtype=np.int64), new_row[firsts]])
    seg_sub = np.concatenate([np.full(n_rows, -1, np.int64), sub[firsts]])
    seg_start = np.concatenate([new_ptr[:-1], firsts])
    seg_end = np.concatenate([regular_end, ends])
    o = np.lexsort((seg_sub, seg_row))
    return new_ptr, entry, fl.astype(np.int32), (seg_row[o], seg_start[o], seg_end[o], seg_sub[o])


def thin_query_entries(klay: KernelLayout, indptr: np.ndarray, qblock: np.ndarray, qhead: np.ndarray,
                       flags: np.ndarray) -> tuple:
    """The dK/dV walk's ROW entries (``THIN_ROWS``) as 16-query sub-blocks (the transpose of
    :func:`thin_rows`: there the global queries own a thin row, here they are walked).

    Returns (indptr, query block, query head, flags, thin_ptr): the other entries first, as
    before, then per kv row its thin entries, whose "query block" is the 16-query sub-block
    (in 16-position units) holding global queries of that query head, FULL when all 16
    are global queries, else the exact predicate decides (random bits kept). ``thin_ptr``
    [rows + 1] indexes them (offset past the regular entries); None when nothing moves.
    """
    thin = (flags & ROW) != 0 if THIN_ROWS else np.zeros(flags.size, bool)
    if not thin.any():
        return indptr, qblock, qhead, flags, None
    n_rows = indptr.size - 1
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    reg_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(row[~thin], minlength=n_rows), out=reg_ptr[1:])
    sel = np.flatnonzero(thin)
    entry, subs, full = _global_sub_blocks(klay, sel, qblock[sel], qhead[sel])
    rows, heads = row[entry], qhead[entry]
    fls = np.where(full, 1, flags[entry] & ~(ROW | COLUMN | TAIL | 1))
    order = np.lexsort((subs, heads, rows))
    thin_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=thin_ptr[1:])
    thin_ptr += reg_ptr[-1]
    return (reg_ptr, np.concatenate([qblock[~thin], subs[order]]), np.concatenate([qhead[~thin], heads[order]]),
            np.concatenate([flags[~thin], fls[order]]).astype(np.int32), thin_ptr)


def kv_walk_entries(klay: KernelLayout, indptr: np.ndarray, qblock: np.ndarray, qhead: np.ndarray,
                    flags: np.ndarray) -> tuple:
    """The unstacked dK/dV walk's entries: :func:`thin_query_entries` (global query rows as
    16-query entries, after the regular ones) and :func:`thin_key_rows` (global key columns'
    far entries as 16-key runs) on the regular ones.

    Returns (indptr, query block, query head, flags, thin_ptr, segments): ``thin_ptr`` as
    thin_query_entries gives it (offset past the regular entries, or None), ``segments`` as
    thin_key_rows (None when no key row has a thin run).
    """
    indptr, qblock, qhead, flags, thin_ptr = thin_query_entries(klay, indptr, qblock, qhead, flags)
    n_reg = int(indptr[-1])
    indptr, qb, qh, fl, segments = thin_key_rows(klay, indptr, qblock[:n_reg], qhead[:n_reg], flags[:n_reg])
    if segments is None:
        return indptr, qblock, qhead, flags, thin_ptr, None
    if thin_ptr is not None:
        thin_ptr = thin_ptr + (int(indptr[-1]) - n_reg)
    qblock, qhead, flags = (np.concatenate([a, b[n_reg:]]) for a, b in ((qb, qblock), (qh, qhead), (fl, flags)))
    return indptr, qblock, qhead, flags, thin_ptr, segments


def _class_length(t: int, d: int, bs: int) -> int:
    """A head's class length (its ``seg``): T in token order (d = 1); in residue order
    L = ir.residue_length(T, d, bs), padded to the block."""
    return t if d == 1 else ir.residue_length(t, d, bs)


def _positions(t: int, d: int, bs: int) -> int:
    """Kernel positions of a head: its d classes of _class_length positions."""
    return d * _class_length(t, d, bs)


def _not_tokens_token_order(t: int, bs: int) -> np.ndarray:
    """Key blocks holding positions past the sequence (the tail block, if T % block)."""
    return np.array([t // bs] if t % bs else [], np.int64)


def _not_tokens_residue(t: int, d: int, bs: int) -> np.ndarray:
    """Key blocks (residue order) holding empty slots: each class is padded to L positions
    (a multiple of the block, :func:`patterncc.ir.residue_length`), so the blocks after a
    class's last token up to its end."""
    length = ir.residue_length(t, d, bs)
    counts = -(-(t - np.arange(d)) // d)  # tokens of class c: ceil((T - c) / d)
    blocks = [np.arange((c * length + n) // bs, (c + 1) * length // bs)  # L is a multiple of bs
              for c, n in enumerate(counts) if n < length]
    return np.unique(np.concatenate(blocks)) if blocks else np.array([], np.int64)


# ----------------------------------------------------------------------------------------
# stacked rows and the kv index


def can_stack(pred: PredicatePlan) -> bool:
    """Rows may stack layout blocks unless random terms need the flag bits."""
    return not pred.random_nodes


def row_class(layout: Layout, pred: PredicatePlan, group: int, kind: str) -> bool:
    """Whether walk ``kind`` of this layout takes tall (TALL_ROWS) tiles: the layout block is
    that tall already, or the heads run in residue order and stacking covers at most
    STACK_WASTE more pairs than rows of FLAT_ROWS positions.

    Why residue order only (``TALL_ONLY_GATHERED``): a tall tile halves the K/V tiles a
    program loads but holds twice the accumulator. Measured on an H200 at T=65536, D=64
    (bench/RESULTS.md, 2026-12-01), that pays where K/V are gathered token by token (the
    dilated window in residue order: forward 1.05 ms tall against 1.29 ms at 64 rows) and
    not where they are contiguous rows (the causal window: 1.10 ms either way at best,
    1.22 ms with the dilated window's tall winner)."""
    lb = layout.block_size
    if lb >= TALL_ROWS:
        return True
    if TALL_ONLY_GATHERED and not kernel_layout(layout, pred, group).permuted:
        return False
    return stacks_well(layout, pred, group, kind, TALL_ROWS // lb, max(1, FLAT_ROWS // lb))


def row_height(layout: Layout, pred: PredicatePlan, tall: bool, owned: int) -> int:
    """Positions per kernel row: the config's owned tile, capped by the class (TALL_ROWS or
    FLAT_ROWS), at least one layout block; one layout block if rows cannot stack at all."""
    lb = layout.block_size
    if not can_stack(pred):
        return lb
    return max(lb, min(owned, TALL_ROWS if tall else FLAT_ROWS))


def stacks_well(layout: Layout, pred: PredicatePlan, group: int, kind: str, factor: int, base: int = 1) -> bool:
    """Whether rows of ``factor`` layout blocks in walk ``kind`` ("fwd", "dq": query rows;
    "dkdv": key rows) cover at most STACK_WASTE more pairs than rows of ``base`` blocks."""
    if factor <= base:
        return True
    if not can_stack(pred):
        return False
    klay = kernel_layout(layout, pred, group)
    key = ("stacks_well", kind, group, factor, base, STACK_WASTE)
    if key not in klay.memo:
        klay.memo[key] = _sample_pairs(klay, kind, group, factor) <= (1 + STACK_WASTE) * _sample_pairs(
            klay, kind, group, base)
    return klay.memo[key]


def _sample_pairs(klay: KernelLayout, kind: str, group: int, factor: int) -> int:
    """Pairs the rows of ``factor`` blocks cover for the first head (forward, dQ) or kv head
    (dK/dV): heads are alike or differ only in random draws, so one stands for all."""
    nb = klay.nblocks
    nr = -(-nb // factor)
    heads = range(group) if kind == "dkdv" else range(1)
    parts = [klay.head_entries(h) for h in heads]
    qb = np.concatenate([i * nb + q for i, (q, _, _) in enumerate(parts)])
    kb = np.concatenate([kb for _, kb, _ in parts])
    if kind == "dkdv":
        key = (kb // factor) * (group * nb) + qb
    else:
        key = ((qb % nb) // factor) * nb + kb
    return int(np.unique(key).size) * factor if nr else 0


def _stacked(klay: KernelLayout, factor: int):
    """(regular, narrow) entries of query rows of ``factor`` blocks, memoised on klay."""
    key = ("stacked", factor, THIN_COLUMNS)
    if key not in klay.memo:
        klay.memo[key] = narrow_entries(klay, *stacked_rows(klay, factor), stacked=factor > 1)
    return klay.memo[key]


def _kv(klay: KernelLayout, group: int, factor: int):
    """kv_rows(klay, group, factor), memoised on klay."""
    key = ("kv", group, factor)
    if key not in klay.memo:
        klay.memo[key] = kv_rows(klay, group, factor)
    return klay.memo[key]


def stacked_rows(klay: KernelLayout, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, key block, flags) over rows of ``factor`` stacked layout blocks."""
    if factor == 1:
        return klay.indptr, klay.kblock.astype(np.int64), klay.flags
    nb = klay.nblocks
    nr = -(-nb // factor)
    present = _sub_counts(nb, factor)

    def one_head(head):
        qb, kb, fl = klay.head_entries(head)
        return _union_entries(qb // factor, kb, qb % factor, fl, nb, present, nr)
    return _assemble(one_head, klay.head_class)


def kv_rows(klay: KernelLayout, group: int, factor: int):
    """The transposed index regrouped by kv head, rows of ``factor`` stacked key blocks.

    Returns (indptr [H_kv * nr + 1], query block, query head, flags); within a row,
    entries go by query head, then query block. Kv heads whose query heads behave alike,
    head for head, are built once and copied.
    """
    nb, h = klay.nblocks, klay.num_heads
    nr = -(-nb // factor)
    present = _sub_counts(nb, factor)

    def one_kv_head(j):
        parts = [klay.head_entries(hd) for hd in range(j * group, (j + 1) * group)]
        own = np.concatenate([i * nb + q for i, (q, _, _) in enumerate(parts)])  # query head in the group, block
        kb = np.concatenate([kb for _, kb, _ in parts])
        fl = np.concatenate([fl for _, _, fl in parts])
        return _union_entries(kb // factor, own, kb % factor, fl, group * nb, present, nr)
    runs = [tuple(klay.head_class[j * group:(j + 1) * group]) for j in range(h // group)]
    indptr, own, flags = _assemble(one_kv_head, _first_of_each(runs))
    kv_head = np.repeat(np.arange(h // group, dtype=np.int64), np.diff(indptr[::nr]))
    return indptr, own % nb, own // nb + kv_head * group, flags


def _first_of_each(keys: list) -> np.ndarray:
    """For every position, the first position holding an equal key."""
    first: dict = {}
    return np.array([first.setdefault(key, i) for i, key in enumerate(keys)], np.int64)


def _assemble(build, classes: np.ndarray):
    """Concatenate per-unit CSR pieces (a unit: a head or a kv head), building each
    distinct class once: (indptr over all units' rows, *entry arrays)."""
    built: dict = {}
    pieces = [built[c] if c in built else built.setdefault(c, build(c)) for c in map(int, classes)]
    counts = np.concatenate([np.diff(p[0]) for p in pieces])
    indptr = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return (indptr, *(np.concatenate([p[i] for p in pieces]) for i in range(1, len(pieces[0]))))


def _sub_counts(nb: int, factor: int) -> np.ndarray:
    """Layout blocks actually present in each stacked row of one head (the last may be short)."""
    nr = -(-nb // factor)
    return np.minimum(factor, nb - np.arange(nr) * factor)


def _union_entries(row, other, sub, flags, n_other, present, n_rows):
    """Merge entries (row, other) of the stacked blocks ``sub``: sorted unique pairs with
    FULL where all present stacked blocks are FULL, bit 1 + sub per FULL stacked block, and
    TAIL where any has it. ``present[row]``: stacked blocks that exist in that row."""
    key = row * n_other + other
    order = np.argsort(key, kind="stable")
    if present.max(initial=1) == 1:  # nothing stacked: entries are unique, flags kept whole
        indptr = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=n_rows), out=indptr[1:])
        return indptr, other[order], flags[order]
    key, sub, flags = key[order], sub[order], flags[order].astype(np.int64)
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if key.size else np.zeros(0, np.int64)
    uniq = key[first]
    urow = uniq // n_other
    full = flags & 1
    column = (flags & COLUMN) != 0
    if first.size:
        n_full = np.add.reduceat(full, first)
        n_column = np.add.reduceat(column.astype(np.int64), first)
        bits = np.bitwise_or.reduceat((full << (1 + sub)) | (flags & TAIL), first)
    else:
        n_full = n_column = bits = np.zeros(0, np.int64)
    parts = np.diff(np.append(first, key.size))  # entries merged into each
    out_flags = (bits | (n_full == present[urow]) | np.where(n_column == parts, COLUMN, 0)).astype(np.int32)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(urow, minlength=n_rows), out=indptr[1:])
    return indptr, uniq % n_other, out_flags


# ----------------------------------------------------------------------------------------
# work items


@dataclass(frozen=True)
class WorkItems:
    """Runs of at most ``split`` entries of one row (device int32 tensors)."""

    row: torch.Tensor     # [I] row id (head * rows per head + row)
    start: torch.Tensor   # [I] first entry
    end: torch.Tensor     # [I] one past the last entry
    slot: torch.Tensor    # [I] scratch slot, -1 when the item is its whole row
    merge: torch.Tensor   # [I] index of its split row, -1 when the item is its whole row
    merge_start: torch.Tensor  # [R] first scratch slot of each split row
    merge_end: torch.Tensor    # [R] one past its last slot
    narrow_start: torch.Tensor  # [I] first narrow entry (thin columns; the row's first item walks them)
    narrow_end: torch.Tensor    # [I] one past its last
    thin: torch.Tensor          # [I] 16-position sub-block of its row a thin item walks (-1: an ordinary item)
    n_items: int
    n_slots: int
    n_merge: int
    split: int
    n_thin: int = 0             # thin items (THIN_ROWS in the forward and dQ, THIN_KEYS in dK/dV)


def choose_split(counts: np.ndarray, max_slots: int | None = None) -> int:
    """Longest run of entries one program walks: about twice the mean non-empty row.

    Balanced layouts are never split; a row far above the mean (a global query, a global
    key column in the backward) is cut into pieces of that size -- longer pieces where the
    pieces' scratch slots would pass ``max_slots``.
    """
    nonzero = counts[counts > 0]
    if nonzero.size == 0:
        return MIN_SPLIT
    split = int(max(MIN_SPLIT, np.ceil(2 * nonzero.mean())))
    if max_slots is not None:
        top = int(nonzero.max())
        while split < top and _slots(counts, split) > max_slots:
            split = int(np.ceil(split * 1.25))
    return split


def _slots(counts: np.ndarray, split: int) -> int:
    cut = counts[counts > split]
    return int((-(-cut // split)).sum())


def spread_fraction(piece: int, other_entries: int) -> float:
    """How far into the launch thin-row pieces of up to ``piece`` entries may be spread:
    SPREAD_PIECES, less where the ordinary items (``other_entries`` entries in all) launched
    after the last piece would not outlast it on SPREAD_SLOTS programs at once (a piece's
    entry taken at 1.5 of an ordinary entry's time), so that a late piece does not become the
    launch's tail; 0 (all first, as SPLIT_FIRST alone) where even the first would not fit.

    >>> spread_fraction(50, 150_000), spread_fraction(50, 36_000)
    (0.736, 0.0)
    """
    room = 1.0 - 1.5 * piece * SPREAD_SLOTS / max(1, other_entries)
    return round(max(0.0, min(SPREAD_PIECES, room)), 3)


def spread_order(pieces: np.ndarray, others: np.ndarray, spread: float) -> np.ndarray:
    """``pieces`` and ``others`` (item indices, each in order) as one launch order: piece j
    just before other item floor(j * spread * len(others) / len(pieces)), so the pieces come
    evenly over the first ``spread`` of the others (0: all pieces first).

    >>> spread_order(np.array([0, 1]), np.array([2, 3, 4, 5]), 0.5).tolist()
    [0, 2, 1, 3, 4, 5]
    """
    at = np.floor(np.arange(pieces.size) * spread * others.size / max(1, pieces.size)) - 0.5
    keys = np.concatenate([at, np.arange(others.size, dtype=np.float64)])
    return np.concatenate([pieces, others])[np.argsort(keys, kind="stable")]


def make_items(indptr: np.ndarray, split: int, device, narrow_ptr: np.ndarray | None = None,
               segments: tuple | None = None) -> WorkItems:
    """The work items of a walk: every run of entries cut into pieces of at most ``split``.

    A run is a row's entries, or with ``segments`` (row, start, end, sub) from
    :func:`thin_rows` each of its runs (a row's regular run first). A row of more than one
    piece is split: its pieces write scratch slots that its last one merges. The first
    piece of a row walks its narrow entries (``narrow_ptr``, per row).
    """
    n_rows = indptr.size - 1
    if segments is None:
        segments = (np.arange(n_rows, dtype=np.int64), indptr[:-1], indptr[1:], np.full(n_rows, -1, np.int64))
    seg_row, seg_start, seg_end, seg_sub = segments
    per_seg = np.maximum(1, -(-(seg_end - seg_start) // split))
    n_items = int(per_seg.sum())
    seg = np.repeat(np.arange(seg_row.size, dtype=np.int64), per_seg)
    piece = np.arange(n_items, dtype=np.int64) - (np.cumsum(per_seg) - per_seg)[seg]
    start = seg_start[seg] + piece * split
    end = np.minimum(start + split, seg_end[seg])
    row, thin = seg_row[seg], seg_sub[seg]
    per_row = np.bincount(row, minlength=n_rows)
    cut = per_row > 1
    in_cut = cut[row]
    slot = np.full(n_items, -1, np.int64)
    slot[in_cut] = np.arange(int(in_cut.sum()))
    merge = np.full(n_items, -1, np.int64)
    merge[in_cut] = (np.cumsum(cut) - 1)[row[in_cut]]
    merge_end = np.cumsum(per_row[cut])
    merge_start = merge_end - per_row[cut]
    n_start = np.zeros(n_items, np.int64)
    n_end = np.zeros(n_items, np.int64)
    if narrow_ptr is not None:
        lead = np.cumsum(per_row) - per_row  # first item of each row: its regular run's first piece
        n_start[lead], n_end[lead] = narrow_ptr[:-1], narrow_ptr[1:]
    if SPLIT_FIRST:
        # Long pieces first, so they do not start in the grid's last wave (and their merge
        # is not the kernel's tail), thin pieces spread (SPREAD_PIECES); the rest keep
        # row order, where neighbours share K/V.
        # Results do not change: partials still merge in slot order.
        light = in_cut & (thin >= 0)  # thin pieces (16-row or 16-key): bound by memory, not compute
        spread = spread_fraction(split, int((end - start)[~in_cut].sum()))
        order = np.concatenate([np.flatnonzero(in_cut & ~light),
                                spread_order(np.flatnonzero(light), np.flatnonzero(~in_cut), spread)])
        row, start, end, slot, merge, n_start, n_end, thin = (
            a[order] for a in (row, start, end, slot, merge, n_start, n_end, thin))
    t = lambda a: _dev(a, device)  # noqa: E731
    return WorkItems(t(row), t(start), t(end), t(slot), t(merge), t(merge_start), t(merge_end),
                     t(n_start), t(n_end), t(thin), n_items, int(in_cut.sum()), int(cut.sum()), split,
                     int((thin >= 0).sum()))


# ----------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Walk:
    """What one kernel walks: its rows (``row_block`` positions each, ``rows_per_head``
    per head), their entries and work items, and the merge counters of split rows."""

    items: WorkItems
    block: torch.Tensor        # [nnz] key block (forward, dQ) or query block (dK/dV)
    flags: torch.Tensor        # [nnz]
    head: torch.Tensor | None  # [nnz] query head of each entry (dK/dV only)
    narrow_block: torch.Tensor  # [n] 16-key sub-block of each narrow entry (forward, dQ)
    narrow_flags: torch.Tensor  # [n]
    # (dK/dV: its narrow entries are thin-row query sub-blocks, stored after the regular
    # entries in block / head / flags; items' narrow_start / narrow_end index them there)
    row_block: int
    rows_per_head: int
    n_narrow: int
    has_tail: bool = True       # some entry (or narrow entry) is flagged TAIL
    has_masked: bool = True     # some entry (or narrow entry) is not FULL (bit 0 clear)
    _counters: dict = field(default_factory=dict, compare=False, repr=False)

    def counters(self, batch: int, tiles: int) -> torch.Tensor:
        """int32 merge counters [n_merge * tiles * batch], zero between calls (the last
        program of each split row resets its own). One set per CUDA stream: calls on two
        streams may overlap without sharing them (a captured graph keeps its capture
        stream's). A walk without split rows gets one dummy, which its kernels never touch."""
        key = (batch, tiles, _stream_id(self.block.device) if self.items.n_merge else None)
        got = self._counters.get(key)
        if got is None:
            n = max(1, self.items.n_merge * tiles * batch)
            got = self._counters[key] = torch.zeros(n, dtype=torch.int32, device=self.block.device)
        return got


def _stream_id(device: torch.device) -> int:
    """The current stream of ``device`` as a number (0 off CUDA): the raw stream handle,
    read without building a torch.cuda.Stream (what Inductor's generated code calls; this
    runs on every launch of a walk with split rows)."""
    if device.type != "cuda":
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return torch.cuda.current_stream(device).cuda_stream
    return raw(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class KernelPlan:
    """Everything the generated kernels read besides q, k, v (one layout, device, group, tiles)."""

    fwd: Walk
    dq: Walk
    kv: Walk
    tables: torch.Tensor       # int8 [n_tables * T] (one dummy byte when there are none)
    dil: torch.Tensor          # [H] residue factor per head
    seg: torch.Tensor          # [H] class length per head
    permuted: bool
    group: int


def entry_flags(layout: Layout, pred: PredicatePlan) -> np.ndarray:
    """[nnz] int32 flag word of every forward entry (bit 0 FULL, bit 1 + i random term i)."""
    def build():
        flags = layout.full.astype(np.int32)
        if not pred.random_nodes:
            return flags
        bit_of = {r: 1 + i for i, r in enumerate(pred.random_nodes)}
        ctx, nb = layout.ctx, layout.nblocks
        for h, p in enumerate(layout.heads):
            nodes = {n for n in p.walk() if isinstance(n, ir.Random)}
            if not nodes:
                continue
            s, e = layout.indptr[h * nb], layout.indptr[(h + 1) * nb]
            qb, kb = layout.entry_qblock[s:e], layout.kblock[s:e].astype(np.int64)
            for node in nodes:
                bit = bit_of.get(replace(node, stream=None, heads=None))
                if bit is not None:
                    hit = node.classify(ctx, qb, kb) == FULL
                    flags[s:e] |= hit.astype(np.int32) << bit
        return flags
    return layout._cached(("triton_flags", pred.random_nodes), build)


def membership_tables(layout: Layout, pred: PredicatePlan) -> np.ndarray:
    """int8 [n_tables * T]: row i marks the tokens of ``pred.table_nodes[i]``."""
    if not pred.table_nodes:
        return np.zeros(1, np.int8)
    return layout._cached(("triton_tables", pred.table_nodes), lambda: np.concatenate(
        [_member(g, layout.seq_len) for g in pred.table_nodes]))


def _member(g: ir.Global, seq_len: int) -> np.ndarray:
    m = np.zeros(seq_len, np.int8)
    m[g.indices(seq_len)] = 1
    return m


@dataclass(frozen=True)
class Tiles:
    """Rows per kernel, in layout blocks: forward, dQ, dK/dV (1: one layout block)."""

    fwd: int = 1
    dq: int = 1
    kv: int = 1


def head_pad(head_dim: int) -> int:
    """The kernels' HEAD_PAD: the head dim rounded up to a power of two, at least 16 (the
    smallest tl.dot).

    >>> head_pad(64), head_pad(80), head_pad(8)
    (64, 128, 16)
    """
    return max(16, 1 << (head_dim - 1).bit_length())


def max_slots(layout: Layout, head_dim: int | None, itemsize: int, row_block: int) -> int | None:
    """Scratch slots that stay within SCRATCH_FRACTION of the output's bytes (per batch)."""
    if head_dim is None:
        return None
    pad = head_pad(head_dim)
    budget = SCRATCH_FRACTION * layout.num_heads * layout.seq_len * head_dim * itemsize
    return max(1, int(budget // (row_block * (pad + 2) * 4)))


def make_plan(layout: Layout, pred: PredicatePlan, device, group: int, split: int | None = None,
              tiles: Tiles = Tiles(), head_dim: int | None = None, itemsize: int = 2) -> KernelPlan:
    if layout.nnz >= 2 ** 31:
        raise ValueError(f"layout has {layout.nnz} blocks; the kernels index entries with int32")
    if not can_stack(pred):
        tiles = Tiles()
    klay = kernel_layout(layout, pred, group)
    t = lambda a: _dev(a, device)  # noqa: E731

    def walk(factor, indptr, block, flags, head=None, narrow=None, segments=None, thin=None):
        row_block = factor * klay.block
        counts = np.diff(indptr)
        s = split or choose_split(counts, max_slots(layout, head_dim, itemsize, row_block))
        n_ptr, n_block, n_flags = narrow if narrow is not None else (thin, np.zeros(0), np.zeros(0))
        n_narrow = int(n_block.size) if thin is None else int(thin[-1] - thin[0])
        n_flags64 = n_flags.astype(np.int64)
        has_tail = bool(np.any(flags & TAIL) or np.any(n_flags64 & TAIL))
        has_masked = bool(np.any((flags & 1) == 0) or np.any((n_flags64 & 1) == 0))
        return Walk(make_items(indptr, s, device, n_ptr, segments), t(block), t(flags & ~(COLUMN | ROW)),
                    None if head is None else t(head), t(n_block), t(n_flags), row_block,
                    -(-klay.nblocks // factor), n_narrow, has_tail, has_masked)

    walks = {}
    for name in ("fwd", "dq"):
        factor = getattr(tiles, name)
        if factor not in walks:
            regular, narrow = _stacked(klay, factor)
            *regular, segments = thin_rows(klay, *regular) if factor == 1 else (*regular, None)
            walks[factor] = walk(factor, *regular, narrow=narrow, segments=segments)
    kv = _kv(klay, group, tiles.kv)
    kv_ptr, kv_qb, kv_qh, kv_flags, kv_thin, kv_segments = (kv_walk_entries(klay, *kv) if tiles.kv == 1
                                                            else (*kv, None, None))
    return KernelPlan(
        fwd=walks[tiles.fwd], dq=walks[tiles.dq],
        kv=walk(tiles.kv, kv_ptr, kv_qb, kv_flags, kv_qh, segments=kv_segments, thin=kv_thin),
        tables=torch.as_tensor(membership_tables(layout, pred), device=device),
        dil=t(klay.dil), seg=t(klay.seg), permuted=klay.permuted, group=group,
    )


def order_mode(klay: KernelLayout, longest_tile: int, head_pad: int) -> int:
    """The kernels' ``PERMUTED`` constexpr: 0 token order; 1 residue order where every
    class holds at least ``longest_tile`` positions (a tile then spans at most two classes:
    tokens without a vector division) and rows of one head fit int32 offsets; 2 residue
    order otherwise (short classes of short sequences, or heads of 2^31 elements).

    >>> import patterncc
    >>> from patterncc import codegen
    >>> lay = patterncc.compile("window(256) | dilate(2)").layout(4096, 2)
    >>> klay = kernel_layout(lay, codegen.analyse(lay.pattern))
    >>> order_mode(klay, 128, 64), order_mode(klay, 4096, 64)
    (1, 2)
    """
    if not klay.permuted:
        return 0
    shortest = int(klay.seg[klay.dil > 1].min())
    fits = (klay.seq_len + 1) * head_pad < 2 ** 31
    return 1 if FAST_RESIDUE_TOKENS and shortest >= longest_tile and fits else 2


def class_gap(klay: KernelLayout, pred: PredicatePlan, enabled: bool | None = None) -> int:
    """The kernels' ``CLASS_GAP`` constexpr: the gap of the pattern's class coordinates when
    its PARTIAL tiles can be tested on them (``enabled``, default CLASS_MASK): a residue-order
    layout whose every head runs in the order its predicate group assumes (a head left in
    token order by GQA or an unsupported term breaks that), with coordinates inside int32.
    0 otherwise: the kernels test tokens.

    >>> import patterncc
    >>> from patterncc import codegen
    >>> def gap(src, t, g=1):
    ...     lay = patterncc.compile(src).layout(t, 2)
    ...     pred = codegen.analyse(lay.pattern)
    ...     return class_gap(kernel_layout(lay, pred, g), pred, enabled=True)
    >>> gap("window(256) | dilate(2)", 4096), gap("window(256) | dilate(2, heads=[1])", 4096)
    (256, 256)
    >>> gap("window(256) | dilate(2, heads=[1])", 4096, g=2), gap("window(256)", 4096)  # GQA keeps token order
    (0, 0)
    """
    if not (CLASS_MASK if enabled is None else enabled) or not klay.permuted or not pred.class_gap:
        return 0
    if any(int(klay.dil[h]) != pred.factor(h) for h in range(klay.num_heads)):
        return 0
    if int((klay.dil.astype(np.int64) * (klay.seg + pred.class_gap)).max()) >= 2 ** 31:
        return 0  # the largest class coordinate, (d - 1) * (seg + gap) + seg - 1, must fit int32
    return pred.class_gap


def residue_stride(klay: KernelLayout) -> int | None:
    """The residue factor d when a residue-order walk can fetch its tiles as strided boxes
    of a [B * heads, T / d, d, D] view (class c's rows are tokens c, c + d, ...): every head
    permuted by the same d, and d divides T, so each class holds exactly T / d tokens. The
    classes are padded to a multiple of the layout block (L >= T / d positions), so a tile
    never spans two classes, and the box rows past T / d read as zeros (empty slots). None
    otherwise (the kernels then load residue-order rows by pointers).

    >>> import patterncc
    >>> from patterncc import codegen
    >>> def stride(src, t):
    ...     lay = patterncc.compile(src).layout(t, 2)
    ...     return residue_stride(kernel_layout(lay, codegen.analyse(lay.pattern)))
    >>> stride("window(256) | dilate(2)", 4096), stride("window(256) | dilate(2)", 4095)
    (2, None)
    >>> stride("window(256) | dilate(2, heads=[1])", 4096), stride("window(256)", 4096)
    (None, None)
    """
    d = int(klay.dil[0])
    if d <= 1 or (klay.dil != d).any() or klay.tokens % d or (klay.seg % klay.block).any():
        return None
    return d


def plan_for(layout: Layout, pred: PredicatePlan, device, group: int = 1, split: int | None = None,
             tiles: Tiles = Tiles(), head_dim: int | None = None, itemsize: int = 2) -> KernelPlan:
    """The cached kernel plan of ``layout`` on ``device`` for GQA group size ``group``.

    ``tiles`` stacks layout blocks into taller kernel rows; ``head_dim`` / ``itemsize``
    (of q) size the scratch budget of split rows (None: no budget).
    """
    device = torch.device(device)
    key = ("triton_plan", str(device), int(group), split, tiles, head_dim, itemsize,
           pred.random_nodes, pred.table_nodes, switches())
    return layout._cached(key, lambda: make_plan(layout, pred, device, group, split, tiles,
                                                 head_dim, itemsize))


def _dev(a: np.ndarray, device) -> torch.Tensor:
    """int32 device tensor with at least one element (kernels never read the padding)."""
    a = np.asarray(a, np.int32)
    if a.size == 0:
        a = np.zeros(1, np.int32)
    return torch.as_tensor(a, device=device)
