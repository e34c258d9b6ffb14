"""The generated Triton kernels against the float64 dense reference: output and dq, dk, dv.

Where the kernels run: on a CUDA machine, compiled on the GPU; without CUDA, on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1). Triton reads that variable when ``@jit``
decorates a function -- for patterncc that is when ``codegen.load`` imports a generated
module, not when ``triton`` is imported -- and codegen keys its module cache on the flag.
So the module-scoped ``interpreter`` fixture below sets the variable (and a private kernel
cache directory) for this file only, and it works whatever other test modules imported
before; no subprocess is needed. The interpreter is slow: shapes stay small (T <= 333,
D <= 80, B <= 2, H <= 4) with 32/64-token blocks where the case allows.

Every buffer the kernels write (out, LSE, Delta, dq, dk, dv) is allocated full of NaN
(``poisoned`` fixture), so an element a kernel fails to write shows up as NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterncc
from patterncc import codegen, lowering
from patterncc.backends import triton_backend, tuning
from patterncc.layout import get_layout
from reference import reference_attention, rel_err
from strategies import pattern_sources

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def interpreter(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATTERNCC_CACHE_DIR", str(tmp_path_factory.mktemp("pcc_kernels")))
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    from patterncc.backends import triton_backend

    def nan_empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(triton_backend, "_empty", nan_empty)


def _inputs(b, h, hkv, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda hh: torch.randn(b, hh, t, d, generator=g).to(dtype).to(DEVICE).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def run_case(src, t, h=2, hkv=None, d=32, b=1, bs=32, dtype=torch.float32, split=None, scale=None, seed=0):
    """Run the kernels and the reference; return (errors of out/dq/dk/dv, out, grads, mask)."""
    from patterncc.backends import triton_backend

    hkv = hkv or h
    pattern = patterncc.parse(src)
    layout = get_layout(pattern, t, h, bs)
    q, k, v = _inputs(b, h, hkv, t, d, dtype, seed)
    scale = d ** -0.5 if scale is None else scale
    out = triton_backend.attention(q, k, v, layout, scale, split=split)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    mask = torch.from_numpy(layout.mask()).to(DEVICE)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, mask, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    errs = [rel_err(out, ref)] + [rel_err(a, r) for a, r in zip(grads, ref_grads)]
    for x in (out, *grads):
        assert torch.isfinite(x).all(), "NaN/inf in the kernel's output or gradients (unwritten elements?)"
    return errs, out, grads, mask


def assert_close(errs, tol=FP32_TOL):
    names = ("out", "dq", "dk", "dv")
    bad = {n: e for n, e in zip(names, errs) if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"


# (pattern, T, H, H_kv, D, B, block size, split)
CASES = [
    ("window(8)", 100, 2, 2, 32, 1, 16, None),
    ("window(16) & causal", 77, 2, 2, 32, 1, 16, None),
    ("global([0, -1]) | window(4)", 129, 2, 2, 32, 1, 32, None),
    ("global([0, -1]) | window(4)", 129, 2, 1, 32, 1, 16, 2),  # heavy rows split: merged in-kernel
    ("global(10..40) | window(3)", 150, 1, 1, 16, 1, 32, 3),
    ("sink(4) | window(8) & causal", 120, 2, 2, 32, 1, 32, None),
    ("strided(8) & causal", 130, 2, 2, 32, 1, 32, None),
    ("block(24) | window(4)", 100, 2, 2, 32, 1, 32, None),
    ("block(32, width=1)", 100, 1, 1, 32, 1, 16, None),
    ("dense", 1, 1, 1, 16, 1, 16, None),
    ("dense", 70, 2, 1, 32, 2, 64, None),
    ("random(32, seed=1)", 200, 2, 2, 32, 1, 32, None),
    ("random(32, seed=1) & causal", 160, 2, 2, 32, 1, 32, None),
    ("(random(32, seed=1) & causal) | (random(64, seed=2) & window(40)) | sink(2)", 200, 2, 2, 16, 1, 32, None),
    ("window(4) | dilate(2, heads=[1])", 120, 2, 2, 32, 2, 32, None),
    ("window(6) | dilate(3)", 100, 1, 1, 32, 1, 16, None),
    ("window(8) | strided(64, heads=[1])", 200, 4, 2, 32, 1, 32, None),
    ("(window(4) | global([7], heads=[0, 2])) & causal", 150, 4, 4, 32, 1, 32, None),
    ("global([" + ", ".join(str(5 * i) for i in range(20)) + "]) & causal", 150, 2, 2, 32, 1, 32, None),  # table
    ("window(3) | global([" + ", ".join(str(-7 * i - 1) for i in range(18)) + "])", 140, 1, 1, 16, 1, 32, None),
    ("window(20) | global([3])", 333, 2, 2, 16, 1, 128, None),  # 128-token blocks: 2 x 2 tiles
    ("window(10) & causal", 90, 4, 1, 80, 1, 32, None),  # D=80 padded to 128, MQA
    ("block(64, width=1) | global(0..128) | random(192, seed=0)", 300, 2, 2, 32, 1, 64, None),  # BigBird
    # residue order (dilated heads permuted by t mod d): odd T, GQA, split rows, mixed heads
    ("window(5) | global([0, 7]) | dilate(2)", 101, 4, 2, 32, 1, 16, 3),
    ("(window(8) & causal) | dilate(3)", 130, 2, 2, 16, 2, 32, None),
    ("window(6) | dilate(2, heads=[0, 1])", 99, 4, 2, 32, 1, 16, None),
    # classes longer than any tile (division-free tokens): tiles straddle class ends, empty slots
    ("window(5) | global([0, 7]) | dilate(2)", 301, 2, 1, 16, 1, 16, 5),
    ("(window(8) & causal) | dilate(3)", 400, 2, 2, 32, 1, 32, None),
    ("window(4) | dilate(2, heads=[1])", 261, 2, 2, 16, 1, 16, None),  # and a token-order head beside
    # one factor for all heads, d | T, classes a multiple of the tiles: strided TMA boxes ("tma" tiles)
    ("window(5) | global([0, 7]) | dilate(2)", 256, 2, 1, 32, 1, 16, 5),
    ("(window(8) & causal) | dilate(3)", 384, 2, 2, 16, 2, 32, None),
    ("window(6) | dilate(2)", 192, 2, 2, 80, 1, 32, None),  # D=80: boxes padded to 128 columns
    # d | T but T / d not a whole number of tiles: classes padded to the block, the boxes'
    # rows past T / d read as zeros (100 tokens in 112 positions; 130 in 160)
    ("window(5) | global([0, 7]) | dilate(2)", 200, 2, 1, 32, 1, 16, 5),
    ("(window(8) & causal) | dilate(3)", 390, 2, 2, 16, 2, 32, None),
]

# Launch configurations: the default, and tiles taller than the layout block (rows stack
# two to four layout blocks; the walked axis is cut into sub-tiles).
TILES = {
    "default": {},
    "stacked": {("fwd", 64): (128, 32), ("dq", 64): (128, 16), ("dkdv", 64): (16, 128),
                ("fwd", 128): (128, 32), ("dq", 128): (128, 16), ("dkdv", 128): (16, 128)},
    # walked tiles through TMA tensor descriptors (token order; residue order where
    # lowering.residue_stride allows, with RESIDUE_TMA on; else it falls back to pointers)
    "tma": {("fwd", 64): (64, 32, 4, 2, True), ("dq", 64): (64, 16, 4, 2, True), ("dkdv", 64): (16, 64, 4, 2, True),
            ("fwd", 128): (64, 32, 4, 2, True), ("dq", 128): (64, 16, 4, 2, True), ("dkdv", 128): (16, 64, 4, 2, True)},
}


@pytest.fixture(params=list(TILES))
def tiles(request, monkeypatch):
    for key, cfg in TILES[request.param].items():
        monkeypatch.setitem(triton_backend.CONFIGS, key, triton_backend.KernelConfig(*cfg))
    if request.param == "tma":
        monkeypatch.setattr(lowering, "RESIDUE_TMA", True)
    if request.param == "stacked":
        monkeypatch.setattr(lowering, "STACK_WASTE", 1e9)  # stack whatever the waste: test the tall rows
        monkeypatch.setattr(lowering, "TALL_ONLY_GATHERED", False)  # in token order too
    return request.param


@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split", CASES, ids=[f"{c[0][:40]}-T{c[1]}" for c in CASES])
def test_matches_reference_fp32(src, t, h, hkv, d, b, bs, split, tiles):
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)


@pytest.mark.parametrize("src,t,bs,mode", [
    ("window(8)", 100, 16, 0),                               # token order
    ("window(6) | dilate(3)", 100, 16, 2),                   # classes of 34 < a 64-row tile
    ("window(5) | global([0, 7]) | dilate(2)", 301, 16, 1),  # classes of 151
    ("(window(8) & causal) | dilate(3)", 400, 32, 1),        # classes of 134
    ("window(4) | dilate(2, heads=[1])", 261, 16, 1),        # classes of 131, head 0 in token order
])
def test_order_mode_of_the_residue_cases(src, t, bs, mode, tiles):
    """The cases above run the order mode they are there for (tall tiles included)."""
    lay = get_layout(patterncc.parse(src), t, 2, bs)
    q, k, _ = _inputs(1, 2, 2, t, 16, torch.float32)
    assert triton_backend._Launch(q, k, lay, None).consts["PERMUTED"] == mode


@pytest.mark.parametrize("src,t,h,bs,expect", [
    ("window(5) | global([0, 7]) | dilate(2)", 256, 2, 16, True),   # the CASES that take the boxes
    ("(window(8) & causal) | dilate(3)", 384, 2, 32, True),
    ("window(6) | dilate(2)", 192, 2, 32, True),
    ("window(8)", 256, 2, 16, True),                                # token order: always
    ("window(5) | global([0, 7]) | dilate(2)", 301, 2, 16, False),  # d does not divide T
    ("window(4) | dilate(2, heads=[1])", 256, 2, 16, False),        # a token-order head beside
    ("window(6) | dilate(2)", 200, 2, 16, True),                    # classes of 100, padded to 112
    ("(window(8) & causal) | dilate(3)", 390, 2, 32, True),         # classes of 130, padded to 160
])
def test_residue_order_walks_take_strided_boxes_only_where_they_fit(src, t, h, bs, expect, monkeypatch):
    """With TMA configs and RESIDUE_TMA, every walked tile of these layouts comes through a
    descriptor (4-D in residue order) or none does; RESIDUE_TMA off keeps residue order on
    pointers. The CASES above with T = 256, 384, 192, 200 and 390 therefore test the boxes' values."""
    for key, cfg in TILES["tma"].items():
        monkeypatch.setitem(triton_backend.CONFIGS, key, triton_backend.KernelConfig(*cfg))
    lay = get_layout(patterncc.parse(src), t, h, bs)
    q, k, _ = _inputs(1, h, h, t, 16, torch.float32)
    for residue_tma in (True, False):
        monkeypatch.setattr(lowering, "RESIDUE_TMA", residue_tma)
        run = triton_backend._Launch(q, k, lay, None)
        for kind in tuning.KINDS:
            bm, bn, _ = run.tiles(kind)
            descs, tma = run.walked(kind, (k, k), bm if kind == "dkdv" else bn)
            want = expect and (residue_tma or not run.plan.permuted)
            assert tma == want, (kind, residue_tma)
            if tma:
                assert len(descs[0].shape) == (4 if run.plan.permuted else 3)


