"""Graph diagnostics (patterncc.analysis): theory, a dense reference, bounds, JSON and scale.

The dense reference builds the [T, T] union-over-heads mask (plus the residual self-loop)
and multiplies it out layer by layer; networkx gives the hop diameter and strong
connectivity of the same graph. Everything the analysis claims is checked against it,
against closed forms from the theory of sliding windows, and (block level) as bounds.
"""
from __future__ import annotations

import io
import json
import math
import re
import time
import tracemalloc

import networkx as nx
import numpy as np
import pytest
from hypothesis import given

import patterncc
from patterncc import analysis
from patterncc.analysis import (DiagnosticsReport, attention_graph, diagnose, format_table,
                                plot_growth, receptive_field_sizes)
from patterncc.layout import get_layout
from strategies import layout_cases

CARD = "window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)"
P = patterncc.parse


# ----------------------------------------------------------------------------------------
# dense reference (small T only)


def reference(pattern, seq_len, num_heads=1, block_size=16, layers=3):
    """(sizes [layers, T], strongly connected, hop diameter, layers to full coverage, causal)."""
    mask = get_layout(pattern, seq_len, num_heads, block_size).mask().any(0)
    causal = not np.triu(mask, 1).any()
    adj = (mask | np.eye(seq_len, dtype=bool)).astype(np.int64)  # adj[q, k]
    reach = np.eye(seq_len, dtype=np.int64)
    sizes = []
    for _ in range(layers):
        reach = (adj @ reach > 0).astype(np.int64)
        sizes.append(reach.sum(1))
    graph = nx.DiGraph()
    graph.add_nodes_from(range(seq_len))
    q, k = np.nonzero(mask)
    graph.add_edges_from(zip(k.tolist(), q.tolist()))
    strongly = nx.is_strongly_connected(graph)
    diameter = nx.diameter(graph) if strongly else None
    visible = np.arange(1, seq_len + 1) if causal else np.full(seq_len, seq_len)
    reach, full = np.eye(seq_len, dtype=np.int64), None
    for layer in range(1, 2 * seq_len + 2):
        nxt = (adj @ reach > 0).astype(np.int64)
        if (nxt.sum(1) == visible).all():
            full = layer
            break
        if (nxt == reach).all():
            break
        reach = nxt
    return np.array(sizes), strongly, diameter, full, causal


REFERENCE_CASES = [
    ("window(4)", 61, 1, 16),
    ("window(3) & causal", 50, 1, 16),
    ("global([0]) | window(2)", 70, 1, 32),
    ("window(2) | dilate(2)", 64, 2, 16),          # even offsets only: never connected
    ("window(2) | dilate(3, heads=[1])", 100, 2, 16),
    ("strided(7) | window(1)", 90, 1, 32),
    ("strided(2) | strided(3)", 97, 1, 16),        # interleaved progressions
    ("block(8, width=1)", 77, 1, 16),
    ("sink(2) | window(1)", 40, 1, 16),
    ("(block(16) | strided(16)) & causal", 100, 2, 16),
    ("random(16, seed=3) | window(1)", 130, 3, 16),
    ("global(-1) | window(1) & causal", 45, 1, 16),
    ("global(0..5) | random(32, seed=2) | window(3) | dilate(2, heads=1)", 129, 2, 32),
    ("window(5) & strided(2)", 64, 1, 16),
    ("block(16)", 64, 1, 16),
    ("dense", 33, 1, 16),
    ("window(0)", 17, 1, 16),
    ("window(2)", 1, 1, 16),
]


