"""patterncc.nn: SparseSelfAttention and masked_attention (key padding by compaction)."""
from __future__ import annotations

import doctest

import pytest
import torch

import patterncc
import patterncc.nn as pnn
from patterncc.nn import SparseSelfAttention, masked_attention, padding_spans
from reference import reference_attention

E, H = 32, 4


def manual(attn: SparseSelfAttention, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The module computed by hand with the float64 dense reference attention."""
    b, t, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, t, attn.num_heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.num_kv_heads, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.num_kv_heads, d).transpose(1, 2)
    mask = attn.op.mask(t, attn.num_heads)
    outs = []
    for i in range(b):
        m = mask if key_valid is None else mask & key_valid[i][None, None, :] & key_valid[i][None, :, None]
        outs.append(reference_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], m))
    y = torch.cat(outs).to(x.dtype)
    return attn.out_proj(y.transpose(1, 2).reshape(b, t, E))


@pytest.mark.parametrize("pattern,kv", [("window(5) | global([0])", None), ("window(7) & causal", 2),
                                        ("strided(4) | window(3) | block(8) | dilate(2, heads=2)", 1),
                                        ("random(16, seed=2) | sink(3)", 4)])
def test_matches_reference(pattern, kv):
    torch.manual_seed(0)
    attn = SparseSelfAttention(E, H, pattern, num_kv_heads=kv, block_size=16, dtype=torch.float64)
    x = torch.randn(2, 37, E, dtype=torch.float64)
    torch.testing.assert_close(attn(x), manual(attn, x), atol=1e-10, rtol=1e-10)


def test_shapes_gqa_mqa_and_float32():
    for kv in (1, 2, 4):
        attn = SparseSelfAttention(E, H, "window(3)", num_kv_heads=kv, block_size=16)
        assert attn.k_proj.out_features == kv * E // H
        assert attn(torch.randn(3, 20, E)).shape == (3, 20, E)
    assert "pattern='window(3)'" in repr(attn)


@pytest.mark.parametrize("pattern", ["window(6) & causal | global([0])", "block(8, width=1) | sink(2)"])
def test_right_padding_equals_masking_pad_keys(pattern):
    """For right padding and patterns that do not depend on T, compaction equals masking the
    padded keys of the full-length sequence."""
    torch.manual_seed(1)
    attn = SparseSelfAttention(E, H, pattern, num_kv_heads=2, block_size=16, dtype=torch.float64)
    x = torch.randn(3, 40, E, dtype=torch.float64)
    lengths = torch.tensor([40, 23, 17])
    pad = torch.arange(40)[None, :] >= lengths[:, None]
    y = attn(x, key_padding_mask=pad)
    want = manual(attn, x, ~pad)
    valid = ~pad
    torch.testing.assert_close(y[valid], want[valid], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y[pad], attn.out_proj.bias.expand(int(pad.sum()), E))  # zero attention output


def test_any_padding_equals_unpadded_runs():
    """Left, right, both-sided padding, fully padded and unpadded rows in one batch: each
    row equals the row run alone without padding (random blocks and negative global indices
    included, which depend on the sequence length)."""
    torch.manual_seed(2)
    attn = SparseSelfAttention(E, H, "window(4) | global([-1]) | random(16, seed=1)", block_size=16,
                               dtype=torch.float64)
    t = 45
    x = torch.randn(6, t, E, dtype=torch.float64)
    spans = [(0, 45), (0, 30), (12, 45), (5, 38), (0, 0), (7, 30)]
    pad = torch.ones(6, t, dtype=torch.bool)
    for i, (s, e) in enumerate(spans):
        pad[i, s:e] = False
    y = attn(x, key_padding_mask=pad)
    for i, (s, e) in enumerate(spans):
        if e > s:
            torch.testing.assert_close(y[i, s:e], attn(x[i:i + 1, s:e])[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(y[i][pad[i]], attn.out_proj.bias.expand(int(pad[i].sum()), E))


def test_padding_gradients_match_unpadded():
    torch.manual_seed(3)
    attn = SparseSelfAttention(E, H, "window(5) & causal", num_kv_heads=2, block_size=16, dtype=torch.float64)
    x = torch.randn(2, 30, E, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 19:] = True
    attn(x, key_padding_mask=pad)[~pad].sum().backward()
    g_pad, w_pad = x.grad.clone(), attn.q_proj.weight.grad.clone()
    x.grad = None
    attn.zero_grad()
    (attn(x[:1]).sum() + attn(x[1:, :19]).sum()).backward()
    torch.testing.assert_close(x.grad, g_pad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(attn.q_proj.weight.grad, w_pad, atol=1e-10, rtol=1e-10)
    assert x.grad[1, 19:].abs().max() == 0


def test_no_padding_fast_path_single_call(monkeypatch):
    attn = SparseSelfAttention(E, H, "window(3)", block_size=16)
    calls = []
    real = attn.op.__class__.__call__
    monkeypatch.setattr(attn.op.__class__, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(3, 20, E)
    attn(x, key_padding_mask=torch.zeros(3, 20, dtype=torch.bool))
    assert len(calls) == 1
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[0, 15:] = pad[1, 15:] = True  # lengths 15, 15, 20: two groups
    calls.clear()
    attn(x, key_padding_mask=pad)
    assert len(calls) == 2


@pytest.mark.parametrize("mask,msg", [
    (torch.tensor([[False, True, False, False]]), "padding between valid tokens"),
    (torch.zeros(1, 4), "bool tensor"),
    (torch.zeros(1, 5, dtype=torch.bool), r"shape \[batch, 4\]"),
    (torch.zeros(2, 4, dtype=torch.bool), "batch size 2"),
])
def test_bad_padding_masks(mask, msg):
    attn = SparseSelfAttention(E, H, "window(3)", block_size=16)
    with pytest.raises(ValueError, match=msg):
        attn(torch.randn(1, 4, E), key_padding_mask=mask)


def test_dropout_on_attention_output():
    torch.manual_seed(4)
    attn = SparseSelfAttention(E, H, "window(3)", dropout=0.5, block_size=16)
    x = torch.randn(2, 20, E)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    attn0 = SparseSelfAttention(E, H, "window(3)", block_size=16).train()
    torch.testing.assert_close(attn0(x), attn0(x))


def test_pattern_forms(tmp_path):
    op = patterncc.compile("window(3)", block_size=32)
    assert SparseSelfAttention(E, H, op).op is op
    assert SparseSelfAttention(E, H, patterncc.parse("window(3)")).op.block_size == 64
    f = tmp_path / "p.attn"
    f.write_text("block_size = 16\nheads = 4\nlayers 0..1: window(2)\nlayers 1..2: window(2) | dilate(2)\n")
    m = SparseSelfAttention(E, H, f, layer=1)
    assert str(m.pattern) == "window(2) | dilate(2)" and m.op.block_size == 16
    with pytest.raises(ValueError, match="pass layer=i"):
        SparseSelfAttention(E, H, f)
    with pytest.raises(ValueError, match="heads = 4, but num_heads=2"):
        SparseSelfAttention(E, 2, f, layer=0)
    with pytest.raises(ValueError, match="disagrees"):
        SparseSelfAttention(E, H, op, block_size=16)


@pytest.mark.parametrize("kw,msg", [
    (dict(embed_dim=30), "not divisible"),
    (dict(num_kv_heads=3), "divisor"),
    (dict(dropout=1.0), "dropout"),
    (dict(pattern="window(3) | strided(4, heads=[7])"), "head 7"),
    (dict(pattern=3), "pattern must be"),
    (dict(pattern="windw(3)"), "unknown primitive"),
])
def test_constructor_errors(kw, msg):
    args = dict(embed_dim=E, num_heads=H, pattern="window(3)") | kw
    with pytest.raises(ValueError, match=msg):
        SparseSelfAttention(**args, block_size=16)


def test_bad_input_shape():
    attn = SparseSelfAttention(E, H, "window(3)", block_size=16)
    with pytest.raises(ValueError, match=r"\[batch, seq_len, 32\]"):
        attn(torch.randn(20, E))


def test_padding_spans():
    m = torch.tensor([[False, False, True], [True, False, False], [True, True, True], [False] * 3])
    first, lengths = padding_spans(m)
    assert first.tolist() == [0, 1, 0, 0] and lengths.tolist() == [2, 2, 0, 3]


def test_masked_attention_functional():
    op = patterncc.compile("window(2)", block_size=16)
    q = k = v = torch.randn(2, 2, 10, 8)
    torch.testing.assert_close(masked_attention(op, q, k, v), op(q, k, v))


def test_docstring_examples():
    assert doctest.testmod(pnn).failed == 0