def test_split_rows_merge_in_kernel_deterministically_and_reset_their_counters():
    pattern = patterncc.parse("window(4) | global([0, -1])")
    layout = get_layout(pattern, 150, 2, 16)
    q, k, v = _inputs(2, 2, 1, 150, 16, torch.float32)
    runs = []
    for _ in range(2):
        out = triton_backend.attention(q, k, v, layout, 0.25, split=2)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    plan = lowering.plan_for(layout, codegen.analyse(pattern), DEVICE, group=2, split=2,
                             tiles=lowering.Tiles(4, 4, 4), head_dim=16, itemsize=4)
    for walk in (plan.fwd, plan.dq, plan.kv):
        assert walk.items.n_merge > 0
        for counters in walk._counters.values():
            assert (counters == 0).all()
        assert walk._counters  # the kernels used these counters


def test_split_rows_first_or_spread_changes_the_launch_order_not_the_results(monkeypatch):
    pattern = patterncc.parse("window(4) | global([0, -1])")
    layout = get_layout(pattern, 320, 2, 16)
    q, k, v = _inputs(1, 2, 1, 320, 16, torch.float32)
    runs = []
    orders = []
    for first, spread in ((False, 0.0), (True, 0.0), (True, 0.6)):
        monkeypatch.setattr(lowering, "SPLIT_FIRST", first)
        monkeypatch.setattr(lowering, "SPREAD_PIECES", spread)
        out = triton_backend.attention(q, k, v, layout, 0.25, split=16)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
        plan = lowering.plan_for(layout, codegen.analyse(pattern), DEVICE, group=2, split=16,
                                 tiles=lowering.Tiles(4, 4, 4), head_dim=16, itemsize=4)
        for walk in (plan.fwd, plan.dq, plan.kv):
            assert 0 < walk.items.n_slots < walk.items.n_items  # some rows split, not all
        orders.append(plan.fwd.items.row.tolist())
    # (16-token blocks: no thin-row pieces, so spreading leaves the order as SPLIT_FIRST made it)
    assert orders[0] == sorted(orders[0]) and orders[1] != orders[0] and orders[2] == orders[1]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)  # partials merge in slot order whatever order items run in


def test_spread_thin_row_pieces_change_the_launch_order_not_the_results(monkeypatch):
    """lowering.SPREAD_PIECES: a global query's thin-row pieces spread among the other items
    (even in this short launch: SPREAD_SLOTS = 1) give the results of all pieces first."""
    pattern = patterncc.parse("window(16) | global([0])")
    layout = get_layout(pattern, 640, 2, 64)
    q, k, v = _inputs(1, 2, 1, 640, 16, torch.float32)
    monkeypatch.setattr(lowering, "SPREAD_SLOTS", 1)
    runs, orders = [], []
    for spread in (0.0, 0.8):
        monkeypatch.setattr(lowering, "SPREAD_PIECES", spread)
        out = triton_backend.attention(q, k, v, layout, 0.25, split=4)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
        items = triton_backend.launch_for(q, k, layout, 4).plan.fwd.items
        assert items.n_thin > 1
        orders.append((items.thin.cpu().numpy() >= 0).tolist())
    assert orders[0] != orders[1] and sum(orders[0]) == sum(orders[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# Forward rows whose far blocks only global queries attend (lowering.THIN_ROWS): odd T,
# GQA, two batches, split pieces, residue order, random blocks beside, 128-token blocks.
THIN_ROW_CASES = [
    ("window(16) | global([0, -1])", 300, 2, 1, 32, 2, 64, 2),
    ("window(8) | global([100, 101, 250])", 400, 4, 2, 80, 1, 64, None),
    ("window(5) | global([0, 7]) | dilate(2)", 301, 2, 1, 16, 1, 64, 2),
    ("window(16) | global([0]) | random(64, seed=3)", 500, 2, 2, 32, 1, 64, 3),
    ("window(20) | global([3])", 333, 2, 2, 16, 1, 128, None),
]
# forward / dQ configs (dK/dV: transposed): the default 64-row tile, TMA walked tiles, 32-row tiles
THIN_ROW_CONFIGS = {"default": None, "tma": (64, 32, 4, 2, True), "rows32": (32, 64)}


@pytest.mark.parametrize("config", list(THIN_ROW_CONFIGS))
@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split", THIN_ROW_CASES, ids=[c[0][:40] for c in THIN_ROW_CASES])
def test_thin_query_rows_match_reference(src, t, h, hkv, d, b, bs, split, config, monkeypatch):
    """THIN_ROWS: a global query row's far blocks walked with 16-row tiles in the forward and
    dQ, their partials merged with the row's other items, and as 16-query tiles in dK/dV;
    outputs poisoned, so rows a thin partial leaves to the merge must still be written."""
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    if THIN_ROW_CONFIGS[config]:
        width = tuning.width_class(lowering.head_pad(d))
        for kind in ("fwd", "dq"):
            monkeypatch.setitem(triton_backend.CONFIGS, (kind, width), triton_backend.KernelConfig(*THIN_ROW_CONFIGS[config]))
        bm, bn, *rest = THIN_ROW_CONFIGS[config]  # dK/dV: the walked (query) tile is BLOCK_M
        monkeypatch.setitem(triton_backend.CONFIGS, ("dkdv", width), triton_backend.KernelConfig(bn, bm, *rest))
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    q, k, _ = _inputs(b, h, hkv, t, d, torch.float32)
    run = triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, h, bs), split)
    assert run.plan.fwd.items.n_thin > 0, "the case has no thin-row item: it tests nothing new"
    assert run.plan.dq is run.plan.fwd and run.plan.kv.n_narrow > 0
    assert run.tiles("fwd")[0] == run.tiles("dq")[0] == (32 if config == "rows32" else 64)


