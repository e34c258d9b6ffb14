"""DeepSpeed sparsity configs -> patterncc patterns, checked against DeepSpeed's block layouts.

``ds_layout`` re-implements DeepSpeed's documented layout algorithms
(``deepspeed/ops/sparse_attention/sparsity_config.py``) for the deterministic parts, at
block granularity; the pattern's token mask must equal that layout expanded to tokens (AND
token-level causal for unidirectional attention), except where the module documents a
deviation, which is then checked to be exactly the documented one.
"""
from __future__ import annotations

import numpy as np
import pytest

import patterncc
from patterncc.deepspeed import KINDS, from_sparsity_config

B = 16  # DeepSpeed's default block


# ----------------------------------------------------------------------------------------
# DeepSpeed's block layouts (deterministic parts), one head variant at a time


def _local_sliding(nb, n, uni):
    lay = np.zeros((nb, nb), bool)
    w = n // 2
    for r in range(nb):
        lay[r, max(0, r - w):(r + 1 if uni else min(r + w + 1, nb))] = True
    return lay


def _global_rows_cols(nb, starts, ends, rows=True, uni=False):
    lay = np.zeros((nb, nb), bool)
    groups = [(s, s + 1) for s in starts] if ends is None else list(zip(starts, ends))
    for s, e in groups:
        if s < nb:
            e = min(e, nb)
            if rows:
                lay[s:e, :] = True
            lay[(s if uni else 0):, s:e] = True
    return lay


def ds_layout(kind, seq_len, num_heads, **p):
    """[H, nb, nb] bool block layout (random blocks left out)."""
    nb = seq_len // p.get("block", B)
    uni = p.get("attention", KINDS[kind][1].get("attention")) == "unidirectional"
    d = {**KINDS[kind][1], **p}
    out = np.zeros((num_heads, nb, nb), bool)
    for h in range(num_heads):
        if kind == "local_sliding_window":
            lay = _local_sliding(nb, d["num_sliding_window_blocks"], uni)
        elif kind == "bslongformer":
            lay = _local_sliding(nb, d["num_sliding_window_blocks"], False)
            lay |= _global_rows_cols(nb, d["global_block_indices"], d["global_block_end_indices"])
            if uni:
                lay = np.tril(lay)
        elif kind == "bigbird":
            lay = _local_sliding(nb, d["num_sliding_window_blocks"], False)
            g = d["num_global_blocks"]
            lay[:g, :] = True
            lay[:, :g] = True
            if uni:
                lay = np.tril(lay)
        elif kind == "fixed":
            L, G = d["num_local_blocks"], d["num_global_blocks"]
            P = d["num_different_global_patterns"]
            hv = h if d["different_layout_per_head"] else 0
            lay = np.zeros((nb, nb), bool)
            for i in range(0, nb, L):
                e = min(i + L, nb)
                for r in range(i, e):
                    lay[r, i:(r + 1 if uni else e)] = True
            first = L - (1 + hv % P) * G
            end = nb - nb % L
            groups = [(i, i + G) for i in range(first, end, L)]
            if end < nb:
                s = min(end + first, nb - G)
                groups.append((s, s + G))
            for s, e in groups:
                lay[(s if uni else 0):, s:e] = True
                if d["horizontal_global_attention"]:
                    lay[s:e, :] = True
        elif kind == "variable":
            lay = np.zeros((nb, nb), bool)
            s = 0
            sizes = d["local_window_blocks"]
            windows = []
            for w in sizes:
                windows.append((s, min(s + w, nb)))
                s += w
            windows += [(i, min(i + sizes[-1], nb)) for i in range(s, nb, sizes[-1])]
            for a, z in windows:
                for r in range(a, z):
                    lay[r, a:(r + 1 if uni else z)] = True
            lay |= _global_rows_cols(nb, d["global_block_indices"], d["global_block_end_indices"],
                                     rows=d["horizontal_global_attention"], uni=uni)
        else:
            raise AssertionError(kind)
        out[h] = lay
    return out


def tokens(block_layout, blk, causal):
    m = np.kron(block_layout, np.ones((blk, blk), bool)).astype(bool)
    if causal:
        m &= np.tril(np.ones(m.shape[-2:], bool))
    return m


def pattern_mask(pattern, seq_len, num_heads, block_size=16):
    return patterncc.compile(pattern, block_size=block_size).mask(seq_len, num_heads).numpy()


# ----------------------------------------------------------------------------------------
# exact configurations

