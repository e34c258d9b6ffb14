"""The stated limits, each checked up front with a ValueError that names it.

| limit | value | where |
|---|---|---|
| sequence length | 1 .. 2**31 - 1 | every layout, every backend |
| block size | a power of two, 16 .. 256 | ``compile(block_size=)``, ``block_size =`` option, layouts |
| head dim | >= 1; <= 256 on the Triton backend | the op |
| heads | >= 1 (and <= 65536 in ``heads=`` selections / option) | the op, the parser |
| batch | <= 65535 on the Triton backend | the op |
| Triton grid | batch x heads x ceil(T / 16) < 2**31 | the op |

Tensors this large are never allocated: the inputs are expanded (stride-0) views, which
the op validates before it copies anything. The largest T actually run is exercised on
the GPU by ``tests/gpu/test_limits_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch

import patterncc
from patterncc import layout, op as op_module
from patterncc.layout import MAX_SEQ_LEN, get_layout

BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def private_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _huge(b, h, t, d, device="cpu"):
    """A [b, h, t, d] tensor of any size without memory: an expanded view."""
    return torch.zeros(1, 1, 1, d, device=device).expand(b, h, t, d)


def test_limits_are_the_documented_values():
    assert MAX_SEQ_LEN == 2 ** 31 - 1
    assert op_module.TRITON_MAX_HEAD_DIM == 256 and op_module.TRITON_MAX_BATCH == 65535


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_length_over_the_maximum(backend):
    op = patterncc.compile("window(4)", block_size=64, backend=backend)
    x = _huge(1, 1, MAX_SEQ_LEN + 1, 16, _device(backend))
    with pytest.raises(ValueError, match=r"seq_len=2147483648 is over the supported maximum 2147483647"):
        op(x, x, x)


def test_layout_sequence_length_limits():
    p = patterncc.parse("window(4)")
    layout._check_sizes(MAX_SEQ_LEN, 1, 256)  # the maximum itself is accepted
    for bad in (MAX_SEQ_LEN + 1, 0, -5):
        with pytest.raises(ValueError, match="seq_len"):
            get_layout(p, bad, 1, 64)


@pytest.mark.parametrize("block", [0, 8, 15, 48, 100, 512, 1024, 64.0, "64", True])
def test_block_size_outside_16_to_256(block):
    with pytest.raises(ValueError, match="block_size must be a power of two between 16 and 256"):
        patterncc.compile("window(4)", block_size=block)
    with pytest.raises(ValueError, match="block_size"):
        get_layout(patterncc.parse("window(4)"), 100, 1, block)
    if isinstance(block, int) and not isinstance(block, bool) and block > 0:
        with pytest.raises(patterncc.PatternError, match="block_size"):
            patterncc.compile(f"block_size = {block}\nwindow(4)")


@pytest.mark.parametrize("block", [16, 256])
def test_block_size_bounds_are_accepted(block):
    op = patterncc.compile(f"block_size = {block}\nwindow(4)")
    assert op.block_size == block
    x = torch.randn(1, 1, 20, 8)
    assert torch.isfinite(op(x, x, x)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_zero(backend):
    op = patterncc.compile("window(4)", block_size=16, backend=backend)
    x = torch.randn(1, 2, 10, 0, device=_device(backend))
    with pytest.raises(ValueError, match="head_dim is 0"):
        op(x, x, x)


def test_triton_head_dim_over_256_and_the_torch_path_has_no_such_limit():
    op = patterncc.compile("window(4)", block_size=16, backend="triton")
    x = torch.randn(1, 1, 20, 257, device=_device("triton"))
    with pytest.raises(ValueError, match="head_dim=257 is over the triton backend's maximum 256"):
        op(x, x, x)
    y = torch.randn(1, 1, 20, 300)
    assert patterncc.compile("window(4)", block_size=16, backend="torch")(y, y, y).shape == (1, 1, 20, 300)


@pytest.mark.parametrize("d", [1, 3, 256])
def test_triton_head_dims_at_the_edges_match_the_torch_path(d):
    q, k, v = (torch.randn(1, 2, 20, d, generator=torch.Generator().manual_seed(i)) for i in range(3))
    dev = _device("triton")
    out = patterncc.compile("window(3) | global([0])", block_size=16, backend="triton")(q.to(dev), k.to(dev), v.to(dev))
    ref = patterncc.compile("window(3) | global([0])", block_size=16, backend="torch")(q, k, v)
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=1e-4)


def test_triton_batch_over_65535():
    op = patterncc.compile("window(4)", block_size=16, backend="triton")
    x = _huge(65536, 1, 8, 16, _device("triton"))
    with pytest.raises(ValueError, match="batch 65536 is over the triton backend's maximum 65535"):
        op(x, x, x)


def test_triton_grid_limit():
    op = patterncc.compile("window(4)", block_size=64, backend="triton")
    x = _huge(65535, 64, 2 ** 20, 16, _device("triton"))
    with pytest.raises(ValueError, match="maximum grid"):
        op(x, x, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_heads(backend):
    op = patterncc.compile("window(4)", block_size=16, backend=backend)
    q, kv = torch.randn(1, 0, 10, 8), torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="0 heads"):
        op(q, kv, kv)


def test_heads_limits_in_the_language():
    with pytest.raises(patterncc.PatternError, match="65536"):
        patterncc.parse("window(4, heads=65537)")
    with pytest.raises(patterncc.PatternError, match="65536"):
        patterncc.parse_program("heads = 65537\nwindow(4)")


def test_meta_tensors_are_refused():
    op = patterncc.compile("window(4)", block_size=16)
    x = torch.empty(1, 2, 10, 8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        op(x, x, x)


@pytest.mark.parametrize("scale,ok", [(0.5, True), (2, True), (float("inf"), False), (True, False),
                                      (torch.tensor(0.5), False), ("0.5", False)])
def test_scale_validation(scale, ok):
    import numpy as np
    op = patterncc.compile("window(4)", block_size=16)
    x = torch.randn(1, 1, 10, 8)
    if ok:
        assert torch.isfinite(op(x, x, x, scale=scale)).all()
        assert torch.equal(op(x, x, x, scale=np.float32(scale)), op(x, x, x, scale=float(np.float32(scale))))
    else:
        with pytest.raises(ValueError, match="scale must be a finite number"):
            op(x, x, x, scale=scale)