# Key rows whose far query blocks attend only their global keys (lowering.THIN_KEYS): the
# thin-row cases (GQA, odd T, residue order, random blocks beside, 128-token blocks, where a
# thin-key step is half a query block), and a key block with global keys in two 16-key sub-blocks.
THIN_KEY_CASES = THIN_ROW_CASES + [("window(8) | global([0, 5, 40, -1])", 301, 2, 1, 32, 2, 64, 3)]


# The forward's first thin-column step outside its loop (codegen.PEEL_THIN_COLUMN): residue
# order with split rows, GQA and odd T; 128-token blocks (two query tiles a row); and rows
# with three narrow entries (global keys in three 16-key sub-blocks: the unpipelined loop).
# Each with the most narrow entries some row of it has at least.
PEEL_CASES = [(*THIN_KEY_CASES[2], 1), (*THIN_KEY_CASES[4], 1), (*THIN_KEY_CASES[5], 3)]


@pytest.mark.parametrize("peel", [True, False])
@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split,entries", PEEL_CASES, ids=[c[0][:40] for c in PEEL_CASES])
def test_first_thin_column_step_outside_its_loop_matches_reference(src, t, h, hkv, d, b, bs, split, entries, peel,
                                                                   monkeypatch):
    """PEEL_THIN_COLUMN (on by default): a row's first narrow entry starts the online softmax
    from the empty state outside the loop, the others follow in it; or (off) every entry in
    the pipelined loop. Matched to the float64 reference with poisoned outputs."""
    monkeypatch.setattr(codegen, "PEEL_THIN_COLUMN", peel)
    assert f"PEEL_THIN_COLUMN = tl.constexpr({peel})" in codegen.load(patterncc.parse(src)).source
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    q, k, _ = _inputs(b, h, hkv, t, d, torch.float32)
    items = triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, h, bs), split).plan.fwd.items
    assert (items.narrow_end - items.narrow_start).max() >= entries, "no row with the narrow entries the case is for"


# On (the default), the thin-row cases are test_thin_query_rows_match_reference's runs; so
# here they run off, and the case those lack runs both ways.
THIN_KEY_RUNS = [(*c, False) for c in THIN_KEY_CASES] + [(*THIN_KEY_CASES[-1], True)]


@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split,thin_keys", THIN_KEY_RUNS,
                         ids=[f"{c[0][:40]}-{c[-1]}" for c in THIN_KEY_RUNS])
def test_thin_key_items_match_reference(src, t, h, hkv, d, b, bs, split, thin_keys, monkeypatch):
    """THIN_KEYS: dK/dV walks a key row's far query blocks, which attend only its global
    keys, in items of their own with 16-key tiles, summed with the row's other items; or
    (off) the whole key block. Outputs poisoned, float64 reference."""
    monkeypatch.setattr(lowering, "THIN_KEYS", thin_keys)
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    q, k, _ = _inputs(b, h, hkv, t, d, torch.float32)
    run = triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, h, bs), split)
    assert (run.plan.kv.items.n_thin > 0) == thin_keys, "the case has no thin-key item: it tests nothing new"
    if thin_keys and src.startswith("window(8) | global([0, 5"):  # 0, 5 and 40 of block 0; 299 of block 4
        it = run.plan.kv.items
        subs = {(r, s) for r, s in zip(it.row.tolist(), it.thin.tolist()) if s >= 0}
        assert subs == {(0, 0), (0, 2), (4, 2)}


# PAIR_THIN off for every case, and forced on past PAIR_THIN_MAX_HEAD_PAD (D=80, padded to 128);
# on up to it is the default that test_thin_query_rows_match_reference runs.
PAIR_THIN_CASES = [(*c, False) for c in THIN_ROW_CASES] + [(*c, True) for c in THIN_ROW_CASES if c[4] > 64]


@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split,pair_thin", PAIR_THIN_CASES,
                         ids=[f"{c[0][:40]}-{c[-1]}" for c in PAIR_THIN_CASES])
def test_thin_row_items_one_or_two_key_tiles_a_step(src, t, h, hkv, d, b, bs, split, pair_thin, monkeypatch):
    """PAIR_THIN: thin-row items walk two key tiles per online-softmax step (pieces of odd and
    even lengths) even past PAIR_THIN_MAX_HEAD_PAD when forced, or one a step; the forward
    launch gets the flag as set. Outputs poisoned, float64 reference."""
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    monkeypatch.setattr(triton_backend, "PAIR_THIN", pair_thin)
    monkeypatch.setattr(triton_backend, "PAIR_THIN_MAX_HEAD_PAD", 1024)
    seen = []
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch", lambda self, name, *a, **kw: (
        seen.append(kw["PAIR_THIN"]) if name == "_attn_fwd" else None, real(self, name, *a, **kw))[1])
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    assert seen == [pair_thin]


def test_thin_row_pairs_only_up_to_their_head_dim(monkeypatch):
    """By default the forward pairs thin-row tiles at D=64 and not past PAIR_THIN_MAX_HEAD_PAD."""
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    seen = []
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch", lambda self, name, *a, **kw: (
        seen.append((self.d_pad, kw["PAIR_THIN"])) if name == "_attn_fwd" else None, real(self, name, *a, **kw))[1])
    layout = get_layout(patterncc.parse("window(16) | global([0, -1])"), 300, 2, 64)
    for d in (64, 128):
        q, k, v = _inputs(1, 2, 2, 300, d, torch.float32)
        assert triton_backend.launch_for(q, k, layout, 2).plan.fwd.items.n_thin > 0
        triton_backend.forward(q, k, v, layout, 0.1, split=2)
    assert triton_backend.PAIR_THIN_MAX_HEAD_PAD == 64 and seen == [(64, True), (128, False)]


