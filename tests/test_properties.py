"""Property tests of the whole chain: pattern -> layout -> op (both backends) -> numbers.

For random valid patterns (``strategies.layout_cases``), random T, heads, GQA ratio, head
dim and block size:

* the layout agrees with the pattern's token mask: every allowed pair lies in a listed
  block, FULL blocks allow every pair inside the sequence, no listed block is empty, and
  the transposed index lists exactly the forward entries;
* the op's output and its gradients match the float64 dense reference
  (``reference.reference_attention``): the PyTorch backend on many examples, the Triton
  kernels (under the CPU interpreter without CUDA) on a few tiny ones.

Non-finite inputs (documented in the README): the op computes attention over the keys
each query attends, so a NaN or infinity reaches exactly the rows that read it -- a
non-finite query row gives a NaN output row, as in ``scaled_dot_product_attention`` with
the equivalent boolean mask; a NaN key or a non-finite value makes NaN the rows that attend
it, and may spread to other rows of the same touched block (0 x NaN inside a tile), never
further: SDPA itself, which multiplies the whole T x T matrix, spreads it to every row.
So, row by row: non-finite in the exact "attended keys only" attention => non-finite in
patterncc => non-finite in SDPA; every finite patterncc row equals the exact value; rows no
key reaches are 0 (SDPA gives 0 there too, but NaN when such a row's query is NaN).

Degenerate and strided inputs: an empty batch, T = 1, transposed / sliced (non-contiguous)
and expanded (stride-0) tensors give the reference result and gradients on both backends.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import patterncc
from reference import reference_attention, rel_err
from strategies import layout_cases

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ("torch", "triton")


@pytest.fixture(scope="module", autouse=True)
def private_kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATTERNCC_CACHE_DIR", str(tmp_path_factory.mktemp("pcc_kernels")))
        yield


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


# ----------------------------------------------------------------------------------------
# layout vs token mask


def check_layout(lay) -> np.ndarray:
    """Assert the layout agrees with the token mask; return the mask [H, T, T]."""
    h, t, bs, nb = lay.num_heads, lay.seq_len, lay.block_size, lay.nblocks
    mask = lay.mask()
    pad = np.zeros((h, nb * bs, nb * bs), bool)
    pad[:, :t, :t] = mask
    allowed = pad.reshape(h, nb, bs, nb, bs).transpose(0, 1, 3, 2, 4)  # [H, qb, kb, Bq, Bk]
    inside = np.zeros((nb * bs,), bool)
    inside[:t] = True
    inside = inside.reshape(nb, bs)
    pair_inside = inside[:, None, :, None] & inside[None, :, None, :]  # [qb, kb, Bq, Bk]

    listed = np.zeros((h, nb, nb), bool)
    full = np.zeros((h, nb, nb), bool)
    head, qblock = lay.entry_head, lay.entry_qblock
    listed[head, qblock, lay.kblock] = True
    full[head, qblock, lay.kblock] = lay.full
    assert np.unique(head * nb * nb + qblock * nb + lay.kblock).size == lay.nnz, "duplicate entries"
    assert (np.diff(lay.kblock.astype(np.int64))[np.diff(head * nb + qblock) == 0] > 0).all(), "rows unsorted"

    any_allowed = allowed.any(axis=(3, 4))
    assert not (any_allowed & ~listed).any(), "an allowed pair lies in an unlisted block"
    assert (any_allowed | ~listed).all(), "a listed block allows no pair"
    all_allowed = (allowed | ~pair_inside[None]).all(axis=(3, 4))
    assert not (full & ~all_allowed).any(), "a FULL block holds a disallowed pair"

    # transposed index: row h * nb + kb lists (qb, entry) of exactly the forward entries
    t_rows = np.repeat(np.arange(h * nb), np.diff(lay.t_indptr))
    assert lay.t_entry.size == lay.nnz and np.array_equal(np.sort(lay.t_entry), np.arange(lay.nnz))
    e = lay.t_entry
    assert np.array_equal(head[e] * nb + lay.kblock[e], t_rows)
    assert np.array_equal(qblock[e], lay.t_qblock)
    return mask


# ----------------------------------------------------------------------------------------
# the op against the float64 reference


def _inputs(b, h, hkv, t, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda hh: torch.randn(b, hh, t, d, generator=g).to(dtype).to(device).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def check_op(op, mask, q, k, v, tol, scale=None):
    """Output and gradients of ``op`` against the float64 reference with ``mask``."""
    out = op(q, k, v, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, torch.as_tensor(mask, device=q.device), scale)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < tol, (name, rel_err(a, r))
    return out


def _gqa(data, h):
    return data.draw(st.sampled_from([g for g in (1, 2, 3, 4) if h % g == 0]), label="group")


@settings(max_examples=30)
@given(case=layout_cases(max_seq_len=200, max_heads=4, max_leaves=5, block_sizes=(16, 32, 64, 128)),
       data=st.data())
def test_torch_backend_chain(case, data):
    pattern, t, h, bs = case
    group = _gqa(data, h)
    d = data.draw(st.sampled_from((1, 8, 16, 24)), label="head dim")
    b = data.draw(st.integers(1, 2), label="batch")
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    op = patterncc.compile(pattern, block_size=bs, backend="torch")
    mask = check_layout(op.layout(t, h))
    q, k, v = _inputs(b, h, h // group, t, d, dtype, "cpu", seed=t)
    check_op(op, mask, q, k, v, 1e-4 if dtype == torch.float32 else 1e-9)


@settings(max_examples=5)
@given(case=layout_cases(max_seq_len=200, max_heads=3, max_leaves=3, block_sizes=(16, 32)), data=st.data())
def test_triton_backend_chain(case, data):
    pattern, t, h, bs = case
    group = _gqa(data, h)
    d = data.draw(st.sampled_from((8, 16, 32)), label="head dim")
    op = patterncc.compile(pattern, block_size=bs, backend="triton")
    mask = check_layout(op.layout(t, h))
    q, k, v = _inputs(1, h, h // group, t, d, torch.float32, DEVICE, seed=t)
    check_op(op, mask, q, k, v, 1e-4)


# ----------------------------------------------------------------------------------------
# NaN and infinity


NAN_SRC = "window(3, heads=[0]) | (global([9]) & causal) | (random(16, seed=3) & window(20))"


def _exact_sparse(q, k, v, mask):
    """Attention over the attended keys only (float64): masked keys never touch a row."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    m = mask[None]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~m, float("-inf"))
    has = m.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has, 0.0), -1).masked_fill(~m, 0.0)
    terms = torch.where(m[..., None], p[..., None] * v[:, :, None], torch.zeros((), dtype=torch.float64))
    return torch.where(has, terms.sum(-2), torch.zeros((), dtype=torch.float64))


