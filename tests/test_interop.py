"""FlexAttention interop: mask_mod and BlockMask equal the pattern; flex_attention equals the op.

Eager ``flex_attention`` (what runs on the CPU without ``torch.compile``) evaluates only
the ``mask_mod``; the block structure (FULL blocks skip the ``mask_mod``) is checked by
expanding the BlockMask to tokens. Set ``PATTERNCC_TEST_FLEX_COMPILE=1`` to also run the
compiled Flex kernel on the CPU (about a minute of Inductor compilation).
"""
from __future__ import annotations

import doctest
import os

import numpy as np
import pytest
import torch

import patterncc
import patterncc.interop as interop
from patterncc.interop import block_mask, mask_mod
from reference import reference_attention

flex = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PATTERNS = [
    ("window(5) | global([0])", 16, 2),
    ("window(9) & causal", 32, 2),
    ("window(6) | global([0, -1]) | random(32, seed=1) | dilate(2, heads=2)", 16, 4),  # head-dependent, random
    ("strided(7) | sink(3) | block(10, width=1)", 16, 2),
    ("window(4) & causal(heads=[0]) | strided(5, heads=[1, 2])", 16, 3),  # heads with nothing but strides / empty
    ("global([1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 40..44])", 16, 1),  # many runs: membership table
    ("random(320, seed=4) | window(2)", 16, 2),  # 20 draws per row: dense draw table
    ("dense & window(100, dilation=3)", 64, 2),
]
IDS = [p for p, _, _ in PATTERNS]


def grid_mask(mm, heads: int, t: int) -> torch.Tensor:
    i = torch.arange(t)
    return torch.stack([mm(torch.tensor(0), torch.tensor(h), i[:, None], i[None, :]) for h in range(heads)])


def expand(bm, t: int) -> torch.Tensor:
    """Token mask a BlockMask stands for: full blocks whole, partial blocks through its mask_mod."""
    qbs, kbs = bm.BLOCK_SIZE
    _, h, nq = bm.kv_num_blocks.shape
    out = torch.zeros(h, t, t, dtype=torch.bool)
    for head in range(h):
        for qb in range(nq):
            for full, num, idx in ((False, bm.kv_num_blocks, bm.kv_indices), (True, bm.full_kv_num_blocks, bm.full_kv_indices)):
                for kb in idx[0, head, qb, :num[0, head, qb]].tolist():
                    qs = torch.arange(qb * qbs, min((qb + 1) * qbs, t))
                    ks = torch.arange(kb * kbs, min((kb + 1) * kbs, t))
                    assert qs.numel() and ks.numel(), "a listed block lies past the sequence"
                    if full:
                        blk = torch.ones(qs.numel(), ks.numel(), dtype=torch.bool)
                    else:
                        blk = bm.mask_mod(torch.tensor(0), torch.tensor(head), qs[:, None], ks[None, :])
                    assert not out[head][qs[:, None], ks[None, :]].any(), "block listed twice"
                    out[head][qs[:, None], ks[None, :]] = blk
    return out


@pytest.mark.parametrize("src,bs,heads", PATTERNS, ids=IDS)
def test_mask_mod_equals_pattern(src, bs, heads):
    t = 333 if "320" in src else 77
    op = patterncc.compile(src, block_size=bs)
    want = op.mask(t, heads)
    assert torch.equal(grid_mask(mask_mod(src, t, heads, bs), heads, t), want)
    assert torch.equal(grid_mask(mask_mod(op.pattern, t, heads, bs), heads, t), want)


@pytest.mark.parametrize("src,bs,heads", PATTERNS, ids=IDS)
def test_block_mask_equals_layout(src, bs, heads):
    t = 333 if "320" in src else 77
    op = patterncc.compile(src, block_size=bs)
    bm = block_mask(op, t, heads)
    lay = op.layout(t, heads)
    assert bm.BLOCK_SIZE == (bs, bs) and tuple(bm.seq_lengths) == (t, t)
    assert int(bm.full_kv_num_blocks.sum()) == int(lay.full.sum())
    assert int(bm.kv_num_blocks.sum()) == int((~lay.full).sum())
    dense = bm.to_dense()[0]
    for h in range(heads):
        np.testing.assert_array_equal(dense[h].numpy() != 0, lay.block_matrix(h) != 0)
    assert torch.equal(expand(bm, t), op.mask(t, heads))