@pytest.mark.parametrize("src,h,empty_heads", [
    ("global([3]) & causal", 4, ()),          # queries 0..2 see no key
    ("window(2, heads=[0])", 2, (1,)),       # head 1 sees nothing at all
    ("window(4, heads=[1]) | (global([60]) & causal)", 4, ()),
])
def test_empty_rows_give_zero_output_and_gradients(src, h, empty_heads):
    t = 90
    errs, out, (dq, dk, dv), mask = run_case(src, t, h, hkv=h // 2, d=16, bs=32)
    assert_close(errs)
    empty = ~mask.any(-1)  # [H, T] query rows no key reaches
    assert empty.any()
    assert (out[:, empty] == 0).all()
    assert (dq[:, empty] == 0).all()
    for head in empty_heads:
        assert (out[:, head] == 0).all() and (dq[:, head] == 0).all()
    never_seen = ~mask.any(-2)  # keys no query of a head reads; with H_kv = H/2 check pairs
    pair = never_seen.view(h // 2, 2, t).all(1)
    assert (dk[:, pair] == 0).all() and (dv[:, pair] == 0).all()


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("scale", [0.3, -0.7, 0.0])
def test_scale_and_odd_lengths(monkeypatch, scale, fold):
    """Any finite scale, with the forward's scale folded into exp2 (positive scales) or not."""
    monkeypatch.setattr(lowering, "FOLD_SCALE", fold)
    for t in (1, 33, 65):
        errs, *_ = run_case("window(5) | sink(1)", t, 1, d=16, bs=32, scale=scale)
        assert_close(errs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # bf16 under the interpreter runs its dots in fp32 (UPCAST): Triton 3.9's interpreter
    # computes bf16 tl.dot wrongly; loads, stores and conversions are still bf16.
    errs, *_ = run_case("(window(8) | global([0])) & causal", 100, 2, 1, 32, 1, 32, dtype=dtype)
    assert_close(errs, 1e-2)


@settings(max_examples=6, deadline=None)
@given(src=pattern_sources(max_index=48, num_heads=2, max_leaves=3),
       t=st.integers(48, 130), bs=st.sampled_from((16, 32)), gqa=st.booleans())
def test_generated_patterns(src, t, bs, gqa):
    errs, *_ = run_case(src, t, 2, 1 if gqa else 2, 16, 1, bs)
    assert_close(errs)


def test_new_sequence_length_reuses_the_kernel():
    from patterncc.backends import triton_backend

    pattern = patterncc.parse("window(6) & causal | sink(2)")
    q, k, v = _inputs(1, 2, 2, 64, 16, torch.float32)
    triton_backend.attention(q, k, v, get_layout(pattern, 64, 2, 32), 0.25)
    first = codegen.load(pattern)
    loads, hits = codegen.stats.loads, codegen.stats.hits
    q, k, v = _inputs(1, 2, 2, 97, 16, torch.float32)
    out = triton_backend.attention(q, k, v, get_layout(pattern, 97, 2, 32), 0.25)
    assert out.shape == (1, 2, 97, 16)
    assert codegen.stats.loads == loads  # nothing generated or imported again
    assert codegen.stats.hits > hits
    assert codegen.load(pattern) is first
    assert first.path.read_text() == first.source
    assert "# pattern: " + str(pattern) in first.source


@pytest.mark.parametrize("t,other", [(96, 97), (100, 112)])
def test_length_classes_warm_the_other_classs_dkdv_and_match_reference(t, other, monkeypatch):
    """codegen.SEQ_LEN_CLASSES (on by default): dK/dV leaves SEQ_LEN to Triton's specialisation
    (a multiple of 16 or not), so a backward compiles the other class's variant ahead for a
    new length to find, and off it warms nothing; results match the float64 reference."""
    from patterncc.backends import triton_backend
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", True)
    warmed = []
    real = triton_backend._Launch.warm
    monkeypatch.setattr(triton_backend._Launch, "warm", lambda self, name, grid, head, plan, tail, consts, **ch: (
        warmed.append((name, tail[2])), real(self, name, grid, head, plan, tail, consts, **ch))[1])
    errs, *_ = run_case("window(8) | global([0])", t, 2, 1, 32, 1, 32)
    assert_close(errs)
    assert ("_attn_bwd_dkdv", other) in warmed
    assert "DKDV_UNSPECIALISED = ['NR', 'B', 'H']" in codegen.load(patterncc.parse("window(8) | global([0])")).source
    assert [triton_backend.other_length_class(n) for n in (1, 15, 16, 97, 112)] == [16, 16, 17, 112, 113]
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", False)
    warmed.clear()
    errs, *_ = run_case("window(8) | global([0])", t, 2, 1, 32, 1, 32)
    assert_close(errs)
    assert not any(name == "_attn_bwd_dkdv" for name, _ in warmed)


def test_op_backend_triton_matches_torch_backend():
    src = "window(8) | global([0]) | random(32, seed=4)"
    q, k, v = _inputs(2, 4, 2, 100, 32, torch.float32, seed=3)
    out_t = patterncc.compile(src, block_size=32, backend="triton")(q, k, v)
    out_p = patterncc.compile(src, block_size=32, backend="torch")(q, k, v)
    assert rel_err(out_t, out_p) < FP32_TOL


def test_only_the_gradients_asked_for():
    from patterncc.backends import triton_backend

    layout = get_layout(patterncc.parse("window(8) & causal"), 70, 2, 32)
    q, k, v = _inputs(1, 2, 1, 70, 16, torch.float32)
    k, v = k.detach(), v.detach()
    dq, = torch.autograd.grad(triton_backend.attention(q, k, v, layout, 0.25).sum(), (q,))
    ref_q = q.detach().double().requires_grad_()
    ref = reference_attention(ref_q, k.double(), v.double(), torch.from_numpy(layout.mask()).to(DEVICE), 0.25)
    ref_dq, = torch.autograd.grad(ref.sum(), (ref_q,))
    assert rel_err(dq, ref_dq) < FP32_TOL


# Delta's writers: split rows (several regular items store it), residue order with GQA,
# thin-row items (they compute it, their row's regular item stores it), 128-token blocks.
DELTA_CASES = [CASES[3], CASES[23], THIN_ROW_CASES[0], THIN_ROW_CASES[4]]


@pytest.mark.parametrize("delta_in_dq", [True, False])
@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split", DELTA_CASES, ids=[c[0][:40] for c in DELTA_CASES])
def test_delta_from_the_dq_pass_or_its_own_pass(src, t, h, hkv, d, b, bs, split, delta_in_dq, monkeypatch):
    """DELTA_IN_DQ: the dQ pass computes Delta = rowsum(dO * O) and stores it for the dK/dV
    pass launched after it, no preprocess launch; off, the preprocess pass first. Delta is
    poisoned like every output: a row no item stores gives NaN in dK/dV."""
    monkeypatch.setattr(triton_backend, "DELTA_IN_DQ", delta_in_dq)
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    names = []
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch",
                        lambda self, name, *a, **kw: (names.append(name), real(self, name, *a, **kw))[1])
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    expect = ["_attn_bwd_dq", "_attn_bwd_dkdv"] if delta_in_dq else ["_attn_bwd_preprocess", "_attn_bwd_dq",
                                                                       "_attn_bwd_dkdv"]
    assert names == ["_attn_fwd", *expect]


@pytest.mark.parametrize("delta_in_dq", [True, False])
def test_dk_dv_alone_take_delta_from_its_own_pass(delta_in_dq, monkeypatch):
    """Without dQ there is no dQ pass to compute Delta: the preprocess pass runs whatever
    DELTA_IN_DQ says, and dK/dV match the reference."""
    monkeypatch.setattr(triton_backend, "DELTA_IN_DQ", delta_in_dq)
    layout = get_layout(patterncc.parse("window(5) | global([0, 7]) | dilate(2)"), 101, 2, 16)
    q, k, v = _inputs(1, 2, 1, 101, 16, torch.float32)
    q = q.detach()
    g = torch.randn(1, 2, 101, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dk, dv = torch.autograd.grad(triton_backend.attention(q, k, v, layout, 0.25, split=3), (k, v), g)
    ref_in = [x.detach().double().requires_grad_() for x in (k, v)]
    ref = reference_attention(q.double(), *ref_in, torch.from_numpy(layout.mask()).to(DEVICE), 0.25)
    ref_dk, ref_dv = torch.autograd.grad(ref, ref_in, g.double())
    assert rel_err(dk, ref_dk) < FP32_TOL and rel_err(dv, ref_dv) < FP32_TOL


def _stats_case(src, t, h, hkv, d, b, bs, split, passes, monkeypatch) -> list:
    """Run one case of the Delta writers (dQ, the Delta pass, or the Delta pass before dK/dV
    alone) against the float64 reference; the shapes of the buffers the backend allocated."""
    monkeypatch.setattr(triton_backend, "DELTA_IN_DQ", passes == "dq computes Delta")
    shapes = []
    poisoned_empty = triton_backend._empty
    monkeypatch.setattr(triton_backend, "_empty", lambda shape, like, dtype=None: (
        shapes.append(tuple(shape)), poisoned_empty(shape, like, dtype))[1])
    if passes == "dK/dV alone":
        layout = get_layout(patterncc.parse(src), t, h, bs)
        q, k, v = _inputs(b, h, hkv, t, d, torch.float32)
        q = q.detach()
        g = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        got = torch.autograd.grad(triton_backend.attention(q, k, v, layout, 0.25, split=split), (k, v), g)
        ref_in = [x.detach().double().requires_grad_() for x in (k, v)]
        ref = reference_attention(q.double(), *ref_in, torch.from_numpy(layout.mask()).to(DEVICE), 0.25)
        assert max(rel_err(a, r) for a, r in zip(got, torch.autograd.grad(ref, ref_in, g.double()))) < FP32_TOL
    else:
        errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
        assert_close(errs)
    return shapes


# Residue order's Delta writers and readers: split rows with GQA and odd T; a token-order
# head beside a residue-order one in the same launch.
STATS_CASES = [("window(5) | global([0, 7]) | dilate(2)", 157, 4, 2, 16, 2, 16, 5),
               ("window(4) | dilate(3, heads=[1])", 250, 2, 2, 16, 1, 16, None)]


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("passes", ["dq computes Delta", "Delta pass", "dK/dV alone"])
@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_residue_order_stats_by_position_or_by_token(src, t, h, hkv, d, b, bs, split, passes, on, monkeypatch):
    """codegen.POSITION_STATS: in residue order the pass that computes Delta (dQ, or the Delta
    pass before it or alone before dK/dV) stores it by kernel position, with a copy of the
    LSE, in [B, H, STATS_LEN] buffers that cover every position of the dQ walk (a multiple
    of 16, past T: classes are padded); off, Delta by token in [B, H, T]. Both are poisoned:
    a position no pass stores reads NaN in the gradients. Matched to the float64 reference."""
    monkeypatch.setattr(codegen, "POSITION_STATS", on)
    monkeypatch.setattr(codegen, "PAIRED_STATS", False)  # (pairs would store every launch's stats by position)
    shapes = _stats_case(src, t, h, hkv, d, b, bs, split, passes, monkeypatch)
    stats = [s for s in shapes if len(s) == 3 and s != (b, h, t)]  # (the forward's LSE is [B, H, T])
    if on:
        assert len(stats) == 2 and stats[0] == stats[1] and stats[0][2] > t and stats[0][2] % 16 == 0, shapes
    else:
        assert stats == [] and shapes.count((b, h, t)) == 2, shapes  # LSE, Delta


PAIR_CASES = [*STATS_CASES, ("window(6) | global([0, 40])", 139, 4, 2, 16, 2, 16, 3)]  # + token order


@pytest.mark.parametrize("passes", ["dq computes Delta", "Delta pass", "dK/dV alone"])
@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_stats_as_pairs_by_position(src, t, h, hkv, d, b, bs, split, passes, monkeypatch):
    """codegen.PAIRED_STATS: in every launch (token order too) the pass that computes Delta
    stores (LSE, Delta) pairs by kernel position in one [B, H, STATS_LEN, 2] buffer, read by
    dK/dV with one unmasked load (and by dQ after the Delta pass). Poisoned buffers, split
    rows, GQA, odd T, two batches; matched to the float64 reference."""
    monkeypatch.setattr(codegen, "PAIRED_STATS", True)
    monkeypatch.setattr(codegen, "PAIRED_STATS_MIN_HEAD_PAD", 0)  # these head dims are below the default's
    shapes = _stats_case(src, t, h, hkv, d, b, bs, split, passes, monkeypatch)
    pairs = [s for s in shapes if len(s) == 4 and s[-1] == 2]
    assert len(pairs) == 1 and pairs[0][:2] == (b, h) and pairs[0][2] >= t and pairs[0][2] % 16 == 0, shapes
    assert shapes.count((b, h, t)) == 1, shapes  # the forward's LSE only


@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("src,t,h,hkv,_,b,bs,split", [STATS_CASES[0], PAIR_CASES[-1]],
                         ids=["residue order", "token order"])
def test_stats_pairs_only_from_their_head_dim(src, t, h, hkv, _, b, bs, split, d, monkeypatch):
    """codegen.PAIRED_STATS_MIN_HEAD_PAD: pairs in launches whose padded head dim reaches it;
    below it LSE and Delta in two buffers (by position in residue order, by token in token
    order). Matched to the float64 reference with poisoned buffers."""
    monkeypatch.setattr(codegen, "PAIRED_STATS", True)
    monkeypatch.setattr(codegen, "PAIRED_STATS_MIN_HEAD_PAD", 32)
    shapes = _stats_case(src, t, h, hkv, d, b, bs, split, "dq computes Delta", monkeypatch)
    pairs = [s for s in shapes if len(s) == 4 and s[-1] == 2]
    assert len(pairs) == (d >= 32), shapes
    if d < 32:  # Delta and an LSE copy by position (residue order), or Delta by token
        assert shapes.count((b, h, t)) == (1 if "dilate" in src else 2), shapes


@pytest.mark.parametrize("kind,cfg", [("fwd", (32, 64)), ("fwd", (64, 16)), ("dkdv", (16, 64)),
                                      ("dkdv", (64, 32)), ("dq", (64, 16)), ("dq", (32, 64))])
def test_non_square_tiles_match_reference(kind, cfg, monkeypatch):
    """Every kernel is right with any tile that divides the layout block (bench/tune.py picks one)."""
    monkeypatch.setitem(triton_backend.CONFIGS, (kind, 64), triton_backend.KernelConfig(*cfg))
    errs, *_ = run_case("window(20) | global([3]) | random(64, seed=2)", 150, 2, 1, 32, 1, 64)
    assert max(errs) < 1e-4, errs


def test_launch_constants_are_built_once_per_key_and_rebuilt_when_an_input_of_them_changes(monkeypatch):
    """launch_for memoises a call's constants on the layout; shapes, dtype, split, the
    lowering switches and the tuning state are part of the key, so an A/B flip or a new
    config is never served stale constants."""
    layout = get_layout(patterncc.parse("window(8) | global([0])"), 130, 2, 32)
    q, k, _ = _inputs(1, 2, 2, 130, 16, torch.float32)
    first = triton_backend.launch_for(q, k, layout)
    assert triton_backend.launch_for(q, k, layout) is first
    assert triton_backend.launch_for(q.half(), k.half(), layout) is not first
    assert triton_backend.launch_for(q, k[:, :1], layout).group == 2
    assert triton_backend.launch_for(q, k, layout, split=2) is not first
    forced = triton_backend.KernelConfig(32, 32, 4, 2)
    monkeypatch.setitem(triton_backend.CONFIGS, ("fwd", 64), forced)
    assert triton_backend.launch_for(q, k, layout).cfg["fwd"] == forced
    monkeypatch.delitem(triton_backend.CONFIGS, ("fwd", 64))
    assert triton_backend.launch_for(q, k, layout) is first
    monkeypatch.setattr(lowering, "STACK_WASTE", 1e9)
    monkeypatch.setattr(lowering, "TALL_ONLY_GATHERED", False)
    stacked = triton_backend.launch_for(q, k, layout)
    assert stacked.tall["fwd"] and not first.tall["fwd"]
    explicit = {"fwd": forced}
    assert triton_backend.launch_for(q, k, layout, configs=explicit) is not triton_backend.launch_for(
        q, k, layout, configs=explicit)  # explicit overrides (the autotuner's candidates) are not kept


def test_a_settled_no_to_tuning_is_not_asked_again_until_the_flag_changes(monkeypatch):
    """A repeated call skips tuning.should_autotune once it said no for this launch (host
    time); PATTERNCC_AUTOTUNE is part of what is remembered, and a no given during a graph
    capture (where tuning is never allowed) is not remembered."""
    monkeypatch.setattr(triton_backend, "device_name", lambda x: "Fake GPU")
    layout = get_layout(patterncc.parse("window(8) | global([0])"), 130, 2, 32)
    q, k, _ = _inputs(1, 2, 2, 130, 16, torch.float32)
    run = triton_backend._Launch(q, k, layout, None)
    asked = []
    monkeypatch.setattr(tuning, "should_autotune", lambda *a, **kw: asked.append(a[0]) or False)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setenv("PATTERNCC_AUTOTUNE", "0")
    assert not triton_backend._should_tune(run, "fwd", q.dtype)
    capturing[0] = False
    for _ in range(3):
        assert not triton_backend._should_tune(run, "fwd", q.dtype)
    assert asked == ["fwd", "fwd"]  # once under capture (not kept), once after (kept)
    monkeypatch.setenv("PATTERNCC_AUTOTUNE", "1")
    assert not triton_backend._should_tune(run, "fwd", q.dtype)
    assert not triton_backend._should_tune(run, "dq", q.dtype)
    assert asked == ["fwd", "fwd", "fwd", "dq"]


@pytest.mark.parametrize("src,split,split_rows", [("window(4) | global([0])", 2, True),
                                                  ("window(4) & causal", None, False)])
def test_scratch_is_new_per_call_where_rows_split_and_a_shared_dummy_elsewhere(src, split, split_rows):
    layout = get_layout(patterncc.parse(src), 150, 2, 16)
    q, k, _ = _inputs(1, 2, 2, 150, 16, torch.float32)
    run = triton_backend.launch_for(q, k, layout, split=split)
    walk = run.plan.fwd
    assert (walk.items.n_slots > 0) == split_rows
    (a, m), (b, _) = run.scratch(walk, run.d_pad, 1), run.scratch(walk, run.d_pad, 1)
    assert (a is not b) if split_rows else (a is b is m is run.no_scratch)
    if split_rows:  # one allocation, split into the per-width buffers, each 16-byte aligned
        lead = (walk.items.n_slots, 1, walk.row_block)
        assert a.shape == (*lead, run.d_pad) and m.shape == lead and a.is_contiguous() and m.is_contiguous()
        assert m.data_ptr() == a.data_ptr() + a.numel() * 4 and m.data_ptr() % 16 == 0


def test_inference_calls_skip_autograd_and_match_the_recorded_path():
    """Without inputs that need gradients (or under no_grad) the op runs the forward
    directly: the same numbers, no graph node."""
    layout = get_layout(patterncc.parse("window(8) | global([0])"), 100, 2, 32)
    q, k, v = _inputs(1, 2, 1, 100, 16, torch.float32)
    recorded = triton_backend.attention(q, k, v, layout, 0.25)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        plain = triton_backend.attention(q, k, v, layout, 0.25)
    detached = triton_backend.attention(q.detach(), k.detach(), v.detach(), layout, 0.25)
    for out in (plain, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, recorded.detach())


def test_merge_counters_are_per_stream_where_rows_merge(monkeypatch):
    """Calls on two CUDA streams must not share merge counters (stream ids faked here: the
    interpreter runs on the CPU); a walk without split rows needs none of its own."""
    layout = get_layout(patterncc.parse("window(4) | global([0])"), 150, 2, 16)
    q, k, _ = _inputs(1, 2, 2, 150, 16, torch.float32)
    merged = triton_backend.launch_for(q, k, layout, split=2).plan.fwd
    plain = triton_backend.launch_for(q, k, get_layout(patterncc.parse("window(4) & causal"), 150, 2, 16)).plan.fwd
    assert merged.items.n_merge > 0 and plain.items.n_merge == 0
    monkeypatch.setattr(lowering, "_stream_id", lambda device: 7)
    on_7 = merged.counters(1, 1), plain.counters(1, 1)
    assert merged.counters(1, 1) is on_7[0]
    monkeypatch.setattr(lowering, "_stream_id", lambda device: 8)
    assert merged.counters(1, 1) is not on_7[0]
    assert plain.counters(1, 1) is on_7[1]


def test_a_register_cap_reaches_the_launch_options(monkeypatch):
    """KernelConfig.maxnreg goes to Triton as a launch option (compiled GPU code; the
    interpreter takes no options)."""
    monkeypatch.setitem(triton_backend.CONFIGS, ("fwd", 64), triton_backend.KernelConfig(64, 64, 8, 3, maxnreg=128))
    layout = get_layout(patterncc.parse("window(8) & causal"), 130, 2, 32)
    q, k, _ = _inputs(1, 2, 2, 130, 16, torch.float32)
    run = triton_backend.launch_for(q, k, layout)
    assert run.tiles("fwd")[2] == ({} if run.interp else {"num_warps": 8, "num_stages": 3, "maxnreg": 128})
    run = triton_backend._Launch(q, k, layout, None)  # a private one (launch_for's is shared)
    run.interp = False
    assert run._tile_shape("fwd")[2] == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert "maxnreg" not in run._tile_shape("dq")[2]


# DIRECT_LAUNCH: repeated launches straight into the compiled kernel. Under the interpreter
# there is no compiled kernel, so these tests drive DirectLaunches with stand-ins for a
# JITFunction and the CompiledKernel it returns (tests/gpu runs the real ones).

class _Compiled:
    function = "cubin handle"

    def __init__(self, calls: list):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("direct", grid, args))


class _Refusing(_Compiled):
    """A compiled kernel whose launcher takes its arguments some other way (another Triton)."""

    def __getitem__(self, grid):
        def run(*args):
            raise TypeError(f"function takes exactly 4 arguments ({len(args)} given)")
        return run


class _Jit:
    def __init__(self, calls: list, compiles: bool = True, compiled: type = _Compiled):
        self.calls, self.compiles, self.compiled = calls, compiles, compiled

        def fn(x, y, n, s, X, Y=7):  # positional arguments, then constexprs (Y has a default)
            pass
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled(self.calls) if self.compiles else None
        return launch


def test_direct_launches_reuse_the_compiled_kernel_only_while_its_specialisation_holds():
    calls: list = []
    jit, direct = _Jit(calls), triton_backend.DirectLaunches()
    x, y = torch.zeros(8), torch.zeros(8)
    unaligned = torch.zeros(9)[1:]
    assert unaligned.data_ptr() % 16

    def launch(grid=(3, 2), x=x, n=5, s=0.5, **kw):
        direct.launch("_k", jit, grid, (x, y, n, s), {"X": 1, "num_warps": 4, **kw})
        return calls[-1][0]
    assert launch() == "jit"
    assert launch() == "direct"
    # parameter order, defaults, 3-D grid; tensors as their addresses (POINTER_ARGS)
    assert calls[-1] == ("direct", (3, 2, 1), (x.data_ptr(), y.data_ptr(), 5, 0.5, 1, 7))
    assert launch(s=0.25) == "direct"          # floats are not specialised
    assert launch(x=torch.zeros(8)) == "direct"  # another aligned tensor
    for changed in ({"x": unaligned}, {"x": torch.zeros(8, dtype=torch.float16)}, {"n": 16}, {"n": 1},
                    {"X": 2}, {"num_warps": 8}, {"grid": (4, 2)}):
        assert launch(**changed) == "jit", changed  # a new specialisation: compiled by the JIT
        assert launch(**changed) == "direct", changed
    assert launch() == "direct"  # the first one is still kept


def test_a_refused_first_direct_launch_goes_through_the_jit_and_stops_direct_launches(monkeypatch):
    monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", True)
    calls: list = []
    jit, direct = _Jit(calls, compiled=_Refusing), triton_backend.DirectLaunches()
    x = torch.zeros(8)
    with pytest.warns(RuntimeWarning, match=r"direct launch of _k .*4 arguments.*PATTERNCC_DIRECT_LAUNCH=0"):
        for _ in range(2):
            direct.launch("_k", jit, (1,), (x, x, 5, 0.5), {"X": 1})
    assert [c[0] for c in calls] == ["jit", "jit"]  # the refused launch ran through the JIT, once
    assert triton_backend.DIRECT_LAUNCH is False and not direct._runners  # (the op checks the switch)


def test_a_direct_launch_that_worked_once_raises_its_errors():
    calls: list = []
    jit, direct = _Jit(calls), triton_backend.DirectLaunches()
    x = torch.zeros(8)
    for _ in range(2):
        direct.launch("_k", jit, (1,), (x, x, 5, 0.5), {"X": 1})
    assert [c[0] for c in calls] == ["jit", "direct"]

    def broken(*args):
        raise TypeError("a later failure")
    direct._runners = dict.fromkeys(direct._runners, broken)
    with pytest.raises(TypeError, match="a later failure"):
        direct.launch("_k", jit, (1,), (x, x, 5, 0.5), {"X": 1})


def test_direct_launches_keep_nothing_without_a_compiled_kernel_or_for_unknown_arguments():
    for compiles, odd in ((False, 3), (True, object())):
        calls: list = []
        jit, direct = _Jit(calls, compiles=compiles), triton_backend.DirectLaunches()
        for _ in range(3):
            direct.launch("_k", jit, (1,), (torch.zeros(8), torch.zeros(8), odd, 1.0), {"X": 1})
        assert [c[0] for c in calls] == ["jit"] * 3


def test_direct_launches_leave_the_fixed_plan_arguments_out_of_the_key():
    """The plan's tensors (``fixed``) are the same kinds on every launch: another object
    there launches directly, a changed argument outside the range compiles anew, and a
    fixed argument that cannot be keyed keeps the launch on the JIT path."""
    calls: list = []
    jit, direct = _Jit(calls), triton_backend.DirectLaunches()
    x, plan = torch.zeros(8), torch.zeros(8)
    unaligned = torch.zeros(9)[1:]

    def launch(x=x, y=plan, n=5, fixed=(1, 2)):
        direct.launch("_k", jit, (1,), (x, y, n, 0.5), {"X": 1}, fixed)
        return calls[-1][0]
    other = torch.zeros(8)
    assert [launch(), launch(y=other)] == ["jit", "direct"]
    assert calls[-1][2][0] == x.data_ptr() and calls[-1][2][1] is other  # this launch's (no addresses given)
    assert launch(y=unaligned) == "direct"  # not keyed (the caller promises it cannot change)
    assert [launch(x=unaligned), launch(x=unaligned)] == ["jit", "direct"]
    assert [launch(n=16), launch(n=16)] == ["jit", "direct"]
    calls.clear()
    direct = triton_backend.DirectLaunches()
    assert [launch(y=object()), launch(y=object())] == ["jit", "jit"]


def test_direct_launches_pass_addresses_given_for_the_fixed_arguments_or_tensors_without_pointer_args(monkeypatch):
    calls: list = []
    jit, direct = _Jit(calls), triton_backend.DirectLaunches()
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(2):
        direct.launch("_k", jit, (1,), (x, y, 5, 0.5), {"X": 1}, (1, 2), (1234,))
    assert calls[-1] == ("direct", (1, 1, 1), (x.data_ptr(), 1234, 5, 0.5, 1, 7))
    monkeypatch.setattr(triton_backend, "POINTER_ARGS", False)
    direct.launch("_k", jit, (1,), (x, y, 5, 0.5), {"X": 1}, (1, 2), (1234,))
    assert calls[-1][0] == "direct" and calls[-1][2][:2] == (x, y)


def test_walk_args_give_the_plan_tensors_and_their_addresses_once_per_counters():
    lay = get_layout(patterncc.parse("window(16) | global([0])"), 256, 2, 32)
    q = torch.randn(1, 2, 256, 16)
    run = triton_backend._Launch(q, q, lay, None)
    walk = run.plan.fwd
    tensors, pointers = run.walk_args(walk, 1)
    assert tensors[0] is walk.counters(1, 1) and all(isinstance(t, torch.Tensor) for t in tensors)
    assert pointers == tuple(t.data_ptr() for t in tensors)
    assert run.walk_args(walk, 1)[0] is tensors  # built once


def test_direct_launches_key_tensor_descriptors_by_block_shape():
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    calls: list = []
    jit, direct = _Jit(calls), triton_backend.DirectLaunches()
    base = torch.zeros(64, 16)  # (descriptors need aligned bases: Triton asserts it)

    def launch(x, block):
        desc = TensorDescriptor(x, [64, 16], [16, 1], block)
        direct.launch("_k", jit, (1,), (desc, x, 3, 1.0), {"X": 1})
        return calls[-1][0]
    assert [launch(base, [16, 16]), launch(base, [16, 16])] == ["jit", "direct"]
    assert [launch(base, [32, 16]), launch(base, [32, 16])] == ["jit", "direct"]


def test_direct_launch_is_a_switch_and_off_under_the_interpreter(monkeypatch):
    lay = get_layout(patterncc.parse("window(16)"), 64, 1, 32)
    q = torch.randn(1, 1, 64, 16)
    run = triton_backend._Launch(q, q, lay, None)  # a private one (launch_for's is shared)
    calls: list = []
    monkeypatch.setattr(run, "gen", type("Gen", (), {"kernel": lambda self, name: _Jit(calls)})())
    args = (q, q, 3, 1.0)
    for direct, interp, expect in ((False, False, ["jit", "jit"]), (True, True, ["jit", "jit"]),
                                   (True, False, ["jit", "direct"])):
        monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", direct)
        monkeypatch.setattr(run, "interp", interp)
        calls.clear()
        run.launch("_k", (1,), args, X=1)
        run.launch("_k", (1,), args, X=1)
        assert [c[0] for c in calls] == expect, (direct, interp)


@pytest.mark.parametrize("env, expect", [(None, True), ("1", True), ("0", False)])
def test_direct_launch_is_on_unless_the_environment_turns_it_off(env, expect):
    environ = {k: v for k, v in os.environ.items() if k != "PATTERNCC_DIRECT_LAUNCH"}
    if env is not None:
        environ["PATTERNCC_DIRECT_LAUNCH"] = env
    code = "from patterncc.backends import triton_backend as t; print(t.DIRECT_LAUNCH)"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expect)


@pytest.mark.parametrize("src", ["window(16) | global([0])", "window(16) | dilate(2)", "window(8) & causal"])
def test_every_launch_has_arguments_the_direct_path_can_key(src, monkeypatch):
    """A numpy int or another unkeyable argument would silently keep DIRECT_LAUNCH on the JIT
    path: every kernel's real arguments (forward and backward) must key."""
    keyed: dict = {}
    real = codegen.Generated.kernel

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                keyed[self.name] = triton_backend._specialised(args) is not None
                return self.kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(codegen.Generated, "kernel", lambda self, name: Spy(name, real(self, name)))
    op = patterncc.compile(src, block_size=32, backend="triton")
    q, k, v = _inputs(1, 2, 2, 96, 16, torch.float32)
    op(q, k, v).sum().backward()
    op(q.detach(), k, v).sum().backward()  # (no dQ: Delta from its own pass)
    assert keyed == dict.fromkeys(["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"], True)



# Forward walks with and without TAIL entries (T a whole number of blocks or not; residue
# classes with empty slots or none), causal windows whose bands merge into one interval,
# thin columns and rows, GQA, split rows, 128-token blocks.
TAIL_FREE_CASES = [
    ("window(10) & causal", 96, 4, 1, 80, 1, 32, None, False),               # no tail, bands, MQA
    ("window(10) & causal", 90, 2, 2, 32, 1, 32, None, True),                # tail block
    ("window(16) & window(40) & causal", 128, 2, 2, 32, 2, 16, 3, False),    # three bands, split rows
    ("window(20) | global([3])", 256, 2, 2, 16, 1, 128, None, False),        # thin columns, 2 x 2 tiles
    ("window(16) | global([0, -1])", 320, 2, 1, 32, 1, 64, 2, False),        # thin rows (THIN_ROWS)
    ("window(6) | dilate(2)", 192, 2, 2, 32, 1, 32, None, False),            # residue order, full classes
    ("window(5) | global([0, 7]) | dilate(2)", 200, 2, 1, 32, 1, 16, 5, True),  # classes with empty slots
    ("(window(8) & causal) | dilate(3)", 384, 2, 2, 16, 2, 32, None, False),  # residue order and bands
]


@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split,tail", TAIL_FREE_CASES,
                         ids=[f"{c[0][:40]}-T{c[1]}" for c in TAIL_FREE_CASES])