@pytest.mark.parametrize("squaring", [False, True], ids=["direct", "squaring"])
@pytest.mark.parametrize("src,seq_len,heads,block", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_token_level_matches_dense_reference(src, seq_len, heads, block, squaring, monkeypatch):
    if squaring:  # force the repeated-squaring path from the first step
        monkeypatch.setattr(analysis, "_DIRECT_STEPS", 0)
    pattern = P(src)
    sizes, strongly, diameter, full, causal = reference(pattern, seq_len, heads, block, layers=3)
    rep = diagnose(pattern, seq_len, num_heads=heads, layers=3, block_size=block, exact=True)
    assert rep.exact and rep.method.startswith("token")
    assert rep.causal == causal
    assert rep.strongly_connected == strongly
    assert rep.hop_diameter == diameter
    assert rep.layers_to_full_coverage == full
    assert (full is None) == (rep.full_coverage_reason is not None)
    np.testing.assert_array_equal(
        receptive_field_sizes(pattern, seq_len, num_heads=heads, layers=3, block_size=block, exact=True), sizes)
    visible = np.arange(1, seq_len + 1) if causal else np.full(seq_len, seq_len)
    for row, s in zip(rep.per_layer, sizes):
        assert (row.rf_min, row.rf_max, row.rf_median) == (s.min(), s.max(), np.median(s))
        assert row.coverage_min == pytest.approx((s / visible).min())
        assert row.unreachable_count == int((s < visible).sum())
        assert row.unreachable_positions == np.flatnonzero(s < visible)[:analysis.MAX_POSITIONS].tolist()


@given(layout_cases(max_seq_len=120, max_heads=3))
def test_random_patterns_match_reference_and_block_bounds(case):
    pattern, seq_len, heads, block = case
    sizes, strongly, diameter, full, _ = reference(pattern, seq_len, heads, block, layers=2)
    tok = diagnose(pattern, seq_len, num_heads=heads, layers=2, block_size=block, exact=True)
    assert (tok.strongly_connected, tok.hop_diameter, tok.layers_to_full_coverage) == (strongly, diameter, full)
    assert [r.rf_max for r in tok.per_layer] == sizes.max(1).tolist()
    blk = diagnose(pattern, seq_len, num_heads=heads, layers=2, block_size=block, exact=False)
    _check_block_bounds(blk, tok)
    bsizes = receptive_field_sizes(pattern, seq_len, num_heads=heads, layers=2, block_size=block, exact=False)
    assert (bsizes >= sizes).all()
    if blk.exact:
        np.testing.assert_array_equal(bsizes, sizes)


def _check_block_bounds(blk: DiagnosticsReport, tok: DiagnosticsReport) -> None:
    """What the block-level report guarantees about the exact token-level one."""
    for b, t in zip(blk.per_layer, tok.per_layer):
        assert b.rf_min >= t.rf_min and b.rf_max >= t.rf_max and b.rf_median >= t.rf_median
        assert b.coverage_min >= t.coverage_min - 1e-12
        assert b.unreachable_count <= t.unreachable_count          # incomplete ones are certain
        assert set(b.unreachable_positions) <= set(range(blk.seq_len))
    if blk.layers_to_full_coverage is None:                        # "never" is certain
        assert tok.layers_to_full_coverage is None
    elif tok.layers_to_full_coverage is not None:                  # otherwise a lower bound
        assert blk.layers_to_full_coverage <= tok.layers_to_full_coverage
    if not blk.strongly_connected:                                 # False is certain
        assert not tok.strongly_connected
    g = blk.graphs[0]
    if g.strongly_connected and g.strongly_connected_certain:
        assert tok.strongly_connected
    if tok.strongly_connected:
        assert blk.hop_diameter <= tok.hop_diameter                # lower bound
        if g.hop_diameter_upper is not None:
            assert g.hop_diameter_upper >= tok.hop_diameter        # upper bound from FULL blocks
    if blk.exact:
        assert [(r.rf_min, r.rf_median, r.rf_max) for r in blk.per_layer] == \
               [(r.rf_min, r.rf_median, r.rf_max) for r in tok.per_layer]
        assert (blk.hop_diameter, blk.strongly_connected, blk.layers_to_full_coverage) == \
               (tok.hop_diameter, tok.strongly_connected, tok.layers_to_full_coverage)


# ----------------------------------------------------------------------------------------
# theory


@pytest.mark.parametrize("w,seq_len", [(1, 40), (4, 101), (16, 300), (7, 1001), (64, 4096)])
def test_window_hop_diameter_and_full_coverage(w, seq_len):
    rep = diagnose(P(f"window({w})"), seq_len, layers=1)
    assert rep.strongly_connected and rep.diameter_reason is None
    assert rep.hop_diameter == math.ceil((seq_len - 1) / w)
    assert rep.layers_to_full_coverage == math.ceil((seq_len - 1) / w)


@pytest.mark.parametrize("w,seq_len,layers", [(1, 31, 20), (3, 101, 20), (10, 201, 12), (32, 1025, 18)])
def test_window_receptive_field_after_l_layers(w, seq_len, layers):
    sizes = receptive_field_sizes(P(f"window({w})"), seq_len, layers=layers)
    rep = diagnose(P(f"window({w})"), seq_len, layers=layers)
    middle = seq_len // 2  # odd T: the middle token has as much room on both sides
    for l in range(1, layers + 1):
        assert sizes[l - 1, middle] == min(seq_len, 2 * w * l + 1)
        assert sizes[l - 1, 0] == sizes[l - 1, -1] == min(seq_len, w * l + 1)
        row = rep.per_layer[l - 1]
        assert row.layer == l
        assert (row.rf_min, row.rf_max) == (min(seq_len, w * l + 1), min(seq_len, 2 * w * l + 1))
        assert row.coverage_min == pytest.approx(min(seq_len, w * l + 1) / seq_len)


@pytest.mark.parametrize("w,seq_len,exact", [(4, 200, True), (16, 1000, True), (64, 4096, True),
                                              (16, 1000, False), (64, 4096, False), (256, 65536, False)])
def test_global_token_makes_diameter_two(w, seq_len, exact):
    rep = diagnose(P(f"window({w}) | global([0])"), seq_len, layers=3, exact=exact)
    assert rep.strongly_connected and rep.hop_diameter == 2
    assert rep.layers_to_full_coverage == 2
    assert rep.per_layer[1].coverage_min == 1.0
    if exact:
        assert rep.exact and rep.per_layer[0].rf_max == seq_len      # token 0 sees everything
        assert rep.per_layer[0].rf_min == w + 2                        # T-1: its window and token 0


@pytest.mark.parametrize("w,seq_len", [(1, 50), (8, 100), (16, 513), (64, 4096)])
def test_causal_window_reaches_its_prefix(w, seq_len):
    rep = diagnose(P(f"window({w}) & causal"), seq_len, layers=3)
    assert rep.causal
    assert not rep.strongly_connected and rep.hop_diameter is None
    assert "causal" in rep.diameter_reason
    assert rep.layers_to_full_coverage == math.ceil((seq_len - 1) / w)
    assert rep.graphs[0].reach_diameter == math.ceil((seq_len - 1) / w)
    for row in rep.per_layer:  # token q sees min(q + 1, w l + 1) positions
        assert row.rf_max == min(seq_len, w * row.layer + 1)
        assert row.coverage_min == pytest.approx(min(seq_len, w * row.layer + 1) / seq_len)


def test_causality_is_detected_from_the_masks_not_the_name():
    assert diagnose(P("sink(1) | window(0)"), 32, layers=1).causal         # k = 0 or k = q
    assert not diagnose(P("window(4) & causal | global([5])"), 32, layers=1).causal
    prog = patterncc.parse_program("causal = true\nwindow(3)")
    assert diagnose(prog, 64, layers=1).causal


def test_per_layer_program_adds_the_windows_up():
    prog = patterncc.parse_program("layers 0..2: window(4)\nlayers 2..4: window(8)")
    seq_len = 201
    rep = diagnose(prog, seq_len, layers=6)          # past the program: window(8) repeats
    reach = np.cumsum([4, 4, 8, 8, 8, 8])
    assert [r.rf_max for r in rep.per_layer] == (2 * reach + 1).tolist()
    assert [r.rf_min for r in rep.per_layer] == (reach + 1).tolist()
    assert [r.pattern for r in rep.per_layer] == ["window(4)"] * 2 + ["window(8)"] * 4
    assert [r.hop_diameter for r in rep.per_layer] == [50] * 2 + [25] * 4
    assert rep.hop_diameter == 50                     # the first layer's graph
    assert rep.layers_to_full_coverage == 4 + math.ceil((seq_len - 1 - 24) / 8)
    assert diagnose(prog, seq_len).layers == 4        # default: the program's own layers


def test_coverage_runs_through_the_rest_of_the_program():
    prog = patterncc.parse_program("layers 0..1: window(1)\nlayers 1..3: window(1) | global([0])")
    rep = diagnose(prog, 100, layers=1)
    assert rep.layers == 1 and rep.per_layer[0].rf_max == 3
    assert rep.layers_to_full_coverage == 3           # layer 1, then two global layers


@pytest.mark.parametrize("kind", ["block", "window"])
def test_bigbird_random_blocks_give_a_logarithmic_diameter(kind):
    local = "block(64, width=1)" if kind == "block" else "window(64)"
    diameters = []
    for seq_len in (4096, 16384, 65536):
        rep = diagnose(P(f"{local} | random(64, seed=0)"), seq_len, num_heads=4, layers=1, exact=False)
        assert rep.strongly_connected
        diameters.append(rep.hop_diameter)
        if kind == "block":  # whole blocks everywhere: the block graph is exact
            assert rep.exact and rep.graphs[0].hop_diameter_upper == rep.hop_diameter
    nb = 65536 // 64
    alone = diagnose(P(local), 65536, num_heads=4, layers=1, exact=False).hop_diameter
    assert alone >= nb // 2 - 1                        # the window alone: linear in T
    assert diameters[-1] <= 2 * math.log2(nb)         # with random blocks: logarithmic
    assert diameters == sorted(diameters) and diameters[-1] - diameters[0] <= 4


# ----------------------------------------------------------------------------------------
# block level vs token level


@pytest.mark.parametrize("src,heads", [
    (CARD, 4), ("window(100) & causal", 1), ("block(64, width=1) | random(128, seed=4)", 3),
    ("window(40) | dilate(3)", 2), ("(sink(4) | window(300)) & causal", 2), ("strided(128) | block(128)", 1),
])
def test_block_level_over_approximates_token_level(src, heads):
    pattern = P(src)
    tok = diagnose(pattern, 2048, num_heads=heads, layers=4, exact=True)
    blk = diagnose(pattern, 2048, num_heads=heads, layers=4, exact=False)
    assert blk.method.startswith("block") and "guarantee" not in blk.method
    if not blk.exact:
        assert "upper bound" in blk.guarantee
    _check_block_bounds(blk, tok)
    # the automatic choice: token level up to EXACT_AUTO_MAX
    assert diagnose(pattern, 2048, num_heads=heads, layers=1).method.startswith("token")


def test_exact_limits():
    with pytest.raises(ValueError, match="exact"):
        diagnose(P("window(1)"), analysis.EXACT_MAX + 1, exact=True)
    with pytest.raises(ValueError, match="seq_len"):
        diagnose(P("window(1)"), 0)
    with pytest.raises(TypeError):
        diagnose(42, 100)
    assert diagnose(P("window(2)"), 8192, layers=1).method.startswith("block")


# ----------------------------------------------------------------------------------------
# disconnected patterns, head groups, report forms


@pytest.mark.parametrize("seq_len", [64, 1000, 65536])
def test_no_edges_between_blocks_is_never_connected(seq_len):
    rep = diagnose(P("block(16)"), seq_len, layers=2)
    assert not rep.strongly_connected and rep.hop_diameter is None
    assert rep.layers_to_full_coverage is None
    assert rep.full_coverage_reason.startswith("never") and "position" in rep.full_coverage_reason
    assert "not strongly connected" in rep.diameter_reason
    assert rep.graphs[0].unreachable_pairs > 0 and rep.graphs[0].strongly_connected_certain
    assert rep.unreachable_count == seq_len
    assert rep.unreachable_positions == list(range(analysis.MAX_POSITIONS))
    if seq_len == 64:
        assert rep.graphs[0].components == 4
        assert rep.per_layer[-1].rf_max == 16


def test_head_groups_analyse_each_group_alone():
    rep = diagnose(P(CARD), 1024, num_heads=4, layers=2)
    assert [g.heads for g in rep.head_groups] == [[0, 1], [2, 3]]
    dilated, plain = rep.head_groups
    assert "dilation=2" in dilated.patterns[0] and "dilation" not in plain.patterns[0]
    assert "stream" not in dilated.patterns[0]
    assert all(g.exact for g in rep.head_groups)
    for g in rep.head_groups:  # fewer heads see at most what all heads see
        assert g.rf_max <= rep.per_layer[-1].rf_max and g.coverage_min <= rep.per_layer[-1].coverage_min
        assert g.strongly_connected and g.hop_diameter == 2 and g.layers_to_full_coverage == 2
    single = diagnose(P("window(8)"), 100, num_heads=3, layers=2)
    assert len(single.head_groups) == 1 and single.head_groups[0].heads == [0, 1, 2]
    assert single.head_groups[0].rf_max == single.per_layer[-1].rf_max


def test_json_report_keys_and_types():
    rep = diagnose(P("window(8) | global([0])"), 64, num_heads=2, layers=2, block_size=16)
    data = json.loads(rep.to_json())
    assert data == rep.to_dict()
    for key in ("hop_diameter", "strongly_connected", "layers_to_full_coverage", "exact", "per_layer",
                "seq_len", "num_heads", "block_size", "patterns", "method", "seconds"):
        assert key in data
    assert data["hop_diameter"] == 2 and data["strongly_connected"] is True
    assert data["layers_to_full_coverage"] == 2 and data["exact"] is True
    assert [r["layer"] for r in data["per_layer"]] == [1, 2]
    for row in data["per_layer"]:
        assert {"layer", "rf_min", "rf_median", "rf_max", "coverage_min"} <= set(row)
        assert isinstance(row["rf_min"], int) and isinstance(row["coverage_min"], float)
    never = diagnose(P("block(16)"), 64, layers=1).to_dict()
    assert never["layers_to_full_coverage"] is None and never["hop_diameter"] is None
    assert isinstance(never["full_coverage_reason"], str)
    json.dumps(diagnose(P("block(16)"), 65536, layers=1).to_dict())


def test_defaults_from_the_program():
    prog = patterncc.parse_program("heads = 3\nblock_size = 32\nwindow(4) | global([0]) | dilate(2, heads=1)")
    rep = diagnose(prog, 128)
    assert (rep.num_heads, rep.block_size, rep.layers) == (3, 32, analysis.DEFAULT_LAYERS)
    assert diagnose("window(4)", 50, layers=2).per_layer[-1].rf_max == 17  # source strings too


def test_table_plot_and_networkx_graph(tmp_path):
    rep = diagnose(P(CARD), 512, num_heads=4, layers=3)
    table = format_table(rep)
    lines = table.splitlines()
    assert "rf median" in lines[1] and "coverage min" in lines[1]
    assert [ln.split()[0] for ln in lines[3:6]] == ["1", "2", "3"]
    assert "layers to full coverage: 2" in table and "per head group" in table
    rule = lines[2]  # every value ends where its column's rule ends (right aligned)
    ends = [m.end() for m in re.finditer("-+", rule)][:-1]
    for ln in lines[1:6]:
        assert all(ln[e - 1] != " " and (e == len(ln) or ln[e] == " ") for e in ends), ln
    png = plot_growth(rep, tmp_path / "sub" / "rf.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blk = diagnose(P("window(64) | random(64, seed=1)"), 65536, layers=2)
    assert "upper bounds" in format_table(blk)
    plot_growth(blk, tmp_path / "blk.png")
    # the networkx graph agrees with the report
    for src in ("window(3)", "window(2) | global([0])", "window(2) & causal"):
        g = attention_graph(P(src), 40, 2, 16)
        r = diagnose(P(src), 40, num_heads=2, block_size=16, layers=1)
        assert nx.is_strongly_connected(g) == r.strongly_connected
        if r.strongly_connected:
            assert nx.diameter(g) == r.hop_diameter
    b = attention_graph(P("window(20)"), 256, 1, 16, level="block")
    assert b.number_of_nodes() == 16 and b.edges[0, 0]["full"] and not b.edges[2, 0]["full"]


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    diagnose(P("window(4)"), 200, layers=3, progress=True)
    assert quiet.getvalue() == ""
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    diagnose(P("window(4)"), 200, layers=3, progress=False)
    assert tty.getvalue() == ""
    diagnose(P("window(4)"), 200, layers=3, progress=True)
    assert "[" in tty.getvalue() and "#" in tty.getvalue()


# ----------------------------------------------------------------------------------------
# scale: the card example


def test_card_example_exact_at_4096():
    t0 = time.perf_counter()
    rep = diagnose(P(CARD), 4096, num_heads=16, layers=12)
    elapsed = time.perf_counter() - t0
    assert rep.exact and rep.method.startswith("token")
    assert len(rep.per_layer) == 12
    assert rep.strongly_connected and rep.hop_diameter == 2 and rep.layers_to_full_coverage == 2
    first = rep.per_layer[0]
    assert first.rf_max == 4096 and first.rf_min > 2 * 256 + 1   # windows + random blocks + token 0
    assert all(r.coverage_min == 1.0 for r in rep.per_layer[1:])
    assert [g.heads for g in rep.head_groups] == [[0, 1], list(range(2, 16))]
    assert elapsed < 30, f"exact diagnostics at T=4096 took {elapsed:.1f}s"


def test_card_example_at_65536_block_level_in_bounded_time_and_memory():
    tracemalloc.start()
    t0 = time.perf_counter()
    rep = diagnose(P(CARD), 65536, num_heads=16, layers=12)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 30, f"block-level diagnostics at T=65536 took {elapsed:.1f}s"
    assert peak < 2 ** 30, f"peak {peak / 2 ** 20:.0f} MiB: a T x T array would be 4 GiB"
    assert not rep.exact and rep.method.startswith("block")
    assert len(rep.per_layer) == 12 and rep.per_layer[-1].layer == 12
    assert rep.strongly_connected and rep.hop_diameter == 2 and rep.layers_to_full_coverage == 2
    assert rep.graphs[0].hop_diameter_upper is None or rep.graphs[0].hop_diameter_upper >= 2
    assert rep.per_layer[0].rf_max == 65536


def test_docstring_examples_run():
    import doctest
    failures, tried = doctest.testmod(analysis, optionflags=doctest.ELLIPSIS)
    assert tried >= 8 and failures == 0
