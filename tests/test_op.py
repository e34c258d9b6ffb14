"""The compiled op: input validation, programs, layouts, masks."""
from __future__ import annotations

import pytest
import torch

import patterncc


def _qkv(b=1, h=2, t=20, d=8, hkv=None, dtype=torch.float32):
    hkv = hkv or h
    return (torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, hkv, t, d, dtype=dtype),
            torch.randn(b, hkv, t, d, dtype=dtype))


@pytest.mark.parametrize("make,needle", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k.double(), v), "share a dtype"),
    (lambda q, k, v: (q.int(), k, v), "dtype"),
    (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), "sequence lengths differ"),
    (lambda q, k, v: (q, k[..., :4], v[..., :4]), "head dims differ"),
    (lambda q, k, v: (q, k, v[:, :1]), "same shape"),
    (lambda q, k, v: (q[:1], torch.cat([k, k]), torch.cat([v, v])), "batch sizes differ"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), "multiple"),
    (lambda q, k, v: (q, "k", v), "torch.Tensor"),
])
def test_bad_inputs_raise_value_error(make, needle):
    op = patterncc.compile("window(4)", block_size=16)
    with pytest.raises(ValueError, match=needle):
        op(*make(*_qkv()))


def test_bad_scale_and_backend():
    op = patterncc.compile("window(4)", block_size=16)
    with pytest.raises(ValueError, match="scale"):
        op(*_qkv(), scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        patterncc.compile("window(4)", backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        patterncc.compile("window(4)", block_size=48)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = patterncc.compile("window(4)", block_size=16, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        op(*_qkv())


def test_heads_option_is_checked():
    op = patterncc.compile("heads = 4\nwindow(4)", block_size=16)
    with pytest.raises(ValueError, match="heads = 4"):
        op(*_qkv(h=2))
    assert op.layout(64).num_heads == 4


def test_scale_is_used():
    op = patterncc.compile("dense", block_size=16)
    q, k, v = _qkv()
    a, b = op(q, k, v, scale=0.01), op(q, k, v)
    assert not torch.allclose(a, b)


def test_empty_batch_and_length():
    op = patterncc.compile("window(4)", block_size=16)
    assert op(*_qkv(b=0)).shape == (0, 2, 20, 8)
    assert op(*_qkv(t=0)).shape == (1, 2, 0, 8)


def test_per_layer_program():
    op = patterncc.compile("layers 0..2: window(2)\nlayers 2..4: window(6)", block_size=16)
    assert op.num_layers == 4
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="per layer"):
        op(q, k, v)
    a, b = op(q, k, v, layer=0), op(q, k, v, layer=3)
    assert not torch.allclose(a, b)
    assert torch.allclose(op.layer(3)(q, k, v), b)
    with pytest.raises(IndexError):
        op(q, k, v, layer=9)


def test_compile_reads_files_and_ir(tmp_path):
    f = tmp_path / "p.attn"
    f.write_text("block_size = 32\nheads = 2\nwindow(8) | global([0])\n")
    op = patterncc.compile(f)
    assert op.block_size == 32
    assert patterncc.compile(str(f)).program == op.program
    assert patterncc.compile(patterncc.parse("window(8)")).pattern == patterncc.parse("window(8)")
    with pytest.raises(patterncc.PatternError, match="cannot read"):
        patterncc.compile(tmp_path / "missing.attn")


def test_mask_and_layout():
    op = patterncc.compile("window(3) & causal", block_size=16)
    m = op.mask(40, 2)
    assert m.shape == (2, 40, 40) and m.dtype == torch.bool
    t = torch.arange(40)
    expect = ((t[:, None] - t[None]).abs() <= 3) & (t[None] <= t[:, None])
    assert torch.equal(m[0], expect)
    assert op.layout(40, 2) is op.layout(40, 2)
    assert "window(3)" in repr(op)
