"""GPU correctness of the generated Triton kernels (skipped without CUDA).

bf16 and fp16 against the float64 reference, relative error within 1e-2: dense
references with every gradient up to T=4096, sampled rows of the output at long T.
Run on a GPU machine: ``python -m pytest tests/gpu -q``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import patterncc
from reference import reference_attention, reference_rows, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REFERENCE = {
    "longformer": "window(256) | global([0])",
    "bigbird": "block(64, width=1) | global(0..128) | random(192, seed=1)",
    "causal_window": "window(1023) & causal",
    "dilated": "window(256) | dilate(2)",
    "card": "window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)",
    "streaming": "(sink(4) | window(300)) & causal",
    "sparse_transformer": "(block(128) | strided(128)) & causal",
    "empty_rows": "window(8, heads=[0]) | global([5]) & causal",
}


def _inputs(b, h, hkv, t, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda hh: torch.randn(b, hh, t, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    return mk(h), mk(hkv), mk(hkv)


def _assert_matches_reference(op, q, k, v, t, h, scale=None):
    """op's output and gradients against the float64 reference with op's token mask."""
    out = op(q, k, v, scale=scale)
    ref = reference_attention(q, k, v, op.mask(t, h).cuda(), scale)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        assert torch.isfinite(a).all() and rel_err(a, r) < 1e-2


def _assert_kv_grads_match_reference(op, q, k, v, t, h):
    """dK and dV of a backward that wants no dQ (the Delta pass runs, not the dQ pass)."""
    out = op(q.detach(), k, v)
    ref = reference_attention(q.detach(), k, v, op.mask(t, h).cuda())
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (k, v), g), torch.autograd.grad(ref, (k, v), g.double())):
        assert torch.isfinite(a).all() and rel_err(a, r) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("t,d,h,hkv", [(128, 64, 4, 4), (1000, 128, 4, 2), (4096, 64, 2, 1), (777, 80, 2, 2)])
def test_dense_reference_with_gradients(name, t, d, h, hkv, dtype):
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    try:
        mask = op.mask(t, h)
    except patterncc.PatternError:
        pytest.skip("pattern does not fit this length")
    q, k, v = _inputs(2, h, hkv, t, d, dtype)
    out = op(q, k, v)
    ref = reference_attention(q, k, v, mask.cuda())
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, r in zip(grads, refs):
        assert torch.isfinite(a).all()
        assert rel_err(a, r) < 1e-2


@pytest.mark.parametrize("scale", [0.05, -0.2, 0.0])  # the forward folds only a scale > 0 into exp2
@pytest.mark.parametrize("name", ["longformer", "causal_window", "dilated"])
def test_any_scale_matches_reference(name, scale):
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    t, h = 1000, 2
    q, k, v = _inputs(1, h, h, t, 64, torch.bfloat16)
    _assert_matches_reference(op, q, k, v, t, h, scale)


@pytest.mark.parametrize("t", [4096, 4104])  # 4104: classes of 2052 / 1026 tokens, padded to whole blocks
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("src", [REFERENCE["dilated"], "(window(100) & causal) | dilate(4)"])
def test_residue_order_through_strided_tma_boxes(src, d, t, monkeypatch):
    """lowering.RESIDUE_TMA (on by default; an A/B switch): residue-order walks fetch their
    tiles as strided boxes of a [B * heads, T / d, d, D] view, the rows past T / d of a
    class padded to whole blocks read as zeros; same results as the reference (GQA, two
    batches). TMA configs are forced so that all three walks take the boxes."""
    from patterncc import lowering
    from patterncc.backends import triton_backend
    monkeypatch.setattr(lowering, "RESIDUE_TMA", True)
    for kind in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(triton_backend.CONFIGS, (kind, d), triton_backend.KernelConfig(64, 64, 4, 2, True))
    op = patterncc.compile(src, block_size=64, backend="triton")
    h = 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    run = triton_backend.launch_for(q, k, op.layout(t, h))
    for kind in ("fwd", "dq", "dkdv"):
        bm, bn, _ = run.tiles(kind)
        assert run.walked(kind, (k, v), bm if kind == "dkdv" else bn)[1], kind
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("src", [REFERENCE["longformer"], REFERENCE["card"], "window(64) | global([3, 700, 701])"])
def test_thin_query_rows_match_reference(src, d, monkeypatch):
    """lowering.THIN_ROWS (on by default; forced here): a global query row's far blocks
    walked with 16-row tiles in the forward and dQ, merged with the row's other items; GQA, two
    batches, odd length."""
    from patterncc import lowering
    from patterncc.backends import triton_backend
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    op = patterncc.compile(src, block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    assert triton_backend.launch_for(q, k, op.layout(t, h)).plan.fwd.items.n_thin > 0
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("thin_keys", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("src", [REFERENCE["longformer"], "window(64) | global([3, 40, 700, 701])"])
def test_thin_key_items_match_reference(src, d, thin_keys, monkeypatch):
    """lowering.THIN_KEYS (on by default) on and off: dK/dV walks a global key block's far query
    blocks with 16-key tiles in items of their own, summed with the key row's other items;
    GQA, two batches, odd length, two 16-key sub-blocks in one key block."""
    from patterncc import lowering
    from patterncc.backends import triton_backend
    monkeypatch.setattr(lowering, "THIN_KEYS", thin_keys)
    op = patterncc.compile(src, block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    assert (triton_backend.launch_for(q, k, op.layout(t, h)).plan.kv.items.n_thin > 0) == thin_keys
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("peel", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("src", [REFERENCE["longformer"], REFERENCE["card"], "window(64) | global([3, 40, 700, 701])"])
def test_first_thin_column_step_outside_its_loop_matches_reference(src, d, peel, monkeypatch):
    """codegen.PEEL_THIN_COLUMN (on by default): the forward's first thin-column step before
    its loop, from the empty softmax state, the rest in an unpipelined loop (three sub-blocks
    of global keys in the last case); or (off) every step in the pipelined loop. GQA, two
    batches, odd length, residue-order heads in card."""
    from patterncc import codegen
    from patterncc.backends import triton_backend
    monkeypatch.setattr(codegen, "PEEL_THIN_COLUMN", peel)
    op = patterncc.compile(src, block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    assert triton_backend.launch_for(q, k, op.layout(t, h)).plan.fwd.n_narrow > 0
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("t", [4096, 4001])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["longformer", "causal_window", "card"])
def test_length_classes_match_reference(name, d, t, on, monkeypatch):
    """codegen.SEQ_LEN_CLASSES (on by default): dK/dV specialised by Triton on the length's
    class (a multiple of 16: vector LSE and Delta loads; or not), and off (compiled once for
    every length); GQA, two batches; residue-order heads in card."""
    from patterncc import codegen
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", on)
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    q, k, v = _inputs(2, 4, 2, t, d, torch.bfloat16)
    _assert_matches_reference(op, q, k, v, t, 4)


def _assert_stats_setting_matches_reference(name, d, delta_in_dq, monkeypatch, **switches):
    """Forward, gradients and dK/dV alone of pattern ``name`` with codegen ``switches`` set, Delta
    from the dQ pass or its own (DELTA_IN_DQ), every backend buffer poisoned with NaN: GQA, two
    batches, an odd length."""
    from patterncc import codegen
    from patterncc.backends import triton_backend
    for switch, value in switches.items():
        monkeypatch.setattr(codegen, switch, value)
    monkeypatch.setattr(triton_backend, "DELTA_IN_DQ", delta_in_dq)
    monkeypatch.setattr(triton_backend, "_empty", lambda shape, like, dtype=None: torch.full(
        shape, float("nan"), dtype=dtype or like.dtype, device=like.device))
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    _assert_matches_reference(op, q, k, v, t, h)
    _assert_kv_grads_match_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("delta_in_dq", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["dilated", "card"])
def test_residue_order_stats_by_position_match_reference(name, d, delta_in_dq, on, monkeypatch):
    """codegen.POSITION_STATS (on by default) and off, with PAIRED_STATS off (pairs store every
    launch's stats by position whatever it says): in residue order Delta and an LSE copy
    stored by kernel position (by dQ, or by the Delta pass: DELTA_IN_DQ off, and dK/dV alone)
    or by token; one residue factor (strided TMA boxes) and residue-order heads beside token
    order ones (card); GQA, two batches, odd length. Buffers poisoned with NaN, so a position
    no pass stores shows."""
    _assert_stats_setting_matches_reference(name, d, delta_in_dq, monkeypatch, POSITION_STATS=on, PAIRED_STATS=False)


@pytest.mark.parametrize("delta_in_dq", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["longformer", "dilated", "card"])
def test_stats_as_pairs_match_reference(name, d, delta_in_dq, monkeypatch):
    """codegen.PAIRED_STATS (on by default) at every head dim (PAIRED_STATS_MIN_HEAD_PAD 0): (LSE,
    Delta) pairs by kernel position in every launch, token order (longformer: split rows, thin
    rows and keys) and residue order; by dQ, or by the Delta pass (DELTA_IN_DQ off, and dK/dV
    alone). GQA, two batches, odd length; buffers poisoned with NaN, so a position no pass
    stores shows."""
    _assert_stats_setting_matches_reference(name, d, delta_in_dq, monkeypatch, PAIRED_STATS=True,
                                            PAIRED_STATS_MIN_HEAD_PAD=0)


@pytest.mark.parametrize("delta_in_dq", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["longformer", "dilated"])
def test_stats_pairs_from_a_head_dim_match_reference(name, d, delta_in_dq, monkeypatch):
    """codegen.PAIRED_STATS_MIN_HEAD_PAD = 128 (the default): pairs at D=128, two buffers at D=64 (by token in
    token order, by position in residue order), from one generated module; as above."""
    _assert_stats_setting_matches_reference(name, d, delta_in_dq, monkeypatch, PAIRED_STATS=True,
                                            PAIRED_STATS_MIN_HEAD_PAD=128)


@pytest.mark.parametrize("t", [4096, 4001])
def test_a_new_length_finds_its_dkdv_compiled_with_length_classes(t, monkeypatch):
    """codegen.SEQ_LEN_CLASSES: the first backward also compiles dK/dV for the other length
    class, so later lengths of either class launch without a compile (issue 5's new length)."""
    from patterncc import codegen
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", True)
    op = patterncc.compile(REFERENCE["longformer"], block_size=64, backend="triton")
    kernel = codegen.load(op.layout(t, 4).pattern).kernel("_attn_bwd_dkdv")
    op(*_inputs(1, 4, 4, t, 64, torch.bfloat16)).sum().backward()
    before = _compiled_count(kernel)
    for t2 in (t + 64, t + 1001, t + 4096):
        op(*_inputs(1, 4, 4, t2, 64, torch.bfloat16)).sum().backward()
    assert before >= 2 and _compiled_count(kernel) == before


@pytest.mark.parametrize("pairs", ["off", "every head dim"])
@pytest.mark.parametrize("d", [64, 128])
def test_thin_row_pairs_match_reference(pairs, d, monkeypatch):
    """triton_backend.PAIR_THIN (thin-row items two key tiles an online-softmax step) off, and
    on at every head dim (by default only up to PAIR_THIN_MAX_HEAD_PAD, which the other tests
    run); longformer, GQA, two batches, odd length."""
    from patterncc import lowering
    from patterncc.backends import triton_backend
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    monkeypatch.setattr(triton_backend, "PAIR_THIN", pairs != "off")
    monkeypatch.setattr(triton_backend, "PAIR_THIN_MAX_HEAD_PAD", 1024)
    op = patterncc.compile(REFERENCE["longformer"], block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, d, torch.bfloat16)
    walk = triton_backend.launch_for(q, k, op.layout(t, h)).plan.fwd
    assert walk.items.n_thin > 0
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("delta_in_dq", [True, False])
@pytest.mark.parametrize("name", ["card", "causal_window", "longformer"])
def test_delta_by_the_dq_pass_or_its_own_pass(name, delta_in_dq, monkeypatch):
    """triton_backend.DELTA_IN_DQ (on by default) and off: Delta computed and stored by the
    dQ pass for the dK/dV pass after it, or by a pass of its own; and dK/dV alone (no dQ
    pass: always its own pass). D=128, GQA, two batches, odd length."""
    from patterncc.backends import triton_backend
    monkeypatch.setattr(triton_backend, "DELTA_IN_DQ", delta_in_dq)
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, 128, torch.bfloat16)
    _assert_matches_reference(op, q, k, v, t, h)
    _assert_kv_grads_match_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("first, spread", [(True, 0.0), (False, 0.0), (True, 0.7)])
@pytest.mark.parametrize("src", [REFERENCE["longformer"], REFERENCE["card"], "window(64) | global([3, 700, 701])"])
def test_split_rows_first_match_reference(src, first, spread, monkeypatch):
    """lowering.SPLIT_FIRST (on by default) and off, and SPREAD_PIECES: the pieces of split
    rows launched before all other items, in row order, or thin-row pieces spread over the
    first 70% of the others, in the forward, dQ and dK/dV; GQA, two batches, odd length."""
    from patterncc import lowering
    from patterncc.backends import triton_backend
    monkeypatch.setattr(lowering, "SPLIT_FIRST", first)
    monkeypatch.setattr(lowering, "SPREAD_PIECES", spread)
    monkeypatch.setattr(lowering, "SPREAD_SLOTS", 1)  # spread even in this short launch
    op = patterncc.compile(src, block_size=64, backend="triton")
    t, h = 4001, 4
    q, k, v = _inputs(2, h, 2, t, 64, torch.bfloat16)
    plan = triton_backend.launch_for(q, k, op.layout(t, h)).plan
    assert plan.fwd.items.n_merge > 0  # (and for the first two, dK/dV's global key columns)
    _assert_matches_reference(op, q, k, v, t, h)


@pytest.mark.parametrize("name", ["longformer", "dilated", "causal_window"])
def test_direct_launches_match_the_jit_dispatch(name, monkeypatch):
    """triton_backend.DIRECT_LAUNCH (on by default): repeated forward+backward
    calls through the compiled kernels equal the JIT dispatch's bit for bit, after the first
    call no launch goes through the JIT, and a caller's tensor at an address that is not
    16-byte aligned (a new specialisation) goes through the JIT again and matches the
    reference."""
    from patterncc.backends import triton_backend
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    t, h = 2000, 4
    q, k, v = _inputs(2, h, 2, t, 64, torch.bfloat16)
    g = torch.randn_like(q)

    def step(q):
        out = op(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), g))
    monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", False)
    jit = step(q)
    monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", True)
    direct = triton_backend.launch_for(q, k, op.layout(t, h)).direct
    direct._runners.clear()  # (the launch constants are shared: an earlier test may have kept some)
    for _ in range(3):  # the first call through the JIT, the others straight to the kernels
        assert all(torch.equal(a, b) for a, b in zip(step(q), jit))
    assert len(direct._runners) == 3  # forward, dQ (with Delta), dK/dV: one specialisation each
    buf = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    unaligned = buf[1:].view(q.shape).copy_(q.detach()).requires_grad_()
    assert unaligned.data_ptr() % 16
    for _ in range(2):
        _assert_matches_reference(op, unaligned, k, v, t, h)
    assert len(direct._runners) > 3