def test_tail_free_forward_and_merged_bands_match_reference(src, t, h, hkv, d, b, bs, split, tail, tiles,
                                                          monkeypatch):
    """SKIP_TAIL_MASK: a forward walk with no TAIL entry launches the kernel compiled without
    the tail test (TAIL=False), one with such entries the general one, and compiles the other
    (warm) for the next length; MERGE_BANDS: diagonal bands tested as one interval. Outputs
    poisoned, float64 reference."""
    monkeypatch.setattr(triton_backend, "SKIP_TAIL_MASK", True)
    monkeypatch.setattr(codegen, "MERGE_BANDS", True)
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    seen, warmed = [], []
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch", lambda self, name, *a, **kw: (
        seen.append(kw["TAIL"]) if name == "_attn_fwd" else None, real(self, name, *a, **kw))[1])
    monkeypatch.setattr(triton_backend._Launch, "warm", lambda self, name, *a, **kw: (
        warmed.append((name, kw["TAIL"])) if name == "_attn_fwd" else None))  # (dK/dV warms its length class)
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    assert seen == [tail]
    assert warmed == [("_attn_fwd", not tail)]
    q, k, _ = _inputs(b, h, hkv, t, d, torch.float32)
    walk = triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, h, bs), split).plan.fwd
    flags = np.concatenate([walk.flags.cpu().numpy(), walk.narrow_flags.cpu().numpy().astype(np.int64)])
    assert walk.has_tail == tail == bool((flags & lowering.TAIL).any())
    assert walk.has_masked and ((flags & 1) == 0).any()


