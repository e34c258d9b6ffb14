"""FlexAttention interop: run a patterncc pattern through ``torch.nn.attention.flex_attention``.

* :func:`mask_mod` -- the pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: a
  pointwise torch expression of the pattern's token predicate (so ``torch.compile`` can
  fuse it), one per distinct head behaviour, selected by ``h`` through a small lookup
  table. Random blocks are looked up in per-head ``[H, nblocks]`` tables of the drawn key
  blocks, one per draw of a row (the same draws the layout and the kernels use); only
  more than 16 draws per row fall back to an ``[H, nb, nb]`` table. No ``T x T`` array.
* :func:`block_mask` -- the layout as a ``BlockMask``: FULL layout blocks become Flex's
  full blocks (no ``mask_mod`` call), PARTIAL blocks its partial blocks, with the
  ``mask_mod`` above. Flex's block size is the layout's block size.

``flex_attention(q, k, v, block_mask=block_mask(op, T, H), enable_gqa=True)`` then gives
the same output as ``op(q, k, v)`` (up to floating point), which the tests check.

Notes:
    * Flex stores the kv block indices dense-padded per query-block row
      (``[1, H, nb, nb]`` int32); that is Flex's format, so it is built here (from the
      layout's CSR, without a token-level mask).
    * On the GPU, Flex's compiled kernels need the sparse block size to be a multiple of
      their tile size; with layout blocks under 128 pass e.g.
      ``kernel_options={"BLOCK_M": 64, "BLOCK_N": 64}`` to ``flex_attention``.
    * Tables (global membership, random draws) live on ``device``; build the mask on the
      device the attention runs on.

Example:
    >>> import torch, patterncc
    >>> from torch.nn.attention.flex_attention import flex_attention
    >>> from patterncc.interop import block_mask
    >>> op = patterncc.compile("window(16) | global([0]) | random(32, seed=1)", block_size=32)
    >>> q = k = v = torch.randn(1, 2, 128, 16)
    >>> bm = block_mask(op, seq_len=128, num_heads=2)
    >>> out = flex_attention(q, k, v, block_mask=bm)
    >>> torch.allclose(out, op(q, k, v), atol=1e-5)
    True
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from . import ir
from .ir import Ctx
from .layout import Layout

__all__ = ["mask_mod", "block_mask"]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_MAX_RANGE_TERMS = 8  # a global index set with more runs than this becomes a lookup table
_MAX_RANDOM_TERMS = 16  # more random draws per row than this use an [H, nb, nb] lookup table


def mask_mod(pattern, seq_len: int, num_heads: int, block_size: int = 64, *, device=None) -> MaskMod:
    """A FlexAttention ``mask_mod`` equivalent to ``pattern`` at (seq_len, num_heads, block_size).

    ``pattern`` is a pattern expression or IR (``op.pattern``). ``block_size`` matters for
    ``random`` (whole blocks of the layout's size are drawn). The returned callable takes
    ``(b, h, q_idx, kv_idx)`` integer tensors (any broadcastable shapes; it also works
    under ``torch.vmap`` as Flex calls it) and returns a bool tensor.

    >>> import torch
    >>> mm = mask_mod("window(1) | global([0])", seq_len=6, num_heads=1, block_size=16)
    >>> t = torch.arange(6)
    >>> mm(torch.tensor(0), torch.tensor(0), t[:, None], t[None, :]).int()
    tensor([[1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 1, 1, 1, 0],
            [1, 0, 0, 1, 1, 1],
            [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    if isinstance(pattern, str):
        from .parser import parse
        pattern = parse(pattern)
    if not isinstance(pattern, ir.Pattern):
        raise ValueError(f"pattern must be a pattern source string or a patterncc Pattern, got "
                         f"{type(pattern).__name__} (for an op use block_mask(op, ...) or op.pattern)")
    from .layout import _check_sizes
    _check_sizes(seq_len, num_heads, block_size)
    pattern.check_heads(num_heads)
    heads = tuple(pattern.specialize(h) for h in range(num_heads))
    return _mask_mod_for_heads(heads, Ctx(int(seq_len), int(block_size)), _device(device))


def block_mask(op_or_layout, seq_len: int | None = None, num_heads: int | None = None, *,
               layer: int | None = None, device=None):
    """The ``flex_attention`` ``BlockMask`` of an op's (or a layout's) block-sparse layout.

    ``op_or_layout`` is a :class:`~patterncc.SparseAttention` (then ``seq_len`` is needed,
    ``num_heads`` unless the source sets ``heads =``; ``layer=`` for per-layer programs) or
    a :class:`~patterncc.Layout` (its own sizes are used). FULL blocks become Flex full
    blocks, PARTIAL blocks partial blocks evaluated with :func:`mask_mod`;
    ``BLOCK_SIZE`` is the layout block size and ``seq_lengths`` is (T, T). The mask has
    batch size 1 (it broadcasts over the batch) and one entry per query head.

    >>> import patterncc
    >>> op = patterncc.compile("window(16) & causal", block_size=16)
    >>> bm = block_mask(op, seq_len=64, num_heads=1)
    >>> bm.to_dense()[0, 0].tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    >>> bm.full_kv_num_blocks.sum().item(), bm.kv_num_blocks.sum().item()  # FULL, PARTIAL
    (0, 7)
    """
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(op_or_layout, Layout):
        lay = op_or_layout
        for name, v, have in (("seq_len", seq_len, lay.seq_len), ("num_heads", num_heads, lay.num_heads)):
            if v is not None and v != have:
                raise ValueError(f"{name}={v} disagrees with the layout's {name}={have}")
        if layer is not None:
            raise ValueError("layer= applies to an op, not to a layout")
    else:
        from .op import SparseAttention
        if not isinstance(op_or_layout, SparseAttention):
            raise ValueError(f"block_mask takes a patterncc SparseAttention op or a Layout, got "
                             f"{type(op_or_layout).__name__}")
        if seq_len is None:
            raise ValueError("seq_len is needed to build the block mask of an op")
        lay = op_or_layout.layout(seq_len, num_heads, layer=layer)
    dev = _device(device)
    h, nb = lay.num_heads, lay.nblocks
    rows = lay.entry_head.astype(np.int64) * nb + lay.entry_qblock

    def ordered(select: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r, kb = rows[select], lay.kblock[select].astype(np.int32)
        counts = np.bincount(r, minlength=h * nb)
        start = np.cumsum(counts) - counts
        slot = np.arange(r.size) - start[r]  # entries are sorted by (row, key block)
        idx = np.zeros((h * nb, nb), np.int32)
        idx[r, slot] = kb
        num = torch.as_tensor(counts.astype(np.int32).reshape(1, h, nb), device=dev)
        return num, torch.as_tensor(idx.reshape(1, h, nb, nb), device=dev)

    kv_num, kv_idx = ordered(~lay.full)
    full_num, full_idx = ordered(lay.full)
    mm = _mask_mod_for_heads(lay.heads, lay.ctx, dev)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=lay.block_size,
                                    mask_mod=mm, seq_lengths=(lay.seq_len, lay.seq_len))


# ----------------------------------------------------------------------------------------
# lowering the IR to torch expressions


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _strip_streams(p: ir.Pattern) -> ir.Pattern:
    """The head's pattern with its random draws' head stream removed (its "shape")."""
    if isinstance(p, ir.Random):
        return replace(p, stream=None)
    if isinstance(p, ir.Union):
        return ir.union(_strip_streams(t) for t in p.terms)
    if isinstance(p, ir.Intersect):
        return ir.intersect(_strip_streams(t) for t in p.terms)
    return p


def _mask_mod_for_heads(heads: tuple[ir.Pattern, ...], ctx: Ctx, device: torch.device) -> MaskMod:
    num_heads = len(heads)
    shapes: dict[ir.Pattern, int] = {}
    group = [shapes.setdefault(_strip_streams(p), len(shapes)) for p in heads]
    lower = _Lowering(ctx, num_heads, device)
    fns = [lower(shape) for shape in shapes]
    group_of = torch.as_tensor(group, dtype=torch.int64, device=device)

    if len(fns) == 1:
        only = fns[0]

        def mask_mod_fn(b, h, q_idx, kv_idx):
            return only(h, q_idx, kv_idx)
    else:
        def mask_mod_fn(b, h, q_idx, kv_idx):
            g = group_of[h]
            out = fns[0](h, q_idx, kv_idx) & (g == 0)
            for i in range(1, len(fns)):
                out = out | (fns[i](h, q_idx, kv_idx) & (g == i))
            return out

    mask_mod_fn.__doc__ = "patterncc mask_mod: " + "; ".join(
        f"heads {[h for h, g in enumerate(group) if g == i]}: {s}" for s, i in shapes.items())
    return mask_mod_fn


class _Lowering:
    """Turns a head-free (stream-free) pattern into ``fn(h, q, k) -> bool tensor``."""

    def __init__(self, ctx: Ctx, num_heads: int, device: torch.device):
        self.ctx, self.num_heads, self.device = ctx, num_heads, device
        self.t = ctx.seq_len

    def __call__(self, node: ir.Pattern):
        t = self.t
        if isinstance(node, ir.Union):
            parts = [self(n) for n in node.terms]

            def union(h, q, k):
                out = parts[0](h, q, k)
                for f in parts[1:]:
                    out = out | f(h, q, k)
                return out
            return union
        if isinstance(node, ir.Intersect):
            parts = [self(n) for n in node.terms]

            def intersect(h, q, k):
                out = parts[0](h, q, k)
                for f in parts[1:]:
                    out = out & f(h, q, k)
                return out
            return intersect
        if isinstance(node, ir.Window):
            reach, dil = min(node.reach, t), node.dilation
            if dil == 1:
                return lambda h, q, k: ((q - k) <= reach) & ((k - q) <= reach)
            return lambda h, q, k: ((q - k) <= reach) & ((k - q) <= reach) & (torch.remainder(q - k, dil) == 0)
        if isinstance(node, ir.Causal):
            return lambda h, q, k: k <= q
        if isinstance(node, ir.Dense):
            return lambda h, q, k: (q >= 0) | (k >= 0)
        if isinstance(node, ir.Empty):
            return lambda h, q, k: (q < 0) & (k < 0)
        if isinstance(node, ir.Sink):
            n = min(node.n, t)
            return lambda h, q, k: (k < n) | (q < 0)
        if isinstance(node, ir.Strided):
            s = node.s
            if s >= t:  # only q == k has a difference that is a multiple of s
                return lambda h, q, k: q == k
            return lambda h, q, k: torch.remainder(q - k, s) == 0
        if isinstance(node, ir.Block):
            b, width = min(node.b, t), node.width
            return lambda h, q, k: torch.abs(torch.div(q, b, rounding_mode="floor")
                                             - torch.div(k, b, rounding_mode="floor")) <= width
        if isinstance(node, ir.Global):
            member = self._membership(node)
            return lambda h, q, k: member(q) | member(k)
        if isinstance(node, ir.Random):
            return self._random(node)
        raise NotImplementedError(f"no FlexAttention lowering for the IR node {type(node).__name__} ({node}); "
                                  f"specialise the pattern per head first")

    def _membership(self, node: ir.Global):
        idx = node.indices(self.t)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts, stops = idx[np.r_[0, breaks]], idx[np.r_[breaks - 1, idx.size - 1]] + 1
        if idx.size == 0:
            return lambda x: x < 0
        if starts.size <= _MAX_RANGE_TERMS:
            runs = list(zip(starts.tolist(), stops.tolist()))

            def in_runs(x):
                out = (x >= runs[0][0]) & (x < runs[0][1])
                for a, b in runs[1:]:
                    out = out | ((x >= a) & (x < b))
                return out
            return in_runs
        table = torch.zeros(self.t, dtype=torch.bool, device=self.device)
        table[torch.as_tensor(np.array(idx), device=self.device)] = True
        last = self.t - 1
        return lambda x: table[torch.clamp(x, 0, last)]

    def _random(self, node: ir.Random):
        ctx, bs, nb = self.ctx, self.ctx.block, self.ctx.nblocks
        draws = np.stack([replace(node, stream=h).chosen(ctx) for h in range(self.num_heads)])  # [H, nb, r]
        last = nb - 1
        per_row = draws.shape[-1]
        # Compiled Flex lowers mask_mod as a pointwise expression (no reductions), so the
        # r draws of a row are compared one by one; many draws use an [H, nb, nb] table.
        if per_row > _MAX_RANDOM_TERMS:
            hit = np.zeros((self.num_heads, nb, nb), bool)
            np.put_along_axis(hit, draws, True, axis=-1)
            dense = torch.as_tensor(hit, device=self.device)

            def random_table(h, q, k):
                qb = torch.clamp(torch.div(q, bs, rounding_mode="floor"), 0, last)
                return dense[h, qb, torch.clamp(torch.div(k, bs, rounding_mode="floor"), 0, last)]
            return random_table
        cols = [torch.as_tensor(np.ascontiguousarray(draws[..., j]), device=self.device) for j in range(per_row)]

        def random_blocks(h, q, k):
            qb = torch.clamp(torch.div(q, bs, rounding_mode="floor"), 0, last)
            kb = torch.div(k, bs, rounding_mode="floor")
            out = cols[0][h, qb] == kb
            for c in cols[1:]:
                out = out | (c[h, qb] == kb)
            return out
        return random_blocks
