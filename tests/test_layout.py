"""The block-sparse layout: invariants against the token mask, the transposed index,
costs, the LRU cache, scale (no T x T memory) and argument checks."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given

import patterncc
from patterncc import ir, parse
from patterncc.layout import (CACHE, MASK_LIMIT, Layout, LayoutCache, build_layout, get_layout,
                              partial_block_masks)

from strategies import layout_cases

CARD = "window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)"


def check_layout(lay: Layout) -> np.ndarray:
    """Check every structural invariant of ``lay`` against its token mask; return the mask."""
    t, h, bs, nb = lay.seq_len, lay.num_heads, lay.block_size, lay.nblocks
    assert nb == -(-t // bs)
    mask = lay.mask()
    assert mask.shape == (h, t, t) and mask.dtype == bool

    # forward CSR: shapes, dtypes, sorted rows
    assert lay.indptr.shape == (h * nb + 1,) and lay.indptr[0] == 0 and lay.indptr[-1] == lay.nnz
    assert (np.diff(lay.indptr) >= 0).all()
    assert lay.kblock.shape == lay.full.shape == (lay.nnz,)
    assert lay.full.dtype == bool and np.issubdtype(lay.kblock.dtype, np.integer)
    assert ((lay.kblock >= 0) & (lay.kblock < nb)).all()
    for r in range(h * nb):
        row = lay.kblock[lay.indptr[r]:lay.indptr[r + 1]]
        assert (np.diff(row) > 0).all(), f"row {r} not strictly increasing: {row}"
    heads_of = lay.entry_head
    qblock_of = lay.entry_qblock
    assert (heads_of == np.repeat(np.arange(h * nb) // nb, np.diff(lay.indptr))).all()
    assert (qblock_of == np.repeat(np.arange(h * nb) % nb, np.diff(lay.indptr))).all()

    # block-level truth from the token mask
    pad = np.zeros((h, nb * bs, nb * bs), bool)
    pad[:, :t, :t] = mask
    inside = np.zeros((nb * bs, nb * bs), bool)
    inside[:t, :t] = True
    touched = pad.reshape(h, nb, bs, nb, bs).any(axis=(2, 4))
    whole = (pad | ~inside).reshape(h, nb, bs, nb, bs).all(axis=(2, 4))
    listed = np.zeros((h, nb, nb), bool)
    listed[heads_of, qblock_of, lay.kblock] = True
    is_full = np.zeros((h, nb, nb), bool)
    is_full[heads_of, qblock_of, lay.kblock] = lay.full

    assert not (touched & ~listed).any(), "an allowed pair lies outside every listed block"
    assert not (listed & ~touched).any(), "a listed block holds no allowed pair"
    assert not (is_full & ~whole).any(), "a FULL block is not fully allowed"
    for hh in range(h):
        expect = np.where(is_full[hh], ir.FULL, np.where(listed[hh], ir.PARTIAL, 0))
        np.testing.assert_array_equal(lay.block_matrix(hh), expect)

    # transposed CSR
    assert lay.t_indptr.shape == (h * nb + 1,) and lay.t_indptr[0] == 0 and lay.t_indptr[-1] == lay.nnz
    assert lay.t_qblock.shape == lay.t_entry.shape == (lay.nnz,)
    assert sorted(lay.t_entry.tolist()) == list(range(lay.nnz)), "t_entry is not a permutation"
    t_rows = np.repeat(np.arange(h * nb), np.diff(lay.t_indptr))
    t_head, t_kb = t_rows // nb, t_rows % nb
    e = lay.t_entry
    assert (heads_of[e] == t_head).all() and (lay.kblock[e] == t_kb).all()
    assert (qblock_of[e] == lay.t_qblock).all()
    fwd = set(zip(heads_of.tolist(), qblock_of.tolist(), lay.kblock.tolist()))
    bwd = set(zip(t_head.tolist(), lay.t_qblock.tolist(), t_kb.tolist()))
    assert fwd == bwd and len(fwd) == lay.nnz
    for r in range(h * nb):
        col = lay.t_qblock[lay.t_indptr[r]:lay.t_indptr[r + 1]]
        assert (np.diff(col) > 0).all()
    np.testing.assert_array_equal(lay.row_counts(), listed.sum(2))
    np.testing.assert_array_equal(lay.col_counts(), listed.sum(1))

    # per-entry masks (used by the PyTorch backend) are the mask's blocks
    pm = lay.partial_masks()
    assert pm.shape == (lay.nnz, bs, bs)
    blocks = pad.reshape(h, nb, bs, nb, bs).transpose(0, 1, 3, 2, 4)
    np.testing.assert_array_equal(pm, blocks[heads_of, qblock_of, lay.kblock])

    # costs
    np.testing.assert_array_equal(lay.pairs_per_head(), mask.sum(axis=(1, 2)))
    assert lay.density == pytest.approx(mask.mean())
    assert lay.block_density == pytest.approx(lay.nnz / (h * nb * nb))
    assert 0.0 <= lay.density <= 1.0 and 0.0 <= lay.block_density <= 1.0
    assert 0.0 <= lay.full_fraction <= 1.0
    f = lay.flops(64)
    assert f["useful"] <= f["sparse"] + 1e-6 and f["dense"] == pytest.approx(4 * 64 * h * t * t)
    b = lay.kv_bytes(64)
    assert b["sparse"] <= b["dense"]
    s = lay.summary()
    assert s["touched_blocks"] == lay.nnz and s["empty_rows"] == int((listed.sum(2) == 0).sum())

    # every head's behaviour is its specialised pattern
    assert len(lay.heads) == h
    assert sorted(sum(lay.head_groups(), [])) == list(range(h))
    return mask


@given(layout_cases(max_seq_len=200, max_heads=4, max_leaves=6))
def test_generated_layouts_are_consistent(case):
    pattern, t, heads, block = case
    check_layout(build_layout(pattern, t, heads, block))


TABLE = [
    "window(3)",
    "window(20) & causal",
    "window(5) | dilate(3, heads=2)",
    "window(7, dilation=4) & causal",
    "global([0, -1]) | window(2)",
    "global(5..9) & causal",
    "causal & global([3])",
    "sink(4) | window(8) & causal",
    "(sink(4) | window(9)) & causal",
    "strided(5)",
    "strided(16) | block(16)",
    "(block(10) | strided(10)) & causal",
    "block(7, width=1)",
    "dense",
    "dense & causal",
    "random(20, seed=3)",
    "random(1, seed=9) & causal",
    "random(40, seed=1) & window(3)",
    "window(2, heads=[0]) | random(16, heads=[1])",
    "strided(3) & strided(5)",
    "(window(9) | dilate(2)) & causal",
    "(window(4) | dilate(2)) & (window(6) | dilate(3))",
    CARD,
]


@pytest.mark.parametrize("src", TABLE)
@pytest.mark.parametrize("t,block", [(1, 16), (17, 16), (100, 32), (333, 64), (129, 16), (64, 64)])
def test_layout_table(src, t, block):
    p = parse(src)
    try:
        lay = build_layout(p, t, 3, block)
    except patterncc.PatternError as e:
        assert "global" in str(e) and t < 10
        return
    check_layout(lay)


def test_layout_counts_for_a_window():
    # T=256, block 64, window(64): each query block touches itself and its neighbours
    lay = build_layout(parse("window(64)"), 256, 1, 64)
    assert lay.row_counts().tolist() == [[2, 3, 3, 2]]
    # the diagonal blocks are FULL (|q - k| <= 63), the off-diagonal ones PARTIAL
    assert (lay.full == (lay.kblock == lay.entry_qblock)).all()
    lay = build_layout(parse("window(128)"), 256, 1, 64)
    assert lay.block_matrix(0)[1].tolist() == [ir.FULL, ir.FULL, ir.FULL, ir.PARTIAL]


def test_intersection_drops_blocks_whose_partial_terms_do_not_meet():
    # the diagonal blocks of a dilated window and the strict lower triangle do meet; but the
    # first block row of 'strided(2) & window(0) & causal' only holds the diagonal
    lay = build_layout(parse("(window(3) | dilate(4)) & causal"), 64, 1, 16)
    check_layout(lay)
    lay = build_layout(parse("strided(4) & block(2)"), 64, 1, 16)  # only q == k survives
    check_layout(lay)
    assert lay.nnz == lay.nblocks and lay.pairs_per_head().tolist() == [64]


def test_rows_that_see_nothing():
    lay = build_layout(parse("global([3]) & causal"), 40, 2, 16)
    m = check_layout(lay)
    assert not m[:, :3].any(axis=2).any()  # queries 0..2 see nothing: k <= q and k == 3
    lay = build_layout(parse("window(2, heads=[0])"), 40, 2, 16)
    check_layout(lay)
    assert (lay.row_counts()[1] == 0).all() and lay.summary()["empty_rows"] == lay.nblocks


def test_equal_heads_share_their_blocks():
    lay = build_layout(parse("window(4) | strided(8, heads=[1, 3])"), 100, 4, 16)
    assert lay.head_groups() == [[0, 2], [1, 3]]
    r0, r2 = (lay.kblock[lay.indptr[h * lay.nblocks]:lay.indptr[(h + 1) * lay.nblocks]] for h in (0, 2))
    np.testing.assert_array_equal(r0, r2)
    lay = build_layout(parse("random(16)"), 100, 3, 16)
    assert len(lay.head_groups()) == 3  # random blocks are drawn per head


def test_partial_block_masks_helper():
    p = parse("window(3)")
    ctx = ir.Ctx(40, 16)
    m = partial_block_masks(p, ctx, np.array([0, 2]), np.array([0, 2]))
    assert m.shape == (2, 16, 16)
    assert m[1, 8:].sum() == 0 and m[1, :, 8:].sum() == 0  # tokens past T=40 are False
    assert m[0].sum() == sum(min(i + 3, 15) - max(i - 3, 0) + 1 for i in range(16))


# ----------------------------------------------------------------------------------------
# the cache


def test_cache_returns_the_same_object(fresh_layout_cache):
    p = parse("window(8) | global([0])")
    a = get_layout(p, 300, 2, 32)
    assert fresh_layout_cache.misses == 1 and fresh_layout_cache.hits == 0
    b = get_layout(parse("global([0]) | window(8)"), 300, 2, 32)  # equal IR, other spelling
    assert b is a and fresh_layout_cache.hits == 1
    assert get_layout(p, 301, 2, 32) is not a
    assert get_layout(p, 300, 3, 32) is not a
    assert get_layout(p, 300, 2, 16) is not a
    assert get_layout(p, 300, 2, 32) is a
    assert get_layout(p, np.int64(300), 2, 32) is a
    op = patterncc.compile("window(8) | global([0])", block_size=32)
    assert op.layout(300, 2) is a


def test_cache_is_a_bounded_lru():
    cache = LayoutCache(max_entries=3)
    pats = [parse(f"window({w})") for w in range(5)]
    first = [cache.get(p, 64, 1, 16) for p in pats[:3]]
    assert len(cache) == 3
    assert cache.get(pats[0], 64, 1, 16) is first[0]  # refresh 0: now 1 is the oldest
    cache.get(pats[3], 64, 1, 16)
    assert len(cache) == 3
    assert cache.get(pats[0], 64, 1, 16) is first[0]
    assert cache.get(pats[2], 64, 1, 16) is first[2]
    misses = cache.misses
    again = cache.get(pats[1], 64, 1, 16)  # evicted: rebuilt
    assert again is not first[1] and cache.misses == misses + 1
    for w in range(40):
        cache.get(parse(f"window({w})"), 64, 1, 16)
    assert len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.hits == cache.misses == 0
    assert len(CACHE) <= CACHE.max_entries


def test_cache_does_not_keep_failed_builds(fresh_layout_cache):
    p = parse("global([500])")
    for _ in range(2):
        with pytest.raises(patterncc.PatternError):
            get_layout(p, 100, 1, 16)
    assert len(fresh_layout_cache) == 0
    assert get_layout(p, 501, 1, 16).nnz > 0


# ----------------------------------------------------------------------------------------
# scale: the card example at T=65536 without T x T memory


def test_card_example_at_64k_is_fast_and_small():
    t, heads, block = 65536, 16, 64
    p = parse(CARD)
    build_layout(p, 4096, heads, block)  # warm imports and code paths
    start = time.perf_counter()
    lay = build_layout(p, t, heads, block)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"layout took {elapsed:.2f} s"
    nb = t // block
    assert lay.nblocks == nb and lay.num_heads == heads
    counts = lay.row_counts()
    # rows: a 513-token (or dilated 1025-token) band, the global column, a random block
    assert counts[2:, 1:-1].max() <= 9 + 2 and counts[:2, 1:-1].max() <= 17 + 2
    assert (counts[:, 0] == nb).all()  # query block 0 holds the global token: sees everything
    assert (lay.col_counts()[:, 0] == nb).all()
    assert lay.block_density < 0.015

    tracemalloc.start()
    try:
        build_layout(p, t, heads, block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < t * t // 32, f"peak allocation {peak / 2**20:.0f} MiB"
    assert peak < 256 * 2 ** 20


def test_mask_refuses_huge_sequences():
    lay = build_layout(parse("window(4)"), MASK_LIMIT + 1, 1, 64)
    with pytest.raises(ValueError, match="seq_len"):
        lay.mask()
    op = patterncc.compile("window(4)")
    with pytest.raises(ValueError):
        op.mask(MASK_LIMIT + 1, 1)


BAD_SIZES = [
    (0, 1, 16), (-5, 1, 16), (1.5, 1, 16), ("64", 1, 16), (True, 1, 16), (None, 1, 16),
    (2 ** 31, 1, 64),
    (64, 0, 16), (64, -1, 16), (64, 2.0, 16), (64, None, 16),
    (64, 1, 0), (64, 1, 8), (64, 1, 48), (64, 1, 100), (64, 1, 512), (64, 1, -16), (64, 1, 16.0),
]


@pytest.mark.parametrize("seq_len,num_heads,block_size", BAD_SIZES)
def test_bad_sizes_raise_value_error(seq_len, num_heads, block_size):
    with pytest.raises(ValueError):
        build_layout(parse("window(4)"), seq_len, num_heads, block_size)


def test_bad_sizes_raise_value_error_through_the_cache(fresh_layout_cache):
    # LayoutCache.get converts its arguments with int() before build_layout checks them:
    # 1.5 becomes 1, "64" becomes 64, True becomes 1 and None raises TypeError.
    wrong = []
    for sizes in BAD_SIZES:
        try:
            get_layout(parse("window(4)"), *sizes)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 - reported below
            wrong.append((sizes, type(e).__name__))
        else:
            wrong.append((sizes, "accepted"))
    assert not wrong, f"get_layout did not raise ValueError for {wrong}"


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_every_supported_block_size(block_size):
    lay = build_layout(parse("window(40) | sink(3)"), 777, 2, block_size)
    assert lay.block_size == block_size
    check_layout(lay)


def test_save_npz_round_trip(tmp_path):
    lay = build_layout(parse(CARD), 1000, 4, 64)
    path = tmp_path / "lay.npz"
    lay.save_npz(path)
    z = np.load(path)
    assert str(z["pattern"]) == str(lay.pattern)
    assert int(z["seq_len"]) == 1000 and int(z["num_heads"]) == 4 and int(z["block_size"]) == 64
    for name in ("indptr", "kblock", "full", "t_indptr", "t_qblock", "t_entry"):
        np.testing.assert_array_equal(z[name], getattr(lay, name))