def test_an_explicit_launch_configuration_compiles_no_other_variant(monkeypatch):
    """The autotuner's candidates (forward / backward(configs=...)) do not warm the forward's
    other TAIL variant or dK/dV's other length class (SEQ_LEN_CLASSES): only the
    configuration a layout keeps does."""
    monkeypatch.setattr(triton_backend, "SKIP_TAIL_MASK", True)
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", True)
    warmed = []
    monkeypatch.setattr(triton_backend._Launch, "warm", lambda self, name, grid, head, plan, tail, consts, **kw: (
        warmed.append(kw["TAIL"] if name == "_attn_fwd" else (name, tail[2]))))
    q, k, v = _inputs(1, 2, 2, 96, 16, torch.float32)
    layout = get_layout(patterncc.parse("window(10) & causal"), 96, 2, 32)
    out, lse = triton_backend.forward(q, k, v, layout, 0.25, configs={"fwd": triton_backend.KernelConfig(32, 32)})
    triton_backend.backward(out, q, k, v, out, lse, layout, 0.25, need_q=False,
                            configs={"dkdv": triton_backend.KernelConfig(32, 32)})
    assert warmed == []
    out, lse = triton_backend.forward(q, k, v, layout, 0.25)
    triton_backend.backward(out, q, k, v, out, lse, layout, 0.25, need_q=False)
    assert warmed == [True, ("_attn_bwd_dkdv", 97)]  # no tail at T=96: the tail variant is the other one