def _sdpa(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[None])


def _bad_rows(x):
    return ~torch.isfinite(x).all(-1)  # [B, H, T]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy warns about NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,value", [("q", "nan"), ("q", "inf"), ("q", "-inf"), ("k", "nan"), ("k", "inf"),
                                         ("v", "nan"), ("v", "inf")])
def test_non_finite_inputs_behave_like_sdpa(backend, where, value):
    b, h, hkv, t, d = 2, 2, 1, 70, 16
    dev = _device(backend)
    op = patterncc.compile(NAN_SRC, block_size=16, backend=backend)
    mask = op.mask(t, h).to(dev)
    has_key = mask.any(-1)  # [H, T]
    assert (~has_key).any(), "the pattern should have rows no key reaches"
    q, k, v = (x.detach() for x in _inputs(b, h, hkv, t, d, torch.float32, dev, seed=1))
    x = {"q": q, "k": k, "v": v}[where]
    bad = float(value)
    rows = [(0, 0, 37), (1, 0 if where != "q" else 1, 12), (0, 0, 2)]  # (batch, head, token)
    for bb, hh, tt in rows:
        if where == "q" and value != "nan":
            x[bb, hh, tt] = bad  # a whole infinite query row: scores NaN or infinite
        else:
            x[bb, hh, tt, 3] = bad
    if where == "q":
        x[1, 1, 3] = float("nan")  # a query row no key reaches (head 1, token 3)
        assert not has_key[1, 3]

    with torch.no_grad():
        out = op(q, k, v)
    exact, sdpa = _exact_sparse(q, k, v, mask), _sdpa(q, k, v, mask)
    ours_bad, exact_bad, sdpa_bad = _bad_rows(out), _bad_rows(exact), _bad_rows(sdpa)
    keyed = has_key[None].expand_as(ours_bad)
    assert exact_bad.any(), "the injected value should reach some row"

    assert (out[~keyed] == 0).all(), "rows no key reaches give 0, whatever their query"
    assert not (exact_bad & keyed & ~ours_bad).any(), "a row that reads a non-finite input must not be finite"
    assert not (ours_bad & keyed & ~sdpa_bad).any(), "NaN where SDPA with the same mask is finite"
    fine = keyed & ~ours_bad
    assert rel_err(out[fine], exact[fine]) < 1e-4, "finite rows must be exact"
    if where == "q":  # a query reaches only its own row: exactly SDPA's rows
        assert torch.equal(ours_bad & keyed, sdpa_bad & keyed)
    if where == "k" and value == "nan":  # scores of masked pairs are dropped, not multiplied
        assert torch.equal(ours_bad & keyed, exact_bad & keyed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_gradients_stay_in_that_row(backend):
    dev = _device(backend)
    op = patterncc.compile("window(4) & causal", block_size=16, backend=backend)
    q, k, v = _inputs(1, 2, 2, 40, 8, torch.float32, dev, seed=3)
    with torch.no_grad():
        q[0, 1, 20, 0] = float("nan")
    out = op(q, k, v)
    assert _bad_rows(out)[0].nonzero().tolist() == [[1, 20]]
    # the gradient of a row that does not read row 20: NaN at most in row 20 itself (as in
    # SDPA, whose backward multiplies row 20's zero output gradient by its NaN output)
    (dq,) = torch.autograd.grad(out[0, 1, 30].sum(), (q,))
    assert set(map(tuple, _bad_rows(dq).nonzero().tolist())) <= {(0, 1, 20)}


# ----------------------------------------------------------------------------------------
# degenerate and strided inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_sequence(backend):
    dev = _device(backend)
    op = patterncc.compile("window(4) | global([0])", block_size=16, backend=backend)
    for b, t in ((0, 50), (2, 0), (0, 0)):
        q, k, v = _inputs(b, 4, 2, t, 16, torch.float32, dev, seed=0)
        out = op(q, k, v)
        assert out.shape == (b, 4, t, 16)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert [tuple(g.shape) for g in grads] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src", ["window(4) | global([0])", "causal", "global([-1]) & causal", "random(16, seed=1)"])
def test_sequence_of_one_token(backend, src):
    dev = _device(backend)
    op = patterncc.compile(src, block_size=16, backend=backend)
    q, k, v = _inputs(3, 2, 1, 1, 8, torch.float32, dev, seed=2)
    out = check_op(op, op.mask(1, 2), q, k, v, 1e-5)
    assert torch.allclose(out, v.expand(3, 2, 1, 8), atol=1e-6)  # one key: its value


def _strided_variants(b, h, hkv, t, d, dev):
    """(name, q, k, v, leaves): non-contiguous and expanded views of leaf tensors."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(dev).requires_grad_()  # noqa: E731
    out = []
    qt, kt, vt = r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d)  # [B, T, H, D] storage
    out.append(("transposed", qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), (qt, kt, vt)))
    qw, kw, vw = r(b, h, t, 2 * d + 3), r(b, hkv, t, d + 5), r(b, hkv, t, d + 1)
    out.append(("sliced head dim", qw[..., 1:d + 1], kw[..., :d], vw[..., 1:], (qw, kw, vw)))
    qs, ks, vs = r(b, h, 2 * t, d), r(b, hkv, 2 * t, d), r(b, hkv, 3 * t, d)
    out.append(("strided sequence", qs[:, :, ::2], ks[:, :, 1::2], vs[:, :, ::3], (qs, ks, vs)))
    q1, k1, v1 = r(1, h, t, d), r(b, 1, t, d), r(1, 1, t, d)
    out.append(("expanded (stride 0)", q1.expand(b, h, t, d), k1.expand(b, hkv, t, d), v1.expand(b, hkv, t, d),
                (q1, k1, v1)))
    qp = r(d, b, t, h)
    out.append(("permuted", qp.permute(1, 3, 2, 0), kt.transpose(1, 2), vt.transpose(1, 2), (qp, kt, vt)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_inputs(backend):
    dev = _device(backend)
    b, h, hkv, t, d = 2, 4, 2, 45, 16
    op = patterncc.compile("(window(5) | global([0, 30])) & causal | sink(2)", block_size=16, backend=backend)
    mask = torch.as_tensor(op.mask(t, h), device=dev)
    for name, q, k, v, leaves in _strided_variants(b, h, hkv, t, d, dev):
        assert not all(x.is_contiguous() for x in (q, k, v)), name
        out = op(q, k, v)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        grads = torch.autograd.grad(out, leaves, gout)
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        # the same views of float64 copies of the leaves, for the reference
        rq, rk, rv = [_same_view(x, leaves, ref_leaves) for x in (q, k, v)]
        ref = reference_attention(rq, rk, rv, mask)
        ref_grads = torch.autograd.grad(ref, ref_leaves, gout.double(), allow_unused=True)
        assert rel_err(out, ref) < 1e-4, name
        for a, r_ in zip(grads, ref_grads):
            assert rel_err(a, r_) < 1e-4, name


def _same_view(view, leaves, ref_leaves):
    """``view`` (a strided view of one of ``leaves``) taken from the matching ref leaf."""
    for leaf, ref in zip(leaves, ref_leaves):
        if view.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr():
            offset = view.storage_offset() - leaf.storage_offset()
            return ref.as_strided(view.shape, view.stride(), ref.storage_offset() + offset)
    raise AssertionError("not a view of a leaf")