EXACT = [
    ("local_sliding_window", {}),
    ("local_sliding_window", {"attention": "bidirectional", "num_sliding_window_blocks": 5}),
    ("local_sliding_window", {"num_sliding_window_blocks": 4, "block": 32}),
    ("bslongformer", {}),
    ("bslongformer", {"global_block_indices": [0, 5], "num_sliding_window_blocks": 5}),
    ("bslongformer", {"global_block_indices": [2, 9], "global_block_end_indices": [4, 40],
                      "attention": "unidirectional"}),
    ("bslongformer", {"global_block_indices": [3, 99]}),  # 99 is past the end: skipped, as in DeepSpeed
    ("bigbird", {"num_random_blocks": 0}),
    ("bigbird", {"num_random_blocks": 0, "num_global_blocks": 2, "num_sliding_window_blocks": 5,
                 "attention": "unidirectional"}),
    ("fixed", {"horizontal_global_attention": True}),
    ("fixed", {"horizontal_global_attention": True, "num_local_blocks": 3, "block": 32}),  # short last window
    ("fixed", {"horizontal_global_attention": True, "num_local_blocks": 4, "num_global_blocks": 2,
               "different_layout_per_head": True, "num_different_global_patterns": 2}),
    ("variable", {}),
    ("variable", {"attention": "unidirectional"}),
    ("variable", {"local_window_blocks": [2, 3, 4], "global_block_indices": [0]}),  # unaligned windows
    ("variable", {"local_window_blocks": [1, 2], "global_block_indices": [3, 6],
                  "global_block_end_indices": [5, 7], "horizontal_global_attention": True}),
    ("variable", {"local_window_blocks": [3], "global_block_indices": [0], "global_block_end_indices": [2],
                  "attention": "unidirectional"}),
]


@pytest.mark.parametrize("kind,params", EXACT, ids=[f"{k}-{i}" for i, (k, _) in enumerate(EXACT)])
def test_exact_configs_match_deepspeed_layout(kind, params):
    blk = params.get("block", B)
    seq_len, heads = 13 * blk if blk == 16 else 10 * blk, 4
    pat = from_sparsity_config(kind, num_heads=heads, seq_len=seq_len, **params)
    want = ds_layout(kind, seq_len, heads, **params)
    uni = {**KINDS[kind][1], **params}.get("attention") == "unidirectional"
    got = pattern_mask(pat, seq_len, heads)
    np.testing.assert_array_equal(got, tokens(want, blk, uni), err_msg=str(pat))


def test_dense():
    assert str(from_sparsity_config("dense", num_heads=2)) == "dense"


def test_pattern_without_seq_len_is_length_free():
    """BigBird / BSLongformer / local sliding windows do not need seq_len: one pattern for every length."""
    pat = from_sparsity_config("bslongformer", num_heads=2, global_block_indices=[0, 2])
    for nb in (4, 7):
        np.testing.assert_array_equal(pattern_mask(pat, nb * B, 2),
                                      tokens(ds_layout("bslongformer", nb * B, 2, global_block_indices=[0, 2]),
                                             B, False))


# ----------------------------------------------------------------------------------------
# documented deviations


def test_fixed_vertical_columns_become_global_rows_too():
    """Bidirectional Fixed without horizontal attention: the layout is DeepSpeed's
    horizontal_global_attention=True layout (a superset)."""
    seq_len, heads = 12 * B, 2
    pat = from_sparsity_config("fixed", num_heads=heads, seq_len=seq_len)
    got = pattern_mask(pat, seq_len, heads)
    exact = tokens(ds_layout("fixed", seq_len, heads), B, False)
    horizontal = tokens(ds_layout("fixed", seq_len, heads, horizontal_global_attention=True), B, False)
    assert (got >= exact).all() and (got != exact).any()
    np.testing.assert_array_equal(got, horizontal)


def test_fixed_unidirectional_deviation_is_global_rows_into_the_past():
    seq_len, heads = 11 * B, 1
    params = dict(attention="unidirectional", num_local_blocks=4, num_global_blocks=2)
    pat = from_sparsity_config("fixed", num_heads=heads, seq_len=seq_len, **params)
    got = pattern_mask(pat, seq_len, heads)
    ds = ds_layout("fixed", seq_len, heads, **params)
    exact = tokens(ds, B, True)
    # the deviation: rows of the global blocks also see every earlier block
    rows = ds_layout("fixed", seq_len, heads, num_local_blocks=4, num_global_blocks=2,
                     horizontal_global_attention=True)
    np.testing.assert_array_equal(got, tokens(ds | rows, B, True))
    assert (got >= exact).all()