@pytest.mark.parametrize("src,t,bs", [("block(64, width=1)", 192, 64), ("dense", 64, 16)])
def test_a_walk_of_full_entries_keeps_the_general_forward_kernel(src, t, bs, monkeypatch):
    """SKIP_TAIL_MASK leaves a walk with no masked entry on the TAIL=True kernel (its mask
    branch never runs there, and that kernel's FULL path is the shorter one), and compiles
    no other variant."""
    monkeypatch.setattr(triton_backend, "SKIP_TAIL_MASK", True)
    seen, warmed = [], []
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch", lambda self, name, *a, **kw: (
        seen.append(kw["TAIL"]) if name == "_attn_fwd" else None, real(self, name, *a, **kw))[1])
    monkeypatch.setattr(triton_backend._Launch, "warm", lambda self, name, *a, **kw: (
        warmed.append(a) if name == "_attn_fwd" else None))  # (dK/dV warms its length class)
    errs, *_ = run_case(src, t, 2, 2, 16, 1, bs)
    assert_close(errs)
    assert seen == [True] and warmed == []
    q, k, _ = _inputs(1, 2, 2, t, 16, torch.float32)
    walk = triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, 2, bs), None).plan.fwd
    assert not walk.has_masked and not walk.has_tail


# Residue-order launches whose PARTIAL tiles test class coordinates (lowering.CLASS_MASK):
# full classes (the tail-free forward) and classes with empty slots (the forward with the tail
# test), a token-order head beside (u = its token), GQA, batches, bands, split rows; and a
# pattern without class forms, which keeps testing tokens.
CLASS_CASES = [
    ("window(6) | dilate(2)", 192, 2, 2, 32, 1, 32, None, 6),                 # full classes, no tail
    ("window(5) | dilate(3)", 101, 2, 1, 16, 1, 16, None, 5),                 # empty slots, MQA
    ("(window(8) & causal) | dilate(3)", 130, 2, 2, 16, 2, 32, None, 8),      # bands, B = 2
    ("window(4) | dilate(2, heads=[1])", 261, 2, 2, 16, 1, 16, None, 4),      # head 0 in token order
    ("window(6) | dilate(2, heads=[0, 1])", 99, 4, 2, 32, 1, 16, None, 6),    # GQA groups of two
    ("window(12) | dilate(2)", 256, 2, 2, 32, 1, 16, 2, 12),                  # split rows, no tail
    ("window(5) | global([0, 7]) | dilate(2)", 101, 2, 2, 32, 1, 16, 3, 0),   # no class forms: tokens
]


