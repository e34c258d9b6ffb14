"""Lowering: a Layout -> the kernel plan the generated Triton kernels walk.

The plan is a handful of int32 device tensors, built on the host with NumPy (no Python
loop over blocks) and cached on the layout per (device, GQA group, split):

* per forward entry (CSR order): key block and a flag word: bit 0 FULL, bit ``1 + i``
  "random term i of the predicate plan drew this block" (evaluated with the Random node's
  ``classify`` for the entry's head, so PARTIAL blocks of e.g. ``random(64) & causal`` know
  whether the random term holds);
* the *kv index*: for every kv head and key block, the (query head, query block, flags)
  entries of all query heads sharing that kv head (the layout's transposed CSR, regrouped
  for GQA/MQA) -- what the dK/dV kernel walks;
* work items for both walks: runs of at most ``split`` entries of one row. Rows longer
  than ``split`` (a global row touching every block) become several items writing
  partials to scratch slots, merged afterwards; every row, even an empty one, has an item
  so every output row is written;
* int8 membership tables [n_tables, T] for the predicate's large global index sets.

Example:
    >>> import patterncc, torch
    >>> from patterncc import codegen, lowering
    >>> from patterncc.layout import get_layout
    >>> lay = get_layout(patterncc.parse("window(16) | global([0])"), 256, 2, 16)
    >>> plan = lowering.plan_for(lay, codegen.analyse(lay.pattern), torch.device("cpu"), group=1, split=4)
    >>> plan.fwd.n_items > 2 * lay.nblocks, plan.fwd.n_merge   # rows 0 of both heads are split
    (True, 2)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from . import ir
from .codegen import PredicatePlan
from .ir import FULL
from .layout import Layout

MIN_SPLIT = 16  # never cut rows shorter than this many blocks


@dataclass(frozen=True)
class WorkItems:
    """Runs of at most ``split`` entries of one row (device int32 tensors)."""

    row: torch.Tensor     # [I] row id (head * nb + block)
    start: torch.Tensor   # [I] first entry
    end: torch.Tensor     # [I] one past the last entry
    slot: torch.Tensor    # [I] scratch slot, -1 when the item is its whole row
    merge_row: torch.Tensor    # [R] rows cut into several items
    merge_start: torch.Tensor  # [R] their first scratch slot
    merge_end: torch.Tensor    # [R] one past their last slot
    n_items: int
    n_slots: int
    n_merge: int
    split: int


@dataclass(frozen=True)
class KernelPlan:
    """Everything the generated kernels read besides q, k, v (one layout, device, group)."""

    fwd: WorkItems             # over the forward CSR (forward and dQ)
    kblock: torch.Tensor       # [nnz] key block of each forward entry
    flags: torch.Tensor        # [nnz] flag word of each forward entry
    kv: WorkItems              # over the kv index (dK/dV)
    kv_qblock: torch.Tensor    # [nnz] query block of each kv-index entry
    kv_qhead: torch.Tensor     # [nnz] query head of each kv-index entry
    kv_flags: torch.Tensor     # [nnz]
    tables: torch.Tensor       # int8 [n_tables * T] (one dummy byte when there are none)
    group: int


def choose_split(counts: np.ndarray) -> int:
    """Longest run of entries one program walks: about twice the mean non-empty row.

    Balanced layouts are never split; a row far above the mean (a global query, a global
    key column in the backward) is cut into pieces of that size.
    """
    nonzero = counts[counts > 0]
    if nonzero.size == 0:
        return MIN_SPLIT
    return int(max(MIN_SPLIT, np.ceil(2 * nonzero.mean())))


def make_items(indptr: np.ndarray, split: int, device) -> WorkItems:
    counts = np.diff(indptr)
    per_row = np.maximum(1, -(-counts // split))
    n_items = int(per_row.sum())
    row = np.repeat(np.arange(counts.size, dtype=np.int64), per_row)
    first_item = np.cumsum(per_row) - per_row
    piece = np.arange(n_items, dtype=np.int64) - np.repeat(first_item, per_row)
    start = indptr[row] + piece * split
    end = np.minimum(start + split, indptr[row + 1])
    cut = per_row > 1
    in_cut = np.repeat(cut, per_row)
    slot = np.full(n_items, -1, np.int64)
    slot[in_cut] = np.arange(int(in_cut.sum()))
    merge_row = np.flatnonzero(cut)
    merge_end = np.cumsum(per_row[cut])
    merge_start = merge_end - per_row[cut]
    t = lambda a: _dev(a, device)  # noqa: E731
    return WorkItems(t(row), t(start), t(end), t(slot), t(merge_row), t(merge_start), t(merge_end),
                     n_items, int(in_cut.sum()), int(merge_row.size), split)


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


def kv_index(layout: Layout, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The transposed index regrouped by kv head: rows ``kv_head * nb + key_block``.

    Returns (indptr [H_kv * nb + 1], query block [nnz], query head [nnz], forward entry [nnz]);
    within a row, entries go by query head, then query block.
    """
    nb, h = layout.nblocks, layout.num_heads
    t_rows = np.repeat(np.arange(h * nb, dtype=np.int64), np.diff(layout.t_indptr))
    qhead, kb = t_rows // nb, t_rows % nb
    kv_row = (qhead // group) * nb + kb
    order = np.lexsort((layout.t_qblock, qhead, kv_row))  # stable on the sorted t-order
    indptr = np.zeros((h // group) * nb + 1, np.int64)
    np.cumsum(np.bincount(kv_row, minlength=(h // group) * nb), out=indptr[1:])
    return indptr, layout.t_qblock[order].astype(np.int64), qhead[order], layout.t_entry[order]


def make_plan(layout: Layout, pred: PredicatePlan, device, group: int,
              split: int | None = None) -> KernelPlan:
    if layout.nnz >= 2 ** 31:
        raise ValueError(f"layout has {layout.nnz} blocks; the kernels index entries with int32")
    flags = entry_flags(layout, pred)
    counts = np.diff(layout.indptr)
    kv_ptr, kv_qb, kv_qh, kv_entry = kv_index(layout, group)
    kv_counts = np.diff(kv_ptr)
    fwd = make_items(layout.indptr, split or choose_split(counts), device)
    kv = make_items(kv_ptr, split or choose_split(kv_counts), device)
    return KernelPlan(
        fwd=fwd, kblock=_dev(layout.kblock, device), flags=_dev(flags, device),
        kv=kv, kv_qblock=_dev(kv_qb, device), kv_qhead=_dev(kv_qh, device),
        kv_flags=_dev(flags[kv_entry], device),
        tables=torch.as_tensor(membership_tables(layout, pred), device=device),
        group=group,
    )


def plan_for(layout: Layout, pred: PredicatePlan, device, group: int = 1,
             split: int | None = None) -> KernelPlan:
    """The cached kernel plan of ``layout`` on ``device`` for GQA group size ``group``."""
    device = torch.device(device)
    key = ("triton_plan", str(device), int(group), split, pred.random_nodes, pred.table_nodes)
    return layout._cached(key, lambda: make_plan(layout, pred, device, group, split))


def _dev(a: np.ndarray, device) -> torch.Tensor:
    """int32 device tensor with at least one element (kernels never read the padding)."""
    a = np.asarray(a, np.int32)
    if a.size == 0:
        a = np.zeros(1, np.int32)
    return torch.as_tensor(a, device=device)
