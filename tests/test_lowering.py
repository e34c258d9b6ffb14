"""The lowering: kernel order (residue permutation), stacked rows, kv index, work items.

Everything here is host-side NumPy; the kernels that walk these plans are checked against
the float64 reference in tests/test_triton_kernels.py. The checks rebuild what a plan must
mean from the token mask (small T) and compare.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterncc
from patterncc import codegen, ir, lowering
from patterncc.ir import FULL
from patterncc.layout import get_layout
from strategies import layout_cases


def _klay(src, t, h, bs, group=1):
    lay = get_layout(patterncc.parse(src), t, h, bs)
    pred = codegen.analyse(lay.pattern)
    return lay, pred, lowering.kernel_layout(lay, pred, group)


def _kernel_mask(lay, klay, head):
    """[P, P] bool over kernel positions: the pattern on the tokens at those positions
    (False where a position holds no token)."""
    p = np.arange(klay.seq_len)
    d, seg = int(klay.dil[head]), int(klay.seg[head])
    if d > 1:
        assert seg == ir.residue_length(lay.seq_len, d, klay.block)  # classes padded to the block
    tok = ir.residue_token(p, lay.seq_len, d, klay.block) if d > 1 else np.where(p < lay.seq_len, p, lay.seq_len)
    valid = tok < lay.seq_len
    tc = np.minimum(tok, lay.seq_len - 1)
    allowed = lay.heads[head].allowed(lay.ctx, tc[:, None], tc[None, :])
    return allowed & valid[:, None] & valid[None, :], valid, seg


def _check_kernel_layout(lay, klay):
    """Every allowed pair lies in a listed block; FULL blocks allow every real pair; the
    TAIL bit is set exactly on blocks holding positions that are not tokens."""
    bs, nb = klay.block, klay.nblocks
    for head in range(lay.num_heads):
        mask, valid, _ = _kernel_mask(lay, klay, head)
        pad = nb * bs - klay.seq_len
        mask = np.pad(mask, ((0, pad), (0, pad)))
        valid = np.pad(valid, (0, pad))
        blocks = mask.reshape(nb, bs, nb, bs).any((1, 3))
        s, e = klay.indptr[head * nb], klay.indptr[(head + 1) * nb]
        qb = np.repeat(np.arange(nb), np.diff(klay.indptr[head * nb:(head + 1) * nb + 1]))
        kb, fl = klay.kblock[s:e], klay.flags[s:e]
        listed = np.zeros((nb, nb), bool)
        listed[qb, kb] = True
        assert not (blocks & ~listed).any(), "an allowed pair lies in an unlisted block"
        vb = valid.reshape(nb, bs)
        for q, k, f in zip(qb, kb, fl):
            tile = mask[q * bs:(q + 1) * bs, k * bs:(k + 1) * bs]
            real = vb[q][:, None] & vb[k][None, :]
            if f & 1:
                assert tile[real].all(), f"FULL block ({q}, {k}) of head {head} masks a real pair"
            assert bool(f & lowering.TAIL) == (not vb[k].all()), (q, k, f)


@pytest.mark.parametrize("src,t,h,bs", [
    ("window(16) | dilate(2)", 200, 2, 16),
    ("window(16) | dilate(2)", 201, 2, 16),               # odd T: class 1 is one token short
    ("window(6) | dilate(3)", 100, 1, 16),                # two short classes
    ("window(5) | global([0, 7, -1]) | dilate(2)", 150, 2, 32),
    ("(window(8) & causal) | dilate(2)", 130, 1, 16),
    ("window(4) | dilate(2, heads=[1])", 120, 3, 16),      # heads in either order
    ("window(8) | strided(32)", 160, 1, 16),               # no dilation: token order, tail only
    ("window(256) | dilate(4)", 1000, 1, 64),
])
def test_kernel_layout_covers_the_pattern_exactly(src, t, h, bs):
    lay, _, klay = _klay(src, t, h, bs)
    _check_kernel_layout(lay, klay)


def test_dilated_window_runs_in_residue_order_like_a_plain_window():
    lay, _, klay = _klay("window(256) | dilate(2)", 16384, 2, 64)
    assert klay.permuted and klay.dil.tolist() == [2, 2] and klay.seg.tolist() == [8192, 8192]
    assert klay.seq_len == 16384
    assert lay.full_fraction == 0.0           # token order: 17 blocks a row, every one PARTIAL
    plain = get_layout(patterncc.parse("window(256)"), 16384, 2, 64)  # 9 a row, 7 FULL
    assert klay.nnz <= plain.nnz + 2 * 2 * 9  # + the blocks straddling the two classes
    assert klay.full_fraction >= plain.full_fraction - 0.01


def test_residue_order_only_for_heads_that_have_one():
    lay, _, klay = _klay("window(4) | random(32, seed=1) | dilate(2, heads=[0]) | global([3], heads=[1])",
                         100, 3, 16)
    assert klay.dil.tolist() == [1, 1, 1]     # random blocks have no residue form
    lay, _, klay = _klay("window(4) | dilate(2, heads=[1])", 101, 3, 16)
    assert klay.dil.tolist() == [1, 2, 1] and klay.seq_len == 128  # classes of 51 and 50 tokens, each padded to 64


def test_gqa_heads_of_one_kv_head_share_an_order():
    src = "window(4) | dilate(2, heads=[0, 1, 2])"
    _, _, klay = _klay(src, 100, 4, 16, group=2)
    assert klay.dil.tolist() == [2, 2, 1, 1]  # heads 2 and 3 share kv head 1: token order
    _, _, mha = _klay(src, 100, 4, 16, group=1)
    assert mha.dil.tolist() == [2, 2, 2, 1]


def test_residue_factors_past_the_kernels_exact_class_index_stay_in_token_order(monkeypatch):
    """kernels/common.py _class_of is exact for class indices below MAX_RESIDUE_FACTOR."""
    monkeypatch.setattr(lowering, "MAX_RESIDUE_FACTOR", 3)
    _, _, klay = _klay("window(4) | dilate(2, heads=[0]) | dilate(3, heads=[1])", 120, 2, 16)
    assert klay.dil.tolist() == [2, 1]


@pytest.mark.parametrize("name", ["STACK_WASTE", "TALL_ONLY_GATHERED", "SCRATCH_FRACTION", "RESIDUE_ORDER",
                                  "THIN_COLUMNS", "THIN_ROWS", "THIN_KEYS", "FAST_RESIDUE_TOKENS", "SPLIT_FIRST",
                                  "SPREAD_PIECES",
                                  "SPREAD_SLOTS", "FOLD_SCALE", "RESIDUE_TMA", "MIN_SPLIT", "NARROW", "TALL_ROWS", "FLAT_ROWS", "CLASS_MASK",
                                  "MAX_RESIDUE_FACTOR"])
def test_every_plan_switch_is_in_the_cache_key(name, monkeypatch):
    """A plan or launch built under one value of a switch is not reused under another."""
    before = lowering.switches()
    value = getattr(lowering, name)
    monkeypatch.setattr(lowering, name, (not value) if isinstance(value, bool) else value * 2 + 1)
    assert lowering.switches() != before


def test_residue_order_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(lowering, "RESIDUE_ORDER", False)
    lay, _, klay = _klay("window(16) | dilate(2)", 200, 1, 16)
    assert not klay.permuted and klay.nnz == lay.nnz


@settings(max_examples=40, deadline=None)
@given(case=layout_cases(max_seq_len=150, max_heads=3, max_leaves=4))
def test_generated_kernel_layouts_cover_their_patterns(case):
    pattern, t, h, bs = case
    lay = get_layout(pattern, t, h, bs)
    _check_kernel_layout(lay, lowering.kernel_layout(lay, codegen.analyse(pattern)))


def _stacked_reference(klay, factor):
    """Stacked rows built naively: per (stacked row, key block) the union and its flags."""
    nb, h = klay.nblocks, klay.num_heads
    nr = -(-nb // factor)
    rows = {}
    for head in range(h):
        for qb in range(nb):
            r = head * nb + qb
            for e in range(klay.indptr[r], klay.indptr[r + 1]):
                key = (head * nr + qb // factor, int(klay.kblock[e]))
                rows.setdefault(key, {})[qb % factor] = int(klay.flags[e])
    out = {}
    for (row, kb), subs in rows.items():
        present = min(factor, nb - (row % nr) * factor)
        flags = int(all(subs.get(j, 0) & 1 for j in range(present)))
        if all(f & lowering.COLUMN for f in subs.values()):
            flags |= lowering.COLUMN  # only a global key column touches every stacked block
        for j, f in subs.items():
            flags |= (f & 1) << (1 + j)
            flags |= f & lowering.TAIL
        out[row, kb] = flags
    return out, h * nr


@pytest.mark.parametrize("src,t,bs,factor", [
    ("window(20) | global([0])", 300, 16, 2),
    ("window(20) | global([0])", 300, 16, 4),
    ("(window(30) & causal) | sink(3)", 257, 32, 2),
    ("block(16, width=1) | random(32, seed=3)", 200, 16, 4),  # top-level random: FULL blocks
    ("window(16) | dilate(2)", 301, 16, 2),
])
def test_stacked_rows_are_the_union_of_their_blocks(src, t, bs, factor):
    _, pred, klay = _klay(src, t, 2, bs)
    assert lowering.can_stack(pred)
    indptr, kb, flags = lowering.stacked_rows(klay, factor)
    ref, n_rows = _stacked_reference(klay, factor)
    assert indptr.size == n_rows + 1
    got = {}
    for r in range(n_rows):
        ks = kb[indptr[r]:indptr[r + 1]]
        assert (np.diff(ks) > 0).all(), "key blocks of a row must be sorted and distinct"
        for k, f in zip(ks, flags[indptr[r]:indptr[r + 1]]):
            got[r, int(k)] = int(f)
    assert got == ref


def test_random_terms_inside_intersections_never_stack():
    pred = codegen.analyse(patterncc.parse("(random(32, seed=1) & causal) | window(4)"))
    assert not lowering.can_stack(pred)
    lay = get_layout(pred.pattern, 200, 1, 16)
    plan = lowering.plan_for(lay, pred, "cpu", tiles=lowering.Tiles(4, 4, 4))
    assert plan.fwd.row_block == plan.kv.row_block == 16


def test_unstacked_kv_rows_keep_the_random_flag_bits():
    _, _, klay = _klay("sink(1) & random(1) & causal", 174, 1, 16)
    assert (klay.flags >> 1 & 1).any()
    ptr, qb, qh, flags = lowering.kv_rows(klay, 1, 1)
    assert sorted(flags.tolist()) == sorted(klay.flags.tolist())


@pytest.mark.parametrize("factor", [1, 2])
def test_kv_rows_group_query_heads_by_kv_head(factor):
    lay, _, klay = _klay("window(8) | strided(40, heads=[1, 2])", 160, 4, 16)
    ptr, qb, qh, flags = lowering.kv_rows(klay, 2, factor)
    nb = klay.nblocks
    nr = -(-nb // factor)
    rows = np.repeat(np.arange(2 * nr), np.diff(ptr))
    got = set(zip(rows.tolist(), qh.tolist(), qb.tolist()))
    fwd_rows = np.repeat(np.arange(4 * nb), np.diff(klay.indptr))
    want = {((h // 2) * nr + int(k) // factor, int(h), int(q))
            for h, q, k in zip(fwd_rows // nb, fwd_rows % nb, klay.kblock)}
    assert got == want and len(got) == rows.size
    for r in range(2 * nr):  # within a kv row: by query head, then query block
        key = qh[ptr[r]:ptr[r + 1]] * nb + qb[ptr[r]:ptr[r + 1]]
        assert (np.diff(key) > 0).all()


def test_entry_flags_mark_full_and_random_draws():
    p = patterncc.parse("(random(32, seed=5) & causal) | window(4)")
    lay = get_layout(p, 200, 2, 16)
    pred = codegen.analyse(p)
    flags = lowering.entry_flags(lay, pred)
    assert ((flags & 1) == lay.full).all()
    for h in range(2):
        node = next(n for n in lay.heads[h].walk() if isinstance(n, ir.Random))
        assert node.stream == h
        s, e = lay.indptr[h * lay.nblocks], lay.indptr[(h + 1) * lay.nblocks]
        hit = node.classify(lay.ctx, lay.entry_qblock[s:e], lay.kblock[s:e].astype(np.int64)) == FULL
        assert (((flags[s:e] >> 1) & 1) == hit).all()


def test_plan_is_cached_and_items_cover_every_entry_once(monkeypatch):
    monkeypatch.setattr(lowering, "THIN_ROWS", False)  # thin-row items: the thin coverage tests below
    layout = get_layout(patterncc.parse("window(16) | global([0])"), 300, 2, 16)
    pred = codegen.analyse(layout.pattern)
    plan = lowering.plan_for(layout, pred, "cpu", group=2, split=8)
    assert lowering.plan_for(layout, pred, "cpu", group=2, split=8) is plan
    for walk in (plan.fwd, plan.kv):
        it = walk.items
        start, end = it.start.numpy()[:it.n_items], it.end.numpy()[:it.n_items]
        assert (end - start <= 8).all()
        covered = np.zeros(int(walk.block.numel()), int)
        for s, e in zip(start, end):
            covered[s:e] += 1
        assert (covered == 1).all()
    it = plan.fwd.items
    assert it.n_merge == 2  # query block 0 of each head attends all 19 key blocks
    merged_rows = sorted(set(it.row.numpy()[it.merge.numpy() >= 0].tolist()))
    assert merged_rows == [0, layout.nblocks]
    slots = it.slot.numpy()[it.merge.numpy() >= 0]
    assert sorted(slots.tolist()) == list(range(it.n_slots))
    for m in range(it.n_merge):  # each split row owns a contiguous run of slots
        own = slots[it.merge.numpy()[it.merge.numpy() >= 0] == m]
        assert own.tolist() == list(range(int(it.merge_start[m]), int(it.merge_end[m])))


def test_heavy_rows_are_split_and_balanced_rows_are_not():
    lay = get_layout(patterncc.parse("window(256) | global([0])"), 16384, 2, 64)
    plan = lowering.plan_for(lay, codegen.analyse(lay.pattern), torch.device("cpu"), group=1)
    counts = np.diff(lay.indptr)
    assert plan.fwd.items.split < counts.max()
    assert plan.fwd.items.n_merge == 2  # the global query block of each head
    assert plan.kv.items.n_merge == 2   # the global key block of each head
    dense = get_layout(patterncc.parse("dense"), 1024, 1, 64)
    assert lowering.plan_for(dense, codegen.analyse(dense.pattern), "cpu").fwd.items.n_merge == 0


@pytest.mark.parametrize("split_first, spread", [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_split_first_puts_split_pieces_first_and_keeps_each_item(monkeypatch, split_first, spread):
    """Pieces of whole rows go first (with SPLIT_FIRST), whatever SPREAD_PIECES says."""
    lay = get_layout(patterncc.parse("window(256) | global([0])"), 8192, 2, 64)
    base = lowering.make_items(lay.indptr, 16, "cpu")
    monkeypatch.setattr(lowering, "SPLIT_FIRST", split_first)
    monkeypatch.setattr(lowering, "SPREAD_PIECES", spread)
    it = lowering.make_items(lay.indptr, 16, "cpu")
    cut = it.slot.numpy() >= 0
    assert cut[:it.n_slots].all() == split_first and cut.sum() == it.n_slots > 0
    rest = it.row.numpy()[~cut]
    assert (np.diff(rest) >= 0).all()  # the other items keep row order
    def items(w):
        return sorted(zip(*(a.tolist() for a in (w.row, w.start, w.end, w.slot, w.merge))))
    assert items(it) == items(base)  # the same items, only launched in another order


@pytest.mark.parametrize("spread, slots, t", [(0.0, 8, 65536), (0.5, 8, 65536), (0.8, 8, 65536),
                                              (0.8, 528, 16384)])
def test_thin_row_pieces_spread_over_the_first_part_of_the_launch_order(monkeypatch, spread, slots, t):
    """SPREAD_PIECES: a global query row's thin-row pieces come evenly over the first
    ``spread`` of the other items (0: first); the pieces of its whole row still come first.
    A launch too short for a late piece to end with it (two heads of 16K tokens on
    SPREAD_SLOTS = 528 programs) keeps them all first."""
    monkeypatch.setattr(lowering, "SPREAD_PIECES", spread)
    monkeypatch.setattr(lowering, "SPREAD_SLOTS", slots)
    pattern = patterncc.parse("window(256) | global([0])")
    lay = get_layout(pattern, t, 2, 64)
    it = lowering.plan_for(lay, codegen.analyse(pattern), "cpu").fwd.items
    thin, cut = it.thin.numpy() >= 0, it.slot.numpy() >= 0
    assert it.n_thin > 2 and (cut & ~thin).any()
    assert cut[:int((cut & ~thin).sum())].all() and not thin[:int((cut & ~thin).sum())].any()
    others = np.cumsum(~cut)[thin]  # ordinary items launched before each thin piece
    assert lowering.spread_fraction(it.split, int((it.end - it.start).numpy()[~cut].sum())) == (
        0.0 if slots == 528 else spread)
    spread = lowering.spread_fraction(it.split, int((it.end - it.start).numpy()[~cut].sum()))
    if spread == 0.0:
        assert (others == 0).all()
    else:
        assert others[0] == 0 and others[-1] < spread * (~cut).sum() and (np.diff(others) > 0).all()
        assert others[-1] > 0.9 * spread * (~cut).sum() * (it.n_thin - 1) / it.n_thin


@given(n_pieces=st.integers(0, 50), n_others=st.integers(0, 200), spread=st.floats(0.0, 1.0))
def test_spread_order_is_a_permutation_keeping_each_kinds_order(n_pieces, n_others, spread):
    pieces, others = np.arange(n_pieces), np.arange(n_pieces, n_pieces + n_others)
    order = lowering.spread_order(pieces, others, spread)
    assert sorted(order.tolist()) == list(range(n_pieces + n_others))
    is_piece = order < n_pieces
    assert (np.diff(order[is_piece]) > 0).all() and (np.diff(order[~is_piece]) > 0).all()
    if spread == 0.0:
        assert is_piece[:n_pieces].all()


@given(counts=st.lists(st.integers(0, 3000), min_size=1, max_size=60), budget=st.integers(1, 400))
def test_split_keeps_the_scratch_within_budget_when_it_can(counts, budget):
    counts = np.array(counts)
    split = lowering.choose_split(counts, budget)
    assert split >= lowering.MIN_SPLIT
    if split < counts.max():
        assert lowering._slots(counts, split) <= budget


def test_scratch_budget_bounds_split_rows_memory():
    src = "block(64, width=1) | global(0..128) | random(192, seed=1)"  # BigBird: 2 global rows per head
    lay = get_layout(patterncc.parse(src), 65536, 16, 64)
    pred = codegen.analyse(lay.pattern)
    plan = lowering.plan_for(lay, pred, "cpu", tiles=lowering.Tiles(2, 2, 2), head_dim=64, itemsize=2)
    for walk in (plan.fwd, plan.kv):
        scratch = walk.items.n_slots * walk.row_block * (64 + 2) * 4
        out_bytes = 16 * 65536 * 64 * 2
        assert scratch <= lowering.SCRATCH_FRACTION * out_bytes
        assert walk.items.n_merge > 0  # still split: the global rows are not walked by one program


def _walked_once(lay, klay, factor):
    """Per head: how many times the forward walk (regular entries + narrow sub-blocks)
    covers each (query position, key position) pair."""
    regular, narrow = lowering.narrow_entries(klay, *lowering.stacked_rows(klay, factor), stacked=factor > 1)
    bs, nb = klay.block, klay.nblocks
    nr = -(-nb // factor)
    rows_len = factor * bs
    size = nr * rows_len
    out = []
    for head in range(lay.num_heads):
        cover = np.zeros((size, max(size, nb * bs)), np.int8)
        for (ptr, blocks, _), width in ((regular, bs), (narrow, lowering.NARROW)):
            for r in range(head * nr, (head + 1) * nr):
                q0 = (r - head * nr) * rows_len
                for b in blocks[ptr[r]:ptr[r + 1]]:
                    cover[q0:q0 + rows_len, b * width:(b + 1) * width] += 1
        out.append(cover[:klay.seq_len, :klay.seq_len])
    return out, narrow


@pytest.mark.parametrize("src,t,bs,factor", [
    ("window(16) | global([0])", 300, 16, 1),
    ("window(16) | global([0])", 300, 16, 2),
    ("window(8) | global([0, 5, 70, -1])", 301, 32, 1),
    ("window(8) | global([0, 5, 70, -1])", 301, 32, 4),
    ("window(5) | global([0, 7]) | dilate(2)", 201, 16, 2),   # residue order: columns move too
    ("(window(8) & causal) | global([40])", 200, 16, 1),
    ("window(40) | global(0..20)", 250, 64, 1),               # 20 keys: two 16-key sub-blocks
    ("window(40) | global(0..64)", 250, 64, 1),               # a whole block: stays a block
    ("global([3])", 100, 16, 2),
])
def test_thin_columns_are_walked_as_narrow_sub_blocks_exactly_once(src, t, bs, factor):
    lay, _, klay = _klay(src, t, 2, bs)
    covers, (n_ptr, n_sub, n_flags) = _walked_once(lay, klay, factor)
    for head, cover in enumerate(covers):
        mask, _, _ = _kernel_mask(lay, klay, head)
        assert (cover[mask] == 1).all(), "an allowed pair is walked twice or never"
        assert cover.max() <= 1, "a tile is walked twice"
    cols = klay.columns[0]
    full = (n_flags & 1) == 1
    for sb, f in zip(n_sub, full):  # a FULL narrow tile holds column keys only
        inside = np.isin(np.arange(sb * lowering.NARROW, (sb + 1) * lowering.NARROW), cols)
        assert inside.all() == f
    if "0..64" in src:
        assert n_ptr[-1] == 0
    else:
        assert n_ptr[-1] > 0


def test_thin_columns_cut_the_walked_blocks_of_longformer():
    lay, pred, klay = _klay("window(256) | global([0])", 16384, 2, 64)
    plan = lowering.plan_for(lay, pred, "cpu", tiles=lowering.Tiles(2, 2, 2), head_dim=64, itemsize=2)
    rows = 2 * -(-klay.nblocks // 2)
    assert plan.fwd.n_narrow == rows - 2 * 3  # every stacked row but the 3 whose window reaches token 0 ...
    regular, _ = lowering.narrow_entries(klay, *lowering.stacked_rows(klay, 2), stacked=True)
    assert np.median(np.diff(regular[0])) == 10  # ... walks its 10 window blocks, not 11
    assert plan.kv.narrow_block.numel() == 1  # dK/dV keeps whole blocks (nothing narrow)


@pytest.mark.parametrize("src,tall,gathered_only", [
    ("window(256) | global([0])", False, False),                                   # +20% pairs at 128 rows
    ("block(64, width=1) | global(0..128) | random(192, seed=1)", False, False),   # +39%: random blocks differ
    ("window(1023) & causal", True, False),                                        # +6%
    ("window(1023) & causal", False, True),                                        # contiguous K/V: 64 rows
    ("window(256) | dilate(2)", True, True),                                       # residue order: a band
    ("window(256) | dilate(2)", True, False),
])
def test_tall_rows_only_where_they_cover_few_extra_pairs(src, tall, gathered_only, monkeypatch):
    monkeypatch.setattr(lowering, "TALL_ONLY_GATHERED", gathered_only)
    for t in (16384, 65536):
        lay = get_layout(patterncc.parse(src), t, 16, 64)
        pred = codegen.analyse(lay.pattern)
        assert [lowering.row_class(lay, pred, 1, kind) for kind in ("fwd", "dq", "dkdv")] == [tall] * 3
    wide = get_layout(patterncc.parse(src), 4096, 2, 128)
    assert lowering.row_class(wide, pred, 1, "fwd")  # 128-wide blocks are tall already


def _walked_once_with_thin_rows(lay, klay):
    """Per head: how many times the forward walk with THIN_ROWS (regular entries over whole
    rows, narrow sub-blocks, thin-row runs over their 16 rows) covers each pair; and the
    plan pieces (indptr, key block, flags, segments)."""
    regular, narrow = lowering.narrow_entries(klay, *lowering.stacked_rows(klay, 1), stacked=False)
    ptr, kb, fl, segments = lowering.thin_rows(klay, *regular)
    bs, nb, w = klay.block, klay.nblocks, lowering.NARROW
    covers = []
    for head in range(lay.num_heads):
        cover = np.zeros((nb * bs, nb * bs), np.int8)
        for r in range(head * nb, (head + 1) * nb):
            q0 = (r - head * nb) * bs
            for b in narrow[1][narrow[0][r]:narrow[0][r + 1]]:
                cover[q0:q0 + bs, b * w:(b + 1) * w] += 1
        for row, s, e, sub in zip(*segments):
            if row // nb != head:
                continue
            q0 = (row % nb) * bs
            rows = slice(q0, q0 + bs) if sub < 0 else slice(q0 + sub * w, q0 + (sub + 1) * w)
            for b in kb[s:e]:
                cover[rows, b * bs:(b + 1) * bs] += 1
        covers.append(cover[:klay.seq_len, :klay.seq_len])
    return covers, (ptr, kb, fl, segments)


@pytest.mark.parametrize("src,t,bs", [
    ("window(16) | global([0])", 300, 64),
    ("window(8) | global([0, 5, 70, -1])", 301, 64),     # two global rows in one 16-row sub-block
    ("window(8) | global([100, 101, 250])", 400, 64),
    ("window(5) | global([0, 7]) | dilate(2)", 301, 64),  # residue order: global rows move too
    ("window(20) | global([3]) | random(64, seed=3)", 500, 64),
    ("window(40) | global(0..20)", 250, 64),              # 20 rows: two 16-row sub-blocks
    ("window(20) | global([3])", 333, 128),
])
def test_thin_rows_walk_each_allowed_pair_exactly_once(src, t, bs, monkeypatch):
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    lay, _, klay = _klay(src, t, 2, bs)
    covers, (ptr, kb, fl, segments) = _walked_once_with_thin_rows(lay, klay)
    assert segments is not None and (segments[3] >= 0).any(), "no thin-row run"
    for head, cover in enumerate(covers):
        mask, _, _ = _kernel_mask(lay, klay, head)
        assert (cover[mask] == 1).all(), "an allowed pair is walked twice or never"
        assert cover.max() <= 1, "a tile is walked twice"
    row, start, end, sub = segments
    assert (np.diff(row) >= 0).all() and (start <= end).all()
    assert np.array_equal(np.unique(row), np.arange(ptr.size - 1))  # every row has its regular run
    assert ((fl & (lowering.ROW | lowering.COLUMN)) == 0)[np.concatenate(
        [np.arange(s, e) for s, e, u in zip(start, end, sub) if u >= 0])].all()


def test_thin_rows_switched_off_or_not_applicable_change_nothing(monkeypatch):
    lay, _, klay = _klay("window(16) | global([0])", 300, 2, 64)
    regular, _ = lowering.narrow_entries(klay, *lowering.stacked_rows(klay, 1), stacked=False)
    monkeypatch.setattr(lowering, "THIN_ROWS", False)
    assert lowering.thin_rows(klay, *regular)[3] is None
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    for src in ("block(64, width=1) | global(0..128) | random(192, seed=1)", "window(16)"):
        _, _, other = _klay(src, 300, 2, 64)  # global rows that fill their blocks; no global at all
        regular, _ = lowering.narrow_entries(other, *lowering.stacked_rows(other, 1), stacked=False)
        assert lowering.thin_rows(other, *regular)[3] is None


def test_thin_row_items_merge_with_their_rows_items(monkeypatch):
    """A row with thin-row runs is a split row: its regular piece first (it walks the narrow
    entries), then its thin pieces, all merged through one contiguous run of slots; dQ walks
    the same items."""
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    lay = get_layout(patterncc.parse("window(256) | global([0])"), 8192, 2, 64)
    plan = lowering.plan_for(lay, codegen.analyse(lay.pattern), "cpu", group=1)
    it = plan.fwd.items
    thin, row, merge = it.thin.numpy(), it.row.numpy(), it.merge.numpy()
    assert it.n_thin == (thin >= 0).sum() > 0 and (thin[thin >= 0] == 0).all()  # token 0: sub-block 0
    assert set(row[thin >= 0].tolist()) == {0, lay.nblocks}  # the global query block of each head
    assert (merge[thin >= 0] >= 0).all()
    for r in (0, lay.nblocks):
        mine = np.flatnonzero(row == r)
        assert thin[mine[0]] == -1 and (thin[mine[1:]] >= 0).all()
        slots = it.slot.numpy()[mine]
        assert slots.tolist() == list(range(slots[0], slots[0] + mine.size))
    assert plan.dq is plan.fwd
    monkeypatch.setattr(lowering, "THIN_ROWS", False)
    off = lowering.plan_for(lay, codegen.analyse(lay.pattern), "cpu", group=1)
    assert off.fwd.items.n_thin == 0 and off is not plan


@pytest.mark.parametrize("group", [1, 2])
def test_thin_key_items_merge_with_their_key_rows_items(group, monkeypatch):
    """THIN_KEYS: in dK/dV, the global key's block (key row 0 of each kv head) walks its far
    query blocks in thin-key items of 16 keys, after its regular piece (the only one that may
    walk thin query entries), all merged through one contiguous run of slots; the pieces spread
    over the launch, not first. Off: no thin-key item, and a plan of its own."""
    monkeypatch.setattr(lowering, "THIN_KEYS", True)
    monkeypatch.setattr(lowering, "SPREAD_SLOTS", 4)  # a launch this short spreads only on a small GPU
    lay = get_layout(patterncc.parse("window(256) | global([0])"), 8192, 2 * group, 64)
    plan = lowering.plan_for(lay, codegen.analyse(lay.pattern), "cpu", group=group)
    it = plan.kv.items
    thin, row, merge, slot = it.thin.numpy(), it.row.numpy(), it.merge.numpy(), it.slot.numpy()
    assert it.n_thin == (thin >= 0).sum() > 2 and (thin[thin >= 0] == 0).all()  # key 0: sub-block 0
    assert set(row[thin >= 0].tolist()) == {0, lay.nblocks}  # key block 0 of each kv head
    assert (merge[thin >= 0] >= 0).all()
    for r in (0, lay.nblocks):
        mine = np.flatnonzero(row == r)
        assert thin[mine[0]] == -1 and (thin[mine[1:]] >= 0).all()
        assert slot[mine].tolist() == list(range(slot[mine[0]], slot[mine[0]] + mine.size))
        assert (it.narrow_end[mine[1:]] == it.narrow_start[mine[1:]]).all()  # thin query entries: the regular piece's
    assert np.flatnonzero(thin >= 0).max() > it.n_items // 2  # spread, not all first
    walked = sum(int(it.end[i] - it.start[i]) for i in np.flatnonzero(thin >= 0))
    assert walked == 2 * (lay.nblocks - 5) * group  # the far query blocks of both kv heads' key 0
    monkeypatch.setattr(lowering, "THIN_KEYS", False)
    off = lowering.plan_for(lay, codegen.analyse(lay.pattern), "cpu", group=group)
    assert off.kv.items.n_thin == 0 and off is not plan


@pytest.mark.parametrize("src,t,bs,group", [
    ("window(16) | global([0])", 300, 64, 1),
    ("window(8) | global([100, 101, 250])", 400, 64, 2),
    ("window(5) | global([0, 7]) | dilate(2)", 301, 64, 1),
    ("window(20) | global([3]) | random(64, seed=3)", 500, 64, 2),
    ("window(40) | global(0..20)", 250, 64, 1),
])
@pytest.mark.parametrize("thin_keys", [True, False])
def test_kv_walk_entries_walk_each_allowed_pair_once_in_dkdv(src, t, bs, group, thin_keys, monkeypatch):
    """dK/dV with THIN_ROWS (and THIN_KEYS, or not): per kv row, the regular entries cover
    whole query blocks against the whole key block, the thin query entries 16-query
    sub-blocks, the thin-key runs whole query blocks against 16-key sub-blocks; together
    every allowed (query, key) pair of every query head exactly once."""
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    monkeypatch.setattr(lowering, "THIN_KEYS", thin_keys)
    lay, _, klay = _klay(src, t, 2 * group, bs, group)
    ptr, qb, qh, fl, thin_ptr, segments = lowering.kv_walk_entries(klay, *lowering.kv_rows(klay, group, 1))
    assert thin_ptr is not None and thin_ptr[-1] > thin_ptr[0] == ptr[-1]
    assert (segments is not None) == thin_keys
    nb, w = klay.nblocks, lowering.NARROW
    if segments is None:
        segments = (np.arange(ptr.size - 1), ptr[:-1], ptr[1:], np.full(ptr.size - 1, -1))
    assert (segments[3] >= 0).any() or not thin_keys, "no thin-key run: the case tests nothing new"
    for head in range(lay.num_heads):
        mask, _, _ = _kernel_mask(lay, klay, head)
        cover = np.zeros((nb * bs, nb * bs), np.int8)
        runs = [(r, s, e, bs, sub) for r, s, e, sub in zip(*segments)]
        runs += [(r, thin_ptr[r], thin_ptr[r + 1], w, -1) for r in range(ptr.size - 1)]
        for r, s, e, width, sub in runs:
            k0 = (r % nb) * bs
            keys = slice(k0, k0 + bs) if sub < 0 else slice(k0 + sub * w, k0 + (sub + 1) * w)
            for b, h in zip(qb[s:e], qh[s:e]):
                if h == head:
                    cover[b * width:(b + 1) * width, keys] += 1
        cover = cover[:klay.seq_len, :klay.seq_len]
        assert (cover[mask] == 1).all(), "an allowed pair is walked twice or never"
        assert cover.max() <= 1
    assert not (fl & (lowering.ROW | (lowering.COLUMN if thin_keys else 0))).any()  # all moved to thin ones
