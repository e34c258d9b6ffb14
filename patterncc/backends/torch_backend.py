"""Block-sparse attention in plain PyTorch: the CPU path (and a GPU fallback).

The rows of the layout are cut into *work items* of at most ``chunk`` key blocks each, so
a heavy row (a global query attending every block) becomes several items of the same
width as everyone else's instead of padding every row to the longest one. Each item
gathers only its key blocks, computes masked scores for them, and the items of one row
are merged by log-sum-exp. Memory is O(touched blocks x block^2); there is no T x T
tensor and no Python loop over blocks. Backward is PyTorch autograd through these ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import Layout


@dataclass(frozen=True)
class TorchPlan:
    """Work items of a layout, as tensors on one device."""

    item_row: torch.Tensor  # [I] row id h * nb + qb of each item
    item_entry: torch.Tensor  # [I, C] forward entry per slot, -1 for padding
    entry_kblock: torch.Tensor  # [nnz]
    entry_mask: torch.Tensor  # [nnz + 1, B, B] bool; the last one (all False) pads
    chunk: int


def choose_chunk(counts: np.ndarray) -> int:
    """Item width: wide enough for typical rows, so only heavy rows are split."""
    nonzero = counts[counts > 0]
    if nonzero.size == 0:
        return 1
    return int(np.clip(np.percentile(nonzero, 90), 1, 64))


def make_plan(layout: Layout, device: torch.device) -> TorchPlan:
    counts = np.diff(layout.indptr)
    chunk = choose_chunk(counts)
    items_per_row = -(-counts // chunk)
    item_row = np.repeat(np.arange(counts.size), items_per_row)
    first_item = np.cumsum(items_per_row) - items_per_row
    slot = (np.arange(item_row.size) - np.repeat(first_item, items_per_row))
    start = layout.indptr[item_row] + slot * chunk
    stop = layout.indptr[item_row + 1]
    idx = start[:, None] + np.arange(chunk)[None, :]
    item_entry = np.where(idx < stop[:, None], idx, -1)
    masks = layout.partial_masks()
    pad = np.zeros((1,) + masks.shape[1:], bool)
    return TorchPlan(
        item_row=torch.as_tensor(item_row, device=device),
        item_entry=torch.as_tensor(item_entry, device=device),
        entry_kblock=torch.as_tensor(layout.kblock.astype(np.int64), device=device),
        entry_mask=torch.as_tensor(np.concatenate([masks, pad]), device=device),
        chunk=chunk,
    )


def plan_for(layout: Layout, device: torch.device) -> TorchPlan:
    key = ("torch_plan", str(device))
    return layout._cached(key, lambda: make_plan(layout, device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float) -> torch.Tensor:
    """out [B, H, T, D] for q [B, H, T, D] and k, v [B, H_kv, T, D] (validated by the caller)."""
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    b, h, t, d = q.shape
    hkv = k.shape[1]
    bs, nb = layout.block_size, layout.nblocks
    plan = plan_for(layout, q.device)
    if plan.item_row.numel() == 0:
        return torch.zeros_like(q, dtype=out_dtype) + 0 * (q.sum() + k.sum() + v.sum())

    pad = nb * bs - t
    def blocks(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(x.shape[0], x.shape[1], nb, bs, x.shape[-1])

    qb_, kb_, vb_ = blocks(q), blocks(k), blocks(v)
    row = plan.item_row
    head, qblk = row // nb, row % nb
    kv_head = head // (h // hkv)
    entry = plan.item_entry.clamp(min=0)
    kblk = plan.entry_kblock[entry]  # [I, C]
    valid = plan.item_entry >= 0
    mask = plan.entry_mask[torch.where(valid, plan.item_entry, plan.entry_mask.shape[0] - 1)]  # [I, C, B, B]
    mask = mask.permute(0, 2, 1, 3).reshape(row.numel(), bs, plan.chunk * bs)  # [I, Bq, C*Bk]

    qi = qb_[:, head, qblk]  # [Bt, I, Bq, D]
    ki = kb_[:, kv_head[:, None], kblk].flatten(2, 3)  # [Bt, I, C*Bk, D]
    vi = vb_[:, kv_head[:, None], kblk].flatten(2, 3)
    s = torch.einsum("bimd,bind->bimn", qi, ki) * scale
    s = s.masked_fill(~mask, float("-inf"))
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    m = s.amax(-1).detach()  # [Bt, I, Bq]; -inf where an item row has no allowed key
    p = torch.exp(s - torch.where(torch.isfinite(m), m, zero)[..., None])
    l_item = p.sum(-1)
    o_item = torch.einsum("bimn,bind->bimd", p, vi)

    # Merge the items of each row: rescale to the row's largest max, then sum.
    rows = h * nb
    m_row = torch.full((b, rows, bs), float("-inf"), dtype=m.dtype, device=m.device)
    m_row = m_row.scatter_reduce(1, row.view(1, -1, 1).expand_as(m), m, "amax")
    m_row = torch.where(torch.isfinite(m_row), m_row, zero)
    w = torch.exp(m - m_row[:, row])
    l_row = torch.zeros((b, rows, bs), dtype=m.dtype, device=m.device).index_add(1, row, w * l_item)
    o_row = torch.zeros((b, rows, bs, d), dtype=m.dtype, device=m.device).index_add(1, row, w[..., None] * o_item)
    empty = l_row == 0  # no key reaches the row (a NaN l is a row that read a NaN: kept)
    out = o_row / torch.where(empty, torch.ones((), dtype=m.dtype, device=m.device), l_row)[..., None]
    # Rows no key reaches are 0 even when a value in a block they share is not finite
    # (their p is 0, but 0 x NaN is NaN).
    out = torch.where(empty[..., None], torch.zeros((), dtype=m.dtype, device=m.device), out)
    out = out.view(b, h, nb * bs, d)[:, :, :t]
    return out.to(out_dtype)