@pytest.mark.parametrize("src,t,h,hkv,d,b,bs,split,gap", CLASS_CASES,
                         ids=[f"{c[0][:40]}-T{c[1]}" for c in CLASS_CASES])
def test_class_coordinate_masks_match_reference(src, t, h, hkv, d, b, bs, split, gap, tiles, monkeypatch):
    """CLASS_MASK: the forward and dQ of a residue-order launch with class forms get
    CLASS_GAP and test their PARTIAL tiles on class coordinates (dK/dV tests tokens);
    against the float64 reference, poisoned."""
    monkeypatch.setattr(lowering, "CLASS_MASK", True)
    monkeypatch.setattr(triton_backend, "SKIP_TAIL_MASK", True)  # tail-free forward where T allows
    seen = set()
    real = triton_backend._Launch.launch
    monkeypatch.setattr(triton_backend._Launch, "launch", lambda self, name, *a, **kw: (
        seen.add((name, kw.get("CLASS_GAP"))), real(self, name, *a, **kw))[1])
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    assert {g for name, g in seen if name in ("_attn_fwd", "_attn_bwd_dq")} == {gap}
    assert ("_attn_bwd_dkdv", None) in seen


# Residue-order walks with codegen.AFFINE_TOKENS_MAX_HEAD_PAD = 0: the other tests, at head
# dims up to 64, run the affine walked tokens; these run the general form. Full classes, empty
# slots, a token-order head beside, GQA, split rows and thin tiles (a global), short classes
# (order mode 2), batches.
WALKED_CASES = [c[:8] for c in CLASS_CASES[:6]] + [
    ("window(5) | global([0, 7]) | dilate(2)", 301, 2, 1, 16, 1, 16, 5),       # thin tiles, split rows, tails
    ("(window(8) & causal) | dilate(3)", 400, 2, 2, 32, 1, 32, None),          # classes longer than tiles
    ("window(3) | dilate(4)", 40, 1, 1, 16, 2, 16, None),                      # classes of 10 in 16 slots
]


# Every case with the default tiles; the ones with empty slots and GQA also with
# stacked rows and TMA tiles (the interpreter's time is the CI's budget).
WALKED_RUNS = [(c, "default") for c in WALKED_CASES] + [(WALKED_CASES[i], t) for i in (1, 4) for t in ("stacked", "tma")]


@pytest.mark.parametrize("case,tiles", WALKED_RUNS, indirect=["tiles"],
                         ids=[f"{c[0][:40]}-T{c[1]}-{t}" for c, t in WALKED_RUNS])
def test_general_walked_tokens_match_reference(case, tiles, monkeypatch):
    """Walked tiles' tokens by the general residue form (as for head dims past
    codegen.AFFINE_TOKENS_MAX_HEAD_PAD), in every pass; against the float64 reference,
    poisoned."""
    src, t, h, hkv, d, b, bs, split = case
    monkeypatch.setattr(codegen, "AFFINE_TOKENS_MAX_HEAD_PAD", 0)
    errs, *_ = run_case(src, t, h, hkv, d, b, bs, split=split)
    assert_close(errs)
    q, k, _ = _inputs(b, h, hkv, t, d, torch.float32)
    assert triton_backend.launch_for(q, k, get_layout(patterncc.parse(src), t, h, bs), split).consts["PERMUTED"]
    assert "AFFINE_MAX_HEAD_PAD = tl.constexpr(0)" in codegen.load(patterncc.parse(src)).source


def test_class_of_is_floor_division_for_every_residue_factor_the_lowering_allows():
    """kernels/common.py _class_of (a float reciprocal and one correction) against integer
    division, at class boundaries (k * seg and one before) and at random, for class lengths
    from one 16-token block to 2**24 and classes up to lowering.MAX_RESIDUE_FACTOR."""
    import triton
    import triton.language as tl
    global _CLASS_OF  # a kernel reaches other jit functions through its module's globals
    _CLASS_OF = codegen.load(patterncc.parse("window(4) | dilate(2)")).module._class_of

    @triton.jit
    def classes(A, S, Out, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Out + i, _CLASS_OF(tl.load(A + i), tl.load(S + i)))

    rng = np.random.default_rng(0)
    n = 4096
    seg = 16 * rng.integers(1, 2 ** 20, n)
    seg[:8] = [16, 48, 64, 1008, 2 ** 10 * 3, 2 ** 20, 2 ** 24 - 16, 2 ** 20 + 16]
    k = np.minimum(rng.integers(0, lowering.MAX_RESIDUE_FACTOR, n), (2 ** 31 - 1) // seg - 1)
    a = k * seg + rng.choice([0, -1, 1, 15], n)
    a[n // 2:] = rng.integers(0, np.minimum(seg[n // 2:] * lowering.MAX_RESIDUE_FACTOR, 2 ** 31 - 1))
    a = np.clip(a, 0, 2 ** 31 - 1)
    args = [torch.from_numpy(x.astype(np.int32)).to(DEVICE) for x in (a, seg)]
    out = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    classes[(1,)](*args, out, N=n)
    np.testing.assert_array_equal(out.cpu().numpy(), a // seg)
