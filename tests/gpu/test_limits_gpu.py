"""The largest sequence lengths on one GPU: forward and backward, checked on samples
(skipped without CUDA).

    python -m pytest tests/gpu/test_limits_gpu.py -q        # ~1-2 minutes on an H100 80GB

* T = 1,048,576, B = 1, H = 8, D = 64, bf16: a window pattern and the Longformer pattern
  (whose global query row walks all 16,384 key blocks, split over many programs); output
  rows checked against ``reference.reference_rows`` (float64 over every key of each
  sampled row), dq of those rows against a float64 autograd reference;
* T = 2**25 + 3 (33.5M, odd), H = 1, D = 64, bf16, causal window: one head holds more than
  2**31 elements, so every offset inside a head must be 64-bit; checked on segments.

Where every key a row attends is within ``radius`` of it (window patterns), the reference
is local: segments of query rows over the keys they can reach, so out, dq and, for keys
whose every attending query lies in the segment, dk and dv are exact, with no T x T work.
Needs about 40 GB of GPU memory for the largest case.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import patterncc
from reference import reference_attention, reference_rows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = 3e-2  # bf16 inputs and outputs against float64, per row (see _row_err)
DEVICE = "cuda"

# (pattern, T, heads, head dim, radius: every attended key is within this many tokens, or None)
CASES = [
    ("window(256)", 1 << 20, 8, 64, 256),
    ("window(256) | global([0])", 1 << 20, 8, 64, None),
    ("window(1024) & causal", (1 << 25) + 3, 1, 64, 1024),
]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _randn(shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=g)


def _row_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of one row (a token's D-vector of one head and batch), rows of
    tiny norm measured against a tenth of the typical row norm: a single wrong row shows."""
    a, b = a.double(), b.double()
    err = (a - b).norm(dim=-1)
    norm = b.norm(dim=-1)
    floor = 0.1 * norm.pow(2).mean().sqrt()
    return float((err / torch.maximum(norm, floor)).max()) if err.numel() else 0.0


def _segment_reference(q, k, v, dout, lay, q_lo, q_hi, k_lo, k_hi, scale):
    """Float64 out, dq, dk, dv of query rows [q_lo, q_hi) over keys [k_lo, k_hi)."""
    h = q.shape[1]
    rows, keys = np.arange(q_lo, q_hi), np.arange(k_lo, k_hi)
    mask = torch.stack([torch.as_tensor(lay.heads[i].allowed(lay.ctx, rows[:, None], keys[None, :]))
                        for i in range(h)]).to(DEVICE)
    qs = q[:, :, q_lo:q_hi].double().requires_grad_()
    ks = k[:, :, k_lo:k_hi].double().requires_grad_()
    vs = v[:, :, k_lo:k_hi].double().requires_grad_()
    out = reference_attention(qs, ks, vs, mask, scale)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), dout[:, :, q_lo:q_hi].double())
    return out.detach(), dq, dk, dv


def _rows_dq_reference(q, k, v, dout, lay, rows, scale):
    """Float64 out and dq of the given rows over all keys (for patterns with global rows)."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    keys = np.arange(t)
    outs, dqs = [], []
    for head in range(h):
        allowed = torch.as_tensor(lay.heads[head].allowed(lay.ctx, rows[:, None], keys[None, :])).to(DEVICE)
        qs = q[:, head:head + 1, rows].double().requires_grad_()
        kk = k[:, head // group:head // group + 1].double()
        vv = v[:, head // group:head // group + 1].double()
        out = reference_attention(qs, kk, vv, allowed[None], scale)
        (dq,) = torch.autograd.grad(out, (qs,), dout[:, head:head + 1, rows].double())
        outs.append(out.detach())
        dqs.append(dq)
        del kk, vv
    return torch.cat(outs, 1), torch.cat(dqs, 1)


@pytest.mark.parametrize("src,t,h,d,radius", CASES, ids=[f"{c[0]}-T{c[1]}" for c in CASES])
def test_largest_sequences_forward_and_backward(src, t, h, d, radius):
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else float("inf")
    need = 12 * t * h * d * 2 + (2 << 30)
    if free < need:
        pytest.skip(f"needs ~{need / 2 ** 30:.0f} GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    op = patterncc.compile(src, block_size=64, backend="triton")
    scale = d ** -0.5
    q, k, v = (_randn((1, h, t, d), seed).requires_grad_() for seed in (1, 2, 3))
    out = op(q, k, v)
    dout = _randn(out.shape, 4)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
    lay = op.layout(t, h)
    q, k, v, out = q.detach(), k.detach(), v.detach(), out.detach()

    if radius is None:  # a global row: sampled rows over every key
        rows = np.unique(np.concatenate([[0, 1, 63, 64, 65, t // 2, t - 2, t - 1],
                                         np.random.default_rng(0).integers(0, t, 8)]))
        ref = reference_rows(q, k, v, lay, rows, scale)
        assert _row_err(out[:, :, rows], ref) < TOL
        ref_out, ref_dq = _rows_dq_reference(q, k, v, dout, lay, rows, scale)
        assert _row_err(out[:, :, rows], ref_out) < TOL
        assert _row_err(dq[:, :, rows], ref_dq) < TOL
        return

    seg = 2 * radius
    centres = [0, radius, t // 3, t // 2 + 17, t - 1 - radius, t - 1,
               *np.random.default_rng(1).integers(0, t, 3).tolist()]
    for c in centres:
        q_lo, q_hi = max(0, c - seg), min(t, c + seg)
        k_lo, k_hi = max(0, q_lo - radius), min(t, q_hi + radius)
        ref_out, ref_dq, ref_dk, ref_dv = _segment_reference(q, k, v, dout, lay, q_lo, q_hi, k_lo, k_hi, scale)
        assert _row_err(out[:, :, q_lo:q_hi], ref_out) < TOL, ("out", c)
        assert _row_err(dq[:, :, q_lo:q_hi], ref_dq) < TOL, ("dq", c)
        # keys every one of whose attending queries is inside the segment
        j_lo = q_lo + radius if q_lo > 0 else 0
        j_hi = q_hi - radius if q_hi < t else t
        if j_hi > j_lo:
            sl = slice(j_lo - k_lo, j_hi - k_lo)
            assert _row_err(dk[:, :, j_lo:j_hi], ref_dk[:, :, sl]) < TOL, ("dk", c)
            assert _row_err(dv[:, :, j_lo:j_hi], ref_dv[:, :, sl]) < TOL, ("dv", c)


def test_layout_of_the_largest_length_is_small():
    """The layout (host) and kernel plan (device) of T = 2**25 + 3 stay O(touched blocks)."""
    op = patterncc.compile("window(1024) & causal", block_size=64, backend="triton")
    lay = op.layout((1 << 25) + 3, 1)
    assert lay.nbytes() < 128 * lay.nnz + (1 << 20)