@pytest.mark.parametrize("name", ["longformer", "bigbird", "causal_window", "dilated", "card"])
@pytest.mark.parametrize("t", [16384, 65536])
def test_long_sequences_sampled_rows(name, t):
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    q, k, v = _inputs(1, 4, 4, t, 64, torch.bfloat16, seed=t)
    out = op(q, k, v)
    assert torch.isfinite(out).all()
    rows = np.unique(np.concatenate([[0, 1, 63, 64, t // 2, t - 1], np.random.default_rng(0).integers(0, t, 26)]))
    ref = reference_rows(q, k, v, op.layout(t, 4), rows)
    assert rel_err(out[:, :, rows], ref) < 1e-2
    out.backward(torch.randn_like(out))
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def _compiled_count(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.parametrize("name,t", [("dilated", 4096), ("dilated", 4160), ("longformer", 4096)])
def test_a_new_length_finds_its_forward_compiled(name, t):
    """The first use compiles both forward variants (with and without the tail test), so a
    length with a tail after one without (or the other way round) launches at once: issue 5's
    new length under 50 ms. The dilated window at 4160 has classes with empty slots (a tail)."""
    from patterncc import codegen
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    kernel = codegen.load(op.layout(t, 4).pattern).kernel("_attn_fwd")  # the module the backend runs
    with torch.no_grad():
        op(*_inputs(1, 4, 4, t, 64, torch.bfloat16))
        before = _compiled_count(kernel)
        for t2 in (t + 64, t + 1000, t + 4096):
            op(*_inputs(1, 4, 4, t2, 64, torch.bfloat16))
    assert before >= 2 and _compiled_count(kernel) == before


def test_cuda_graph_capture_and_replay():
    op = patterncc.compile(REFERENCE["card"], block_size=64, backend="triton")
    q, k, v = _inputs(1, 4, 2, 3000, 64, torch.bfloat16)
    static_q, static_k, static_v = (x.detach().clone() for x in (q, k, v))
    op(static_q, static_k, static_v)  # warm-up: kernels compiled, plan on the device
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op(static_q, static_k, static_v)
    for seed in (1, 2):
        fresh = _inputs(1, 4, 2, 3000, 64, torch.bfloat16, seed=seed)
        for dst, src in zip((static_q, static_k, static_v), fresh):
            dst.copy_(src.detach())
        graph.replay()
        assert torch.equal(static_out, op(*(x.detach() for x in fresh)))


@pytest.mark.parametrize("direct", [False, True])
def test_cuda_graph_captures_forward_and_backward(direct, monkeypatch):
    """A training step (forward and backward) captured once replays to the eager op's output
    and gradients on new inputs (the recipe of torch.cuda.graph for whole networks: warm up
    on a side stream, grads set to None before capture); also with direct launches."""
    from patterncc.backends import triton_backend
    monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", direct)
    op = patterncc.compile(REFERENCE["longformer"], block_size=64, backend="triton")
    q, k, v = (x.detach().clone().requires_grad_() for x in _inputs(1, 4, 2, 3000, 64, torch.bfloat16))
    do = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            op(q, k, v).backward(do)
    torch.cuda.current_stream().wait_stream(side)
    q.grad = k.grad = v.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v)
        out.backward(do)
    for seed in (1, 2):
        fresh = _inputs(1, 4, 2, 3000, 64, torch.bfloat16, seed=seed)
        with torch.no_grad():
            for dst, src in zip((q, k, v), fresh):
                dst.copy_(src)
        graph.replay()
        eager = [x.detach().clone().requires_grad_() for x in fresh]
        ref = op(*eager)
        ref.backward(do)
        assert torch.equal(out, ref)
        for got, want in zip((q.grad, k.grad, v.grad), eager):
            assert torch.equal(got, want.grad)


@pytest.mark.parametrize("direct", [False, True])
def test_calls_on_two_streams_may_overlap(direct, monkeypatch):
    """Split rows (the global query) merge through counters; each stream has its own, so the
    same layout running on two streams at once gives what each call gives alone (also with
    direct launches, which take the current stream as the JIT dispatch does)."""
    from patterncc.backends import triton_backend
    monkeypatch.setattr(triton_backend, "DIRECT_LAUNCH", direct)
    op = patterncc.compile(REFERENCE["longformer"], block_size=64, backend="triton")
    ins = [tuple(x.detach() for x in _inputs(2, 4, 4, 8192, 64, torch.bfloat16, seed=s)) for s in (1, 2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    with torch.no_grad():
        alone = [op(*x) for x in ins]
        torch.cuda.synchronize()
        for _ in range(5):
            outs = []
            for stream, x in zip(streams, ins):
                with torch.cuda.stream(stream):
                    outs.append(op(*x))
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(outs, alone))


def test_the_merge_counters_stream_key_is_the_current_streams_handle():
    from patterncc import lowering
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    assert lowering._stream_id(dev) == torch.cuda.current_stream().cuda_stream
    with torch.cuda.stream(stream):
        assert lowering._stream_id(dev) == stream.cuda_stream == lowering._stream_id(torch.device("cuda", 0))
    assert lowering._stream_id(dev) != stream.cuda_stream


def test_inductor_compile_fullgraph_with_backward():
    op = patterncc.compile(REFERENCE["longformer"], block_size=64, backend="triton")
    q, k, v = _inputs(1, 4, 4, 2048, 64, torch.bfloat16)
    def step(q, k, v):
        return (op(q, k, v).float() ** 2).mean()
    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-2


def test_forward_is_bitwise_reproducible():
    op = patterncc.compile(REFERENCE["card"], block_size=64, backend="triton")
    q, k, v = _inputs(1, 4, 4, 5000, 64, torch.bfloat16)
    with torch.no_grad():
        first = op(q, k, v)
        assert all(torch.equal(first, op(q, k, v)) for _ in range(3))


@pytest.mark.parametrize("kind_cfgs", [
    {"fwd": (128, 64, 8, 3), "dq": (128, 32, 8, 2), "dkdv": (32, 128, 8, 2)},
    {"fwd": (128, 32, 4, 3), "dq": (128, 64, 8, 2), "dkdv": (64, 128, 8, 2)},
    {"fwd": (64, 64, 4, 3, True), "dq": (64, 64, 4, 3, True), "dkdv": (64, 64, 4, 3, True)},
    {"fwd": (128, 64, 8, 3, True), "dq": (128, 32, 8, 2, True), "dkdv": (32, 128, 8, 2, True)},
    {"fwd": (128, 64, 8, 3, True, 128), "dq": (128, 32, 8, 2, False, 128), "dkdv": (32, 128, 8, 2)},
    {"fwd": (64, 64, 4, 2, True, 128), "dq": (64, 64, 4, 2, True, 128), "dkdv": (32, 64, 4, 3)},
    {"fwd": (64, 64, 4, 2, True), "dq": (64, 64, 4, 2, True), "dkdv": (64, 64, 4, 2, True)},
], ids=["stacked-a", "stacked-b", "tma", "stacked-tma", "capped", "capped-flat", "tma-2stage"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["longformer", "bigbird", "dilated", "card", "causal_window"])
def test_every_autotuner_candidate_shape_is_exact(name, d, kind_cfgs, monkeypatch):
    """Tall (stacked) row tiles, narrow walked tiles and TMA descriptors, as the autotuner may
    choose them (tall rows forced whatever their extra pairs), at both head-dim classes."""
    from patterncc import lowering
    from patterncc.backends import tuning
    monkeypatch.setattr(lowering, "STACK_WASTE", 1e9)
    monkeypatch.setattr(lowering, "TALL_ONLY_GATHERED", False)  # token-order layouts too
    for kind, cfg in kind_cfgs.items():
        for width in (64, 128):
            monkeypatch.setitem(tuning.CONFIGS, (kind, width), tuning.KernelConfig(*cfg))
    op = patterncc.compile(REFERENCE[name], block_size=64, backend="triton")
    t, h, hkv = 1500, 4, 2
    q, k, v = _inputs(1, h, hkv, t, d, torch.bfloat16, seed=7)
    out = op(q, k, v)
    ref = reference_attention(q, k, v, op.mask(t, h).cuda())
    assert rel_err(out, ref) < 1e-2
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        assert rel_err(a, r) < 1e-2