def test_random_blocks_are_whole_blocks_per_row():
    seq_len, heads = 16 * B, 2
    pat = from_sparsity_config("bigbird", num_heads=heads, seq_len=seq_len, num_random_blocks=2, seed=3)
    op = patterncc.compile(pat, block_size=B)
    got = op.mask(seq_len, heads).numpy()
    base = tokens(ds_layout("bigbird", seq_len, heads, num_random_blocks=2), B, False)
    assert (got >= base).all()
    extra = (got & ~base).reshape(heads, 16, B, 16, B)
    whole = extra.all(axis=(2, 4)) | ~extra.any(axis=(2, 4))
    assert whole.all()  # extra keys come in whole DeepSpeed blocks
    assert from_sparsity_config("bigbird", num_heads=2, seed=3) != from_sparsity_config("bigbird", num_heads=2)


def test_variable_random_and_unaligned_windows():
    seq_len = 20 * B
    params = dict(num_random_blocks=1, local_window_blocks=[3, 5])
    pat = from_sparsity_config("variable", num_heads=1, seq_len=seq_len, **params)
    got = pattern_mask(pat, seq_len, 1)
    base = tokens(ds_layout("variable", seq_len, 1, **params), B, False)
    assert (got >= base).all()
    per_row = (got & ~base).reshape(20, B, 20, B).any(axis=(1, 3)).sum(1)
    assert (per_row <= 1).all()


# ----------------------------------------------------------------------------------------
# errors


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="unknown DeepSpeed sparsity config kind 'bigbrid'.*did you mean 'bigbird'") as e:
        from_sparsity_config("bigbrid", num_heads=2)
    for k in KINDS:
        assert k in str(e.value)


def test_class_names_and_modes_accepted():
    a = from_sparsity_config("BigBirdSparsityConfig", num_heads=2)
    assert a == from_sparsity_config("bigbird", num_heads=2)
    assert from_sparsity_config("LocalSlidingWindow", num_heads=2) == from_sparsity_config("local_sliding_window", num_heads=2)


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'num_local_block' for FixedSparsityConfig "
                                         r"\(did you mean 'num_local_blocks'") as e:
        from_sparsity_config("fixed", num_heads=2, seq_len=64, num_local_block=4)
    assert "num_different_global_patterns" in str(e.value) and "seq_len" in str(e.value)
    with pytest.raises(ValueError, match="different_layout_per_head"):
        from_sparsity_config("local_sliding_window", num_heads=2, different_layout_per_head=True)


@pytest.mark.parametrize("kind,params,msg", [
    ("fixed", {"num_heads": 2}, "pass seq_len"),
    ("variable", {"num_heads": 2}, "pass seq_len"),
    ("bigbird", {}, "num_heads is required"),
    ("fixed", {"num_heads": 2, "seq_len": 100}, "multiple of block"),
    ("fixed", {"num_heads": 2, "seq_len": 64, "num_local_blocks": 4, "num_global_blocks": 3}, "dividable"),
    ("fixed", {"num_heads": 2, "seq_len": 64, "num_different_global_patterns": 2}, "different_layout_per_head"),
    ("fixed", {"num_heads": 2, "seq_len": 64, "attention": "unidirectional", "horizontal_global_attention": True},
     "bi-directional"),
    ("bigbird", {"num_heads": 2, "attention": "causal"}, "bidirectional' or 'unidirectional"),
    ("bigbird", {"num_heads": 2, "seq_len": 32, "num_sliding_window_blocks": 3}, "sliding window blocks"),
    ("bslongformer", {"num_heads": 2, "global_block_indices": [4], "global_block_end_indices": [2]},
     "must be smaller than global block end"),
    ("bslongformer", {"num_heads": 2, "global_block_indices": [-1]}, ">= 0"),
    ("bigbird", {"num_heads": 2, "block": 0}, "block must be an integer"),
])
def test_invalid_values(kind, params, msg):
    with pytest.raises(ValueError, match=msg):
        from_sparsity_config(kind, **params)


def test_global_past_the_end_without_seq_len_raises_at_layout_time():
    pat = from_sparsity_config("bslongformer", num_heads=1, global_block_indices=[10])
    with pytest.raises(patterncc.PatternError, match="past the end"):
        patterncc.compile(pat, block_size=16).layout(64, 1)
