"""Token-level meaning of every primitive and operator, checked against the spec's formulas.

Each primitive's predicate (``allowed``), the layout's token mask and the exact block
classification are compared with a direct NumPy formula written from the language
reference (q = query position, k = key position, T = sequence length).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, strategies as st

import patterncc
from patterncc import ir, parse
from patterncc.ir import EMPTY, FULL, Ctx
from patterncc.layout import build_layout

from strategies import BLOCK_SIZES, global_indices, layout_cases

seq_lens = st.integers(1, 150)
blocks = st.sampled_from(BLOCK_SIZES)


def grid(t: int):
    a = np.arange(t, dtype=np.int64)
    return a[:, None], a[None, :]


def token_mask(src_or_pattern, t: int, heads: int = 1, block: int = 16) -> np.ndarray:
    """[H, T, T] token mask through the layout, checked against specialize().allowed()."""
    p = parse(src_or_pattern) if isinstance(src_or_pattern, str) else src_or_pattern
    lay = build_layout(p, t, heads, block)
    m = lay.mask()
    q, k = grid(t)
    for h in range(heads):
        direct = np.broadcast_to(p.specialize(h).allowed(Ctx(t, block), q, k), (t, t))
        np.testing.assert_array_equal(m[h], direct)
    return m


def assert_mask(src, t, expected, heads=1, block=16):
    m = token_mask(src, t, heads, block)
    expected = np.broadcast_to(expected, m.shape)
    bad = np.argwhere(m != expected)
    assert bad.size == 0, f"{src} at T={t}: first mismatch (head, q, k) = {bad[:3].tolist()}"


# ----------------------------------------------------------------------------------------
# primitives against their formulas


@given(seq_lens, st.integers(0, 200), blocks)
def test_window(t, w, block):
    q, k = grid(t)
    assert_mask(f"window({w})", t, np.abs(q - k) <= w, block=block)


@given(seq_lens, st.integers(0, 60), st.integers(1, 7), blocks)
def test_window_with_dilation_argument(t, w, d, block):
    q, k = grid(t)
    assert_mask(f"window({w}, dilation={d})", t, (np.abs(q - k) <= w * d) & ((q - k) % d == 0), block=block)


@given(seq_lens, blocks)
def test_causal_and_dense(t, block):
    q, k = grid(t)
    assert_mask("causal", t, k <= q, block=block)
    assert_mask("dense", t, np.ones((t, t), bool), block=block)


@given(seq_lens.flatmap(lambda t: st.tuples(st.just(t), global_indices(max_index=t))), blocks)
def test_global(case, block):
    t, items = case
    src = f"global({items})"
    wanted = set()
    for item in items.strip("[]").split(","):
        item = item.strip()
        if ".." in item:
            a, b = map(int, item.split(".."))
            wanted.update(range(a, b))
        else:
            i = int(item)
            wanted.add(i + t if i < 0 else i)
    idx = np.array(sorted(wanted), np.int64)
    q, k = grid(t)
    assert_mask(src, t, np.isin(q, idx) | np.isin(k, idx), block=block)
    np.testing.assert_array_equal(parse(src).indices(t), idx)


def test_global_negative_indices_count_from_the_end():
    q, k = grid(10)
    assert_mask("global([-1])", 10, (q == 9) | (k == 9))
    assert_mask("global([-10, 0])", 10, (q == 0) | (k == 0))
    assert_mask("global([0..3, -2])", 10, (q < 3) | (k < 3) | (q == 8) | (k == 8))
    np.testing.assert_array_equal(parse("global([-1, 0..2, 1])").indices(5), [0, 1, 4])


@given(seq_lens, st.integers(1, 200), blocks)
def test_sink(t, n, block):
    q, k = grid(t)
    assert_mask(f"sink({n})", t, k < n, block=block)


@given(seq_lens, st.integers(1, 200), blocks)
def test_strided(t, s, block):
    q, k = grid(t)
    assert_mask(f"strided({s})", t, (q - k) % s == 0, block=block)


@given(seq_lens, st.integers(1, 80), st.integers(0, 3), blocks)
def test_block(t, b, width, block):
    q, k = grid(t)
    assert_mask(f"block({b}, width={width})", t, np.abs(q // b - k // b) <= width, block=block)
    if width == 0:
        assert_mask(f"block({b})", t, q // b == k // b, block=block)


# ----------------------------------------------------------------------------------------
# random


def _random_rows(mask_h: np.ndarray, t: int, block: int) -> list[set[int]]:
    """Key blocks each query block sees, asserting that they are whole blocks."""
    nb = -(-t // block)
    rows = []
    for qb in range(nb):
        qs = slice(qb * block, min(t, (qb + 1) * block))
        seen = set()
        for kb in range(nb):
            sub = mask_h[qs, kb * block:min(t, (kb + 1) * block)]
            assert sub.all() or not sub.any(), f"key block {kb} of query block {qb} is not whole"
            if sub.any():
                seen.add(kb)
        rows.append(seen)
    return rows


@given(st.integers(1, 300), st.integers(1, 200), st.integers(0, 2 ** 20), blocks, st.integers(1, 3))
def test_random_attends_whole_distinct_blocks(t, r, seed, block, heads):
    src = f"random({r}, seed={seed})"
    m = token_mask(src, t, heads, block)
    nb = -(-t // block)
    per_row = min(nb, math.ceil(r / block))
    for h in range(heads):
        rows = _random_rows(m[h], t, block)
        assert all(len(s) == per_row for s in rows), (h, [len(s) for s in rows])
    lay = build_layout(parse(src), t, heads, block)
    assert lay.full.all()  # random blocks are whole blocks: no mask needed
    assert (lay.row_counts() == per_row).all()


def test_random_is_reproducible_and_differs_per_head_and_seed():
    t, block = 1024, 16  # 64 query blocks, 2 random key blocks each

    def blocks(src, heads=4):
        lay = build_layout(parse(src), t, heads, block)
        return [np.stack([lay.row(h, qb)[0] for qb in range(lay.nblocks)]) for h in range(heads)]

    a = blocks("random(32, seed=5)")
    ir._random_blocks.cache_clear()
    b = blocks("random(32, seed=5)")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for h in range(1, 4):
        assert (a[h] != a[0]).any(), f"head {h} draws the same blocks as head 0"
    c = blocks("random(32, seed=6)")
    for h in range(4):
        assert (a[h] != c[h]).any(), "seeds 5 and 6 draw the same blocks"
    np.testing.assert_array_equal(blocks("random(32)", 1)[0], blocks("random(32, seed=0)", 1)[0])
    m = token_mask("random(32, seed=5)", 256, 2, 16)  # the token mask agrees with the blocks
    for h in range(2):
        rows = _random_rows(m[h], 256, 16)
        ref = build_layout(parse("random(32, seed=5)"), 256, 2, 16)
        assert rows == [set(ref.row(h, qb)[0].tolist()) for qb in range(16)]


def test_random_covers_key_blocks_evenly():
    # 16 heads x 64 query blocks x 4 draws over 64 key blocks: about 64 draws per block
    lay = build_layout(parse("random(64, seed=3)"), 1024, 16, 16)
    counts = np.bincount(lay.kblock, minlength=64)
    assert counts.sum() == 16 * 64 * 4
    assert counts.min() > 20 and counts.max() < 130, counts


def test_random_with_heads_restriction():
    m = token_mask("window(2) | random(16, seed=1, heads=[1])", 256, 3, 16)
    q, k = grid(256)
    win = np.abs(q - k) <= 2
    assert (m[0] == win).all() and (m[2] == win).all()
    assert (m[1] & ~win).any()


def test_random_blocks_are_the_same_in_another_process():
    src = "random(100, seed=7)"
    code = ("import patterncc; from patterncc.ir import Ctx; "
            f"p = patterncc.parse({src!r}); "
            "print([p.specialize(h).chosen(Ctx(4096, 64)).tolist() for h in range(3)])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.strip()
    p = parse(src)
    assert out == str([p.specialize(h).chosen(Ctx(4096, 64)).tolist() for h in range(3)])


# ----------------------------------------------------------------------------------------
# dilation and heads=


@given(st.integers(1, 200), st.integers(0, 40), st.integers(1, 5), st.integers(1, 4), blocks)
def test_dilate_on_the_first_heads(t, w, d, h_sel, block):
    heads = 4
    q, k = grid(t)
    dil = (np.abs(q - k) <= w * d) & ((q - k) % d == 0)
    plain = np.abs(q - k) <= w
    expected = np.stack([dil if h < h_sel else plain for h in range(heads)])
    assert_mask(f"window({w}) | dilate({d}, heads={h_sel})", t, expected, heads, block)
    assert_mask(f"window({w}) | dilate({d})", t, np.stack([dil] * heads), heads, block)


def test_dilate_on_listed_heads_acts_on_window_terms_only():
    t, heads = 200, 4
    q, k = grid(t)
    d = q - k
    other = ((d % 7) == 0) | (k < 3) | (q // 10 == k // 10)
    dil = (np.abs(d) <= 12) & (d % 3 == 0)
    expected = np.stack([(dil if h in (1, 3) else np.abs(d) <= 4) | other for h in range(heads)])
    assert_mask("window(4) | strided(7) | sink(3) | block(10) | dilate(3, heads=[1, 3])", t, expected, heads)
    # inside an intersection and through a let definition
    expected = np.stack([(dil if h in (1, 3) else np.abs(d) <= 4) & (k <= q) for h in range(heads)])
    assert_mask("(window(4) & causal) | dilate(3, heads=[1, 3])", t, expected, heads)
    prog = patterncc.parse_program("let w = window(4) & causal\nlayers 0..1: w | dilate(3, heads=1..4)")
    expected = np.stack([(dil if h >= 1 else np.abs(d) <= 4) & (k <= q) for h in range(heads)])
    assert_mask(prog.pattern_for_layer(0), t, expected, heads)
    # two windows, both dilated
    expected = np.stack([((np.abs(d) <= 4) & (d % 2 == 0)) | ((np.abs(d) <= 40) & (d % 2 == 0))] * 2)
    assert_mask("window(2) | window(20) | dilate(2)", t, expected, 2)


def test_heads_restrict_a_primitive_to_those_heads():
    t, heads = 150, 4
    q, k = grid(t)
    win = np.abs(q - k) <= 5
    expected = np.stack([win | ((q - k) % 64 == 0) if h == 2 else win for h in range(heads)])
    assert_mask("window(5) | strided(64, heads=[2])", t, expected, heads)
    expected = np.stack([win if h < 2 else np.zeros((t, t), bool) for h in range(heads)])
    assert_mask("window(5, heads=2)", t, expected, heads)
    expected = np.stack([(k <= q) | ((q == 0) | (k == 0)) if h in (1, 2) else k <= q for h in range(heads)])
    assert_mask("causal | global([0], heads=1..3)", t, expected, heads)


def _reference(node: ir.Pattern, head: int, ctx: Ctx, q, k, dilation: int = 1) -> np.ndarray:
    """Meaning of parsed IR on one head, written from the language reference."""
    t = ctx.seq_len
    shape = np.broadcast_shapes(q.shape, k.shape)
    if isinstance(node, ir.Union):
        return np.logical_or.reduce([_reference(c, head, ctx, q, k, dilation) for c in node.terms])
    if isinstance(node, ir.Intersect):
        return np.logical_and.reduce([_reference(c, head, ctx, q, k, dilation) for c in node.terms])
    if isinstance(node, ir.Dilate):
        on = node.heads is None or head in node.heads
        return _reference(node.inner, head, ctx, q, k, dilation * (node.d if on else 1))
    if node.heads is not None and head not in node.heads:
        return np.zeros(shape, bool)
    d = q - k
    if isinstance(node, ir.Window):
        dd = node.dilation * dilation
        out = (np.abs(d) <= node.w * dd) & (d % dd == 0)
    elif isinstance(node, ir.Causal):
        out = k <= q
    elif isinstance(node, ir.Dense):
        out = np.ones(shape, bool)
    elif isinstance(node, ir.Global):
        idx = set()
        for it in node.items:
            idx.update(range(it.start, it.stop) if isinstance(it, ir.IndexRange) else [it % t])
        idx = np.array(sorted(idx))
        out = np.isin(q, idx) | np.isin(k, idx)
    elif isinstance(node, ir.Sink):
        out = k < node.n
    elif isinstance(node, ir.Strided):
        out = d % node.s == 0
    elif isinstance(node, ir.Block):
        out = np.abs(q // node.b - k // node.b) <= node.width
    elif isinstance(node, ir.Random):
        chosen = replace(node, heads=None, stream=head).chosen(ctx)
        out = (chosen[q // ctx.block] == (k // ctx.block)[..., None]).any(-1)
    else:  # pragma: no cover
        raise AssertionError(f"unexpected node {node!r}")
    return np.broadcast_to(out, shape)


@given(layout_cases(max_seq_len=120, max_heads=4, max_leaves=6))
def test_generated_patterns_mean_what_the_reference_says(case):
    pattern, t, heads, block = case
    ctx = Ctx(t, block)
    q, k = grid(t)
    expected = np.stack([_reference(pattern, h, ctx, q, k) for h in range(heads)])
    assert_mask(pattern, t, expected, heads, block)


# ----------------------------------------------------------------------------------------
# block footprints of primitives: exact classification, candidate supersets, estimates


PRIMITIVE_SOURCES = [
    "window(0)", "window(5)", "window(16)", "window(40)", "window(3, dilation=2)", "window(9, dilation=5)",
    "causal", "dense", "global([0])", "global([-1, 17])", "global(0..32)", "global([3..40, 64])",
    "sink(1)", "sink(16)", "sink(50)", "strided(1)", "strided(3)", "strided(16)", "strided(37)",
    "block(1)", "block(8)", "block(16)", "block(24, width=1)", "block(100, width=2)",
    "random(1, seed=1)", "random(40, seed=2)",
]


@pytest.mark.parametrize("src", PRIMITIVE_SOURCES)
@pytest.mark.parametrize("t,block", [(1, 16), (17, 16), (100, 16), (100, 32), (129, 64), (333, 32)])
def test_primitive_block_states_are_exact(src, t, block):
    p = parse(src)
    if isinstance(p, ir.Global) and p.size_bound(t) and max(
            (i.stop if isinstance(i, ir.IndexRange) else abs(i) + (i >= 0)) for i in p.items) > t:
        pytest.skip("global index outside this sequence")
    p = p.specialize(0)
    ctx = Ctx(t, block)
    nb = ctx.nblocks
    q, k = grid(t)
    m = np.broadcast_to(p.allowed(ctx, q, k), (t, t))
    pad = np.zeros((nb * block, nb * block), bool)
    inside = np.zeros_like(pad)
    pad[:t, :t] = m
    inside[:t, :t] = True
    any_ = pad.reshape(nb, block, nb, block).any(axis=(1, 3))
    all_ = (pad | ~inside).reshape(nb, block, nb, block).all(axis=(1, 3))
    qb, kb = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    states = p.classify(ctx, qb.ravel(), kb.ravel()).reshape(nb, nb)
    np.testing.assert_array_equal(states != EMPTY, any_)
    np.testing.assert_array_equal(states == FULL, all_ & any_)  # primitives are exact
    cq, ck = p.candidates(ctx)
    listed = np.zeros((nb, nb), bool)
    listed[cq, ck] = True
    assert not (any_ & ~listed).any(), "candidates miss a touched block"
    assert ((cq >= 0) & (cq < nb) & (ck >= 0) & (ck < nb)).all()
    assert p.estimate(ctx) >= len(set(zip(cq.tolist(), ck.tolist())))


@given(layout_cases(max_seq_len=200, max_heads=3, max_leaves=5))
def test_composite_candidates_cover_touched_blocks(case):
    pattern, t, heads, block = case
    ctx = Ctx(t, block)
    nb = ctx.nblocks
    q, k = grid(t)
    for h in range(heads):
        p = pattern.specialize(h)
        m = np.broadcast_to(p.allowed(ctx, q, k), (t, t))
        pad = np.zeros((nb * block, nb * block), bool)
        pad[:t, :t] = m
        touched = pad.reshape(nb, block, nb, block).any(axis=(1, 3))
        cq, ck = p.candidates(ctx)
        listed = np.zeros((nb, nb), bool)
        listed[cq, ck] = True
        assert not (touched & ~listed).any()
        qb, kb = np.nonzero(listed)
        states = p.classify(ctx, qb, kb)
        np.testing.assert_array_equal(states != EMPTY, touched[qb, kb])


# ----------------------------------------------------------------------------------------
# small helpers of the IR


def test_ctx_blocks_and_bounds():
    ctx = Ctx(100, 32)
    assert ctx.nblocks == 4
    lo, hi = ctx.bounds(np.arange(4))
    assert lo.tolist() == [0, 32, 64, 96] and hi.tolist() == [31, 63, 95, 99]
    assert Ctx(1, 64).nblocks == 1 and Ctx(64, 64).nblocks == 1 and Ctx(65, 64).nblocks == 2


def test_head_queries():
    p = parse("window(4) | sink(2, heads=[1, 5]) | dilate(2, heads=3)")
    assert p.max_head() == 5
    assert parse("window(4)").max_head() == -1
    p.check_heads(6)
    with pytest.raises(patterncc.PatternError, match="head 5"):
        p.check_heads(5)
    assert p.head_dependent()
    assert parse("random(4)").head_dependent()
    assert not parse("window(4) | causal | dilate(2)").head_dependent()


def test_specialize_removes_heads_and_dilation():
    p = parse("window(4) | sink(2, heads=[1]) | random(8, heads=[0]) | dilate(2, heads=[0])")
    s0, s1, s2 = (p.specialize(h) for h in range(3))
    assert s0 == parse("window(4, dilation=2)") | replace(ir.Random(8), stream=0)
    assert s1 == parse("window(4) | sink(2)")
    assert s2 == parse("window(4)")
    for s in (s0, s1, s2):
        for node in s.walk():
            assert getattr(node, "heads", None) is None
            assert not isinstance(node, ir.Dilate)
    assert parse("causal(heads=[1])").specialize(0) == ir.Empty()
    with pytest.raises(TypeError):
        p.allowed(Ctx(10, 16), *grid(10))


# ----------------------------------------------------------------------------------------
# residue order: the pattern on positions grouped by t mod d


def _residue_mismatch(p: ir.Pattern, t: int, d: int, block: int = 16, align: int = 1):
    """Pairs of real tokens where p.residue(d, t, align) on positions disagrees with p on tokens."""
    moved = p.residue(d, t, align)
    if moved is None:
        return None
    length = d * ir.residue_length(t, d, align)
    pos = np.arange(length)
    tok = ir.residue_token(pos, t, d, align)
    real = tok < t
    tc = np.minimum(tok, t - 1)
    on_positions = np.broadcast_to(moved.allowed(Ctx(length, block), pos[:, None], pos[None, :]), (length,) * 2)
    on_tokens = np.broadcast_to(p.allowed(Ctx(t, block), tc[:, None], tc[None, :]), (length,) * 2)
    both = real[:, None] & real[None, :]
    return np.argwhere((on_positions != on_tokens) & both)


@given(t=st.integers(1, 200), d=st.integers(2, 5), align=st.sampled_from([1, 4, 16, 64]))
def test_residue_positions_and_tokens_are_inverse(t, d, align):
    tok = np.arange(t)
    length = ir.residue_length(t, d, align)
    assert length % align == 0 and length - align < -(-t // d) <= length  # the least aligned length
    pos = ir.residue_position(tok, t, d, align)
    assert np.unique(pos).size == t and pos.max() < d * length
    np.testing.assert_array_equal(ir.residue_token(pos, t, d, align), tok)
    np.testing.assert_array_equal(pos // length, tok % d)  # class c in positions c*L .. c*L + L - 1
    empty = np.setdiff1d(np.arange(d * length), pos)
    assert (ir.residue_token(empty, t, d, align) == t).all()  # empty slots hold no token


@pytest.mark.parametrize("src,d", [
    ("window(8, dilation=2)", 2), ("window(6, dilation=3)", 3), ("window(5, dilation=4)", 2),
    ("window(7, dilation=2) & window(9)", 2), ("window(8, dilation=2) & causal", 2),
    ("window(4, dilation=2) | global([0, 5, -1])", 2), ("window(3, dilation=3) | global(2..30)", 3),
    ("strided(6) & causal", 3), ("window(3, dilation=6) & strided(4)", 2), ("dense", 2),
    ("(window(3, dilation=2) & causal) | global([1, 2])", 2),
])
@pytest.mark.parametrize("t", [1, 2, 5, 33, 64, 101])
@pytest.mark.parametrize("align", [1, 16])  # classes padded to a block: the lowering's order
def test_residue_form_is_exact(src, d, t, align):
    p = parse(src)
    try:
        bad = _residue_mismatch(p, t, d, align=align)
    except patterncc.PatternError:
        pytest.skip("global index outside this sequence")
    assert bad is not None, f"{src} should have a residue form for d={d}"
    assert bad.size == 0, f"{src}, T={t}, d={d}: first mismatching positions {bad[:3].tolist()}"


@pytest.mark.parametrize("src", ["causal", "window(4)", "window(4, dilation=2) | window(3)", "sink(2)",
                                 "block(8)", "random(16, seed=1)", "window(4, dilation=2) | causal",
                                 "strided(3)"])
def test_patterns_without_a_residue_form_say_so(src):
    assert parse(src).residue(2, 50) is None


@given(case=layout_cases(max_seq_len=120, max_heads=2, max_leaves=5), d=st.integers(2, 4))
def test_generated_residue_forms_are_exact(case, d):
    pattern, t, heads, block = case
    for h in range(heads):
        bad = _residue_mismatch(pattern.specialize(h), t, d, block, align=block)
        assert bad is None or bad.size == 0, (str(pattern.specialize(h)), t, d, bad[:3].tolist())


# ----------------------------------------------------------------------------------------
# class forms: the pattern on class indices (what the kernels' class_mask tests)


def _class_form_mismatch(p: ir.Pattern, d: int, n: int = 40, shift: int = 1000):
    """Pairs of class indices where p.class_form(d) disagrees with p on the tokens of some
    class c (a = c + d*i, b = c + d*j), also with i and j shifted alike; None without a form."""
    form = p.class_form(d)
    if form is None:
        return None
    i = np.arange(n, dtype=np.int64)
    on_indices = np.broadcast_to(form.allowed(Ctx(n, 16), i[:, None], i[None, :]), (n, n))
    far = i + shift
    shifted = np.broadcast_to(form.allowed(Ctx(n + shift, 16), far[:, None], far[None, :]), (n, n))
    assert (on_indices == shifted).all(), f"class form {form} depends on more than i - j"
    bad = []
    for c in range(d):
        tok = c + d * i
        on_tokens = np.broadcast_to(p.allowed(Ctx(d * n, 16), tok[:, None], tok[None, :]), (n, n))
        bad += [(c, *ij) for ij in np.argwhere(on_tokens != on_indices).tolist()]
    return bad


@pytest.mark.parametrize("src,d,form", [
    ("window(8, dilation=2)", 2, "window(8)"),
    ("window(6, dilation=3)", 3, "window(6)"),
    ("window(5, dilation=4)", 2, "window(5, dilation=2)"),   # every other index of the class
    ("window(8, dilation=2) & causal", 2, "causal & window(8)"),
    ("window(7, dilation=2) & window(9)", 2, "window(4) & window(7)"),
    ("window(3, dilation=6) & strided(4)", 2, "strided(2) & window(3, dilation=3)"),
    ("window(4, dilation=2) | window(9, dilation=4)", 2, "window(4) | window(9, dilation=2)"),
    ("dense & window(2, dilation=2)", 2, "window(2)"),
])
def test_class_form_is_exact(src, d, form):
    p = parse(src)
    assert str(p.class_form(d)) == form
    bad = _class_form_mismatch(p, d)
    assert bad == [], f"{src}, d={d}: first mismatching (class, i, j) {bad[:3]}"


@pytest.mark.parametrize("src", ["window(4) | global([0])", "window(4, dilation=2) | global([0, -1])",
                                 "sink(2) | window(2, dilation=2)", "block(8) & window(3, dilation=2)",
                                 "random(16, seed=1)", "window(3, dilation=2) & global(2..9)"])
def test_patterns_that_move_with_the_length_have_no_class_form(src):
    assert parse(src).class_form(2) is None


@pytest.mark.parametrize("src,extent", [
    ("window(8)", 8), ("window(8, dilation=3)", 24), ("window(8) | window(3, dilation=4)", 12),
    ("window(8) & causal", 8), ("causal & window(30) & window(5, dilation=2)", 10), ("causal", None),
    ("dense", None), ("window(2) | causal", None), ("strided(4)", None), ("strided(4) & window(9)", 9),
    ("global([0]) | window(2)", None), ("window(4, heads=[1])", 4),
])
def test_extent_bounds_every_allowed_pair(src, extent):
    p = parse(src)
    assert p.extent() == extent
    if extent is not None:
        q, k = grid(3 * extent + 20)
        allowed = np.broadcast_to(p.specialize(0).allowed(Ctx(3 * extent + 20, 16), q, k), (3 * extent + 20,) * 2)
        assert np.abs(q - k)[allowed].max(initial=0) <= extent


@given(case=layout_cases(max_seq_len=60, max_heads=2, max_leaves=5), d=st.integers(2, 4))
def test_generated_class_forms_are_exact_and_extents_bound_them(case, d):
    pattern, t, heads, block = case
    for h in range(heads):
        p = pattern.specialize(h)
        if p.keeps_classes(d):
            bad = _class_form_mismatch(p, d, n=30)
            assert not bad, (str(p), d, bad[:3])
        reach = p.extent()
        if reach is not None:
            q, k = grid(t)
            allowed = np.broadcast_to(p.allowed(Ctx(t, block), q, k), (t, t))
            assert np.abs(q - k)[allowed].max(initial=0) <= reach, (str(p), reach)