@pytest.mark.parametrize("src,bs,heads", PATTERNS, ids=IDS)
def test_flex_attention_equals_op_and_reference(src, bs, heads):
    torch.manual_seed(0)
    t = 333 if "320" in src else 77
    op = patterncc.compile(src, block_size=bs)
    kv = 1 if heads == 3 else 2 if heads % 2 == 0 else heads
    q = torch.randn(2, heads, t, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2 * kv, t, 16, dtype=torch.float64).chunk(2, dim=1)
    out = flex.flex_attention(q, k, v, block_mask=block_mask(op, t, heads), enable_gqa=kv != heads)
    ref = reference_attention(q, k, v, op.mask(t, heads))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op(q, k, v), ref, atol=1e-10, rtol=1e-10)


def test_float32_matches_op():
    torch.manual_seed(1)
    op = patterncc.compile("window(8) | global([0]) | random(16, seed=2)", block_size=16)
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=block_mask(op, 50, 2))
    torch.testing.assert_close(out, op(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on the CPU")
def test_gradients_match_op_on_cuda():
    torch.manual_seed(1)
    op = patterncc.compile("window(8) | global([0]) | random(16, seed=2)", block_size=16)
    q, k, v = (torch.randn(1, 2, 50, 16, device="cuda", requires_grad=True) for _ in range(3))
    out_f = flex.flex_attention(q, k, v, block_mask=block_mask(op, 50, 2, device="cuda"))
    grads_f = torch.autograd.grad(out_f.square().sum(), (q, k, v))
    out_o = op(q, k, v)
    grads_o = torch.autograd.grad(out_o.square().sum(), (q, k, v))
    torch.testing.assert_close(out_f, out_o, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads_f, grads_o):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_layout_input_and_program_layers(tmp_path):
    op = patterncc.compile("layers 0..1: window(3)\nlayers 1..2: window(3) & causal", block_size=16)
    lay = op.layout(40, 2, layer=1)
    a, b = block_mask(lay), block_mask(op, 40, 2, layer=1)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(expand(a, 40), op.mask(40, 2, layer=1))
    assert not torch.equal(expand(block_mask(op, 40, 2, layer=0), 40), expand(a, 40))


def test_errors():
    op = patterncc.compile("window(3)", block_size=16)
    with pytest.raises(ValueError, match="seq_len is needed"):
        block_mask(op)
    with pytest.raises(ValueError, match="SparseAttention op or a Layout"):
        block_mask("window(3)", 10, 1)
    with pytest.raises(ValueError, match="disagrees"):
        block_mask(op.layout(40, 1), seq_len=41)
    with pytest.raises(ValueError, match="pattern must be"):
        mask_mod(op, 40, 1, 16)
    with pytest.raises(patterncc.PatternError, match="head 3"):
        mask_mod("window(3, heads=[3])", 40, 2, 16)
    with pytest.raises(patterncc.PatternError, match="outside the sequence"):
        mask_mod("global([50])", 40, 1, 16)


def test_docstring_examples():
    assert doctest.testmod(interop).failed == 0


@pytest.mark.skipif(os.environ.get("PATTERNCC_TEST_FLEX_COMPILE") != "1",
                    reason="compiled Flex on the CPU takes about a minute of Inductor compilation; "
                           "set PATTERNCC_TEST_FLEX_COMPILE=1 to run it")
def test_compiled_flex_uses_block_structure():
    torch.manual_seed(2)
    op = patterncc.compile("window(16) | global([0]) | random(32, seed=1) | dilate(2, heads=1)", block_size=32)
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    out = torch.compile(flex.flex_attention)(q, k, v, block_mask=block_mask(op, 200, 2))
    torch.testing.assert_close(out, op(q, k, v), atol=1e-5, rtol=1e-5)
