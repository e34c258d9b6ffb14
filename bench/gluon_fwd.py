"""A producer-warp forward in Gluon for plain token-order rows: a prototype, to measure the idea.

bench/RESULTS.md (twentieth session) finds that a row's fixed cost in patterncc's forward is
mostly the pass of Q, K, V and O through memory, paid beside the tiles' compute: the warps
that compute also wait for every load. Here a 1-warp loader partition streams each program's
Q tiles (a two-slot ring) and K/V tiles (a STAGES-slot ring) by TMA, signalled by mbarriers,
running ahead across rows, while the 4-warp default partition only computes: S = Q K^T and
O += P V by warpgroup MMA (P from registers), the online softmax between them, the output and
LSE of a row on its last tile. Programs are persistent (one per resident slot), each walking
the tiles of rows pid, pid + P, ... in one loop, like the flat forward of the same session.

Scope: B = 1, bf16, token order, T a multiple of 64, no thin columns or thin rows (the plan is
built with lowering.THIN_COLUMNS and THIN_ROWS off) or membership tables -- enough to time the
idea against `_attn_fwd` on the same layout, not a kernel of the package. Written against
Triton 3.6 (the GPU machine's): Gluon's API moves between releases. ``ASYNC=True`` takes
`_consumer_async` (FlashAttention-3's overlap inside one warpgroup: tile i's Q K^T and tile
i - 1's P V issued together, tile i's softmax while P V runs), which alone also masks the tiles
whose entry is not FULL, with the pattern's generated predicate under ``gluon.jit``
(gluon_predicate), and merges the pieces of split rows (SPLIT, _finish_item: partials in
scratch slots, the last piece to arrive merges by log-sum-exp). ``PROBE`` 1 and 2 time the
loads alone and the products alone; `_gluon_fwd_pairs` lets two consumers walk two adjacent
rows over one K/V ring (schedule_pairs).

Measured in bench/RESULTS.md (twentieth and twenty-first sessions, H100): exact everywhere
(bitwise but for longformer's merge order); 4% faster than `_attn_fwd` on FULL rows at D=128
(8% paired), level on windows, 9-18% slower at D=64; the asynchronous consumer 1-2% faster
than the synchronous one; the probes put the tiles' time in the compute warps' work (products
alone 82-96%, loads alone 32-67%).

    python3 bench/gluon_fwd.py                 # on the GPU machine: check, then time
    PROBES=1 PAIRS=1 PATS="window(256)" python3 bench/gluon_fwd.py   # the probes, the paired form
    PYTHONPATH=/tmp/tr36/x python bench/gluon_fwd.py --aot   # compile for sm_90 here, print SASS counts
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait  # noqa: E402,E501

BLOCK = 64


def gluon_predicate(pattern: str):
    """The pattern's generated token predicate (``token_mask`` of patterncc's generated module:
    elementwise operations on the query and key token vectors) as a Gluon function: the same
    text under ``gluon.jit``, written to a file beside the generated module and imported."""
    import importlib.util
    import patterncc
    from patterncc import codegen
    gen = codegen.load(patterncc.parse(pattern))
    if gen.plan.table_nodes:
        raise ValueError(f"{pattern!r}: membership tables are not wired into the Gluon prototype")
    body = gen.source[gen.source.index("def token_mask("):]
    body = body[:body.index("\n\n@triton.jit")]
    path = gen.path.with_name(gen.path.stem + "_gluon.py")
    path.write_text("from triton.experimental import gluon\nfrom triton.experimental.gluon import language as tl\n\n\n"
                    "@gluon.jit\n" + body + "\n")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.token_mask


@gluon.constexpr_function
def _mma_layout(n):
    """The register layout of a 64 x n warpgroup-MMA result over the 4 compute warps (scores:
    n = 64; the output accumulator: n = HEAD_DIM)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _p_layout(head_dim):
    """The register layout of P (a 64 x 64 bf16 tile) as the left operand of P V."""
    return gl.DotOperandLayout(operand_index=0, parent=_mma_layout(head_dim), k_width=2)


@gluon.jit
def _fresh_row(HEAD_DIM: gl.constexpr):
    """A row's online-softmax state before its first tile: (m = -inf, l = 0, acc = 0) in the
    layouts of the scores' rows and of the output accumulator."""
    row_s: gl.constexpr = gl.SliceLayout(1, _mma_layout(64))
    return (gl.full([64], float("-inf"), gl.float32, row_s), gl.full([64], 0.0, gl.float32, row_s),
            gl.full([64, HEAD_DIM], 0.0, gl.float32, _mma_layout(HEAD_DIM)))


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, FIRST: gl.constexpr, s, kv_row, STAGES: gl.constexpr):
    """K and V rows kv_row .. kv_row + 63 into ring slot s by TMA, each signalling its own
    full barrier (FIRST + s for K, FIRST + STAGES + s for V) when it lands."""
    mbarrier.expect(bars.index(FIRST + s), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, 0], bars.index(FIRST + s), k_smem.index(s))
    mbarrier.expect(bars.index(FIRST + STAGES + s), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [kv_row, 0], bars.index(FIRST + STAGES + s), v_smem.index(s))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work, lo, hi, T, NR, GROUP,
            STAGES: gl.constexpr, PROBE: gl.constexpr = 0):
    """The producer: per tile, its row's Q tile when the row starts (two slots), then its K and
    V tiles into the ring as slots free up. Barriers: 0-1 Q slot full, 2-3 Q slot free,
    4 + s K slot s full, 4 + STAGES + s V slot s full, 4 + 2 * STAGES + s K/V slot s free.
    PROBE = 2 (a timing probe, results wrong): once each slot has been filled, slots are
    signalled full without a copy, so the consumer computes on stale tiles with no traffic."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    rows = 0
    for i in range(lo, hi):
        j = i - lo
        code = gl.load(sched_work + i)
        kb = gl.load(sched_tile + i)
        w = code >> 2
        head = w // NR
        if (code & 1) != 0:
            qs = rows % 2
            # Fresh barriers read as having completed the phase before phase 0: no wait on a first pass.
            mbarrier.wait(bars.index(2 + qs), ((rows // 2) & 1) ^ 1)
            if PROBE == 2 and rows >= 2:
                mbarrier.arrive(bars.index(qs), count=1)
            else:
                mbarrier.expect(bars.index(qs), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [head * T + (w % NR) * BM, 0], bars.index(qs),
                                                q_smem.index(qs))
            rows += 1
        s = j % STAGES
        mbarrier.wait(bars.index(4 + 2 * STAGES + s), ((j // STAGES) & 1) ^ 1)
        if PROBE == 2 and j >= STAGES:
            mbarrier.arrive(bars.index(4 + s), count=1)
            mbarrier.arrive(bars.index(4 + STAGES + s), count=1)
        else:
            _load_kv(k_desc, v_desc, k_smem, v_smem, bars, 4, s, (head // GROUP) * T + kb * BM, STAGES)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, bars, sched_work, lo, hi, out_ptr, lse_ptr, qk_scale, T, NR,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """The 4 compute warps: the online softmax over each row's tiles, its output and LSE
    (base 2, scores scaled by qk_scale) stored on the row's last tile."""
    BM: gl.constexpr = 64
    s_layout: gl.constexpr = _mma_layout(BM)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = _p_layout(HEAD_DIM)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i, l_i, acc = _fresh_row(HEAD_DIM)
    rows = 0
    for i in range(lo, hi):
        j = i - lo
        code = gl.load(sched_work + i)
        qs = rows % 2
        if (code & 1) != 0:
            mbarrier.wait(bars.index(qs), (rows // 2) & 1)
            m_i, l_i, acc = _fresh_row(HEAD_DIM)
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(bars.index(4 + s), phase)
        sc = warpgroup_mma(q_smem.index(qs), k_smem.index(s).permute((1, 0)),
                           gl.full([BM, BM], 0.0, gl.float32, s_layout), use_acc=False)
        m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        mbarrier.wait(bars.index(4 + STAGES + s), phase)
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(s), acc)
        mbarrier.arrive(bars.index(4 + 2 * STAGES + s), count=1)
        if (code & 2) != 0:
            mbarrier.arrive(bars.index(2 + qs), count=1)
            w = code >> 2
            first = (w // NR) * T + (w % NR) * BM
            r = gl.arange(0, BM, layout=row_o)
            c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            l_o = gl.convert_layout(l_i, row_o)
            out = acc / l_o[:, None]
            gl.store(out_ptr + (first + r)[:, None] * HEAD_DIM + c[None, :], out.to(gl.bfloat16))
            gl.store(lse_ptr + first + r, gl.convert_layout(m_i + gl.log2(l_i), row_o))
            rows += 1


@gluon.jit
def _consumer_loads(bars, sched_work, lo, hi, STAGES: gl.constexpr):
    """A timing probe (PROBE = 1; no output): the consumer only waits for each tile's K and V
    and frees the slot, so the kernel takes the time of its loads alone."""
    rows = 0
    for i in range(lo, hi):
        j = i - lo
        code = gl.load(sched_work + i)
        qs = rows % 2
        if (code & 1) != 0:
            mbarrier.wait(bars.index(qs), (rows // 2) & 1)
        s = j % STAGES
        mbarrier.wait(bars.index(4 + s), (j // STAGES) & 1)
        mbarrier.wait(bars.index(4 + STAGES + s), (j // STAGES) & 1)
        mbarrier.arrive(bars.index(4 + 2 * STAGES + s), count=1)
        if (code & 2) != 0:
            mbarrier.arrive(bars.index(2 + qs), count=1)
            rows += 1


@gluon.jit
def _softmax_step(sc, m_i, l_i, qk_scale, MASKED: gl.constexpr = False):
    """One online-softmax step on scores ``sc``: (p, alpha, new m, new l). With MASKED a row
    may have seen no allowed key yet (m = -inf): it subtracts 0, so p and alpha are 0, not NaN."""
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    m_sub = m_new
    if MASKED:
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(sc * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _masked(sc, i, code, sched_tile, sched_flags, T, NR, mask_fn: gl.constexpr):
    """Tile i's scores with the pattern's predicate applied where its entry is not FULL."""
    BM: gl.constexpr = sc.shape[0]
    flags = gl.load(sched_flags + i)
    if (flags & 1) == 0:
        w = code >> 2
        offs_m = (w % NR) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, sc.type.layout))
        offs_n = gl.load(sched_tile + i) * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, sc.type.layout))
        sc = gl.where(mask_fn(offs_m, offs_n, w // NR, flags, T, sched_flags), sc, float("-inf"))
    return sc


@gluon.jit
def _store_row(acc, m_i, l_i, code, out_ptr, lse_ptr, T, NR, HEAD_DIM: gl.constexpr, row_o: gl.constexpr,
               o_layout: gl.constexpr):
    BM: gl.constexpr = 64
    w = code >> 2
    first = (w // NR) * T + (w % NR) * BM
    r = gl.arange(0, BM, layout=row_o)
    c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    l_o = gl.convert_layout(l_i, row_o)
    empty = l_o == 0.0  # a row no key reaches: output 0, LSE +inf
    out = gl.where(empty[:, None], 0.0, acc / gl.where(empty, 1.0, l_o)[:, None])
    gl.store(out_ptr + (first + r)[:, None] * HEAD_DIM + c[None, :], out.to(gl.bfloat16))
    lse = gl.where(empty, float("inf"), gl.convert_layout(m_i, row_o) + gl.log2(gl.where(empty, 1.0, l_o)))
    gl.store(lse_ptr + first + r, lse)


@gluon.jit
def _finish_item(acc, m_i, l_i, code, t, out_ptr, lse_ptr, T, NR, sched_slot, sched_merge, scratch_o, scratch_m,
                 scratch_l, count, merge_start, merge_end, HEAD_DIM: gl.constexpr, row_o: gl.constexpr,
                 o_layout: gl.constexpr, SPLIT: gl.constexpr):
    """An item whose last tile is t is done: store its row, or (SPLIT, a piece of a split row)
    write its unnormalised partial to its scratch slot, and if it is the row's last piece to
    arrive, merge the row's partials by log-sum-exp and store the row (as _attn_fwd does)."""
    BM: gl.constexpr = 64
    if not SPLIT:
        _store_row(acc, m_i, l_i, code, out_ptr, lse_ptr, T, NR, HEAD_DIM, row_o, o_layout)
    else:
        slot = gl.load(sched_slot + t)
        if slot < 0:
            _store_row(acc, m_i, l_i, code, out_ptr, lse_ptr, T, NR, HEAD_DIM, row_o, o_layout)
        else:
            r = gl.arange(0, BM, layout=row_o)
            c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            gl.store(scratch_o + (slot * BM + r)[:, None] * HEAD_DIM + c[None, :], acc)
            gl.store(scratch_m + slot * BM + r, gl.convert_layout(m_i, row_o))
            gl.store(scratch_l + slot * BM + r, gl.convert_layout(l_i, row_o))
            gl.thread_barrier()  # every thread's partial stored before the release below
            merged = gl.load(sched_merge + t)
            s0 = gl.load(merge_start + merged)
            s1 = gl.load(merge_end + merged)
            arrived = gl.atomic_add(count + merged, 1, sem="acq_rel")
            if arrived == s1 - s0 - 1:
                gl.store(count + merged, 0)  # reset for the next call
                m_r = gl.full([BM], float("-inf"), gl.float32, row_o)
                l_r = gl.full([BM], 0.0, gl.float32, row_o)
                acc_r = gl.full([BM, HEAD_DIM], 0.0, gl.float32, o_layout)
                for sl in range(s0, s1):
                    m_s = gl.load(scratch_m + sl * BM + r, cache_modifier=".cg")
                    l_s = gl.load(scratch_l + sl * BM + r, cache_modifier=".cg")
                    o_s = gl.load(scratch_o + (sl * BM + r)[:, None] * HEAD_DIM + c[None, :], cache_modifier=".cg")
                    m_new = gl.maximum(m_r, m_s)
                    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = gl.exp2(m_r - m_sub)
                    beta = gl.exp2(m_s - m_sub)
                    l_r = l_r * alpha + l_s * beta
                    acc_r = acc_r * alpha[:, None] + o_s * beta[:, None]
                    m_r = m_new
                _store_row(acc_r, m_r, l_r, code, out_ptr, lse_ptr, T, NR, HEAD_DIM, row_o, o_layout)


@gluon.jit
def _consumer_async(q_smem, k_smem, v_smem, bars, sched_work, lo, hi, out_ptr, lse_ptr, qk_scale, T, NR,
                    sched_tile, sched_flags, sched_slot, sched_merge, scratch_o, scratch_m, scratch_l, count,
                    merge_start, merge_end, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, MASK_FN: gl.constexpr,
                    SPLIT: gl.constexpr):
    """_consumer with FlashAttention-3's overlap inside one warpgroup: tile i's Q K^T and tile
    i - 1's P V are issued together, and tile i's softmax runs while P V still does. The row's
    state is rescaled (or, on a new row's first tile, the finished row stored) once P V is in.
    With a predicate ``MASK_FN`` (gluon_predicate), tiles whose entry is not FULL are masked;
    with SPLIT, items may be pieces of split rows (see _finish_item)."""
    MASKED: gl.constexpr = MASK_FN is not None
    BM: gl.constexpr = 64
    s_layout: gl.constexpr = _mma_layout(BM)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = _p_layout(HEAD_DIM)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    zeros_s = gl.full([BM, BM], 0.0, gl.float32, s_layout)
    if lo < hi:
        # Tile lo: always a row's first.
        code_acc = gl.load(sched_work + lo)
        mbarrier.wait(bars.index(0), 0)
        mbarrier.wait(bars.index(4), 0)
        sc = warpgroup_mma(q_smem.index(0), k_smem.index(0).permute((1, 0)), zeros_s, use_acc=False)
        if MASKED:
            sc = _masked(sc, lo, code_acc, sched_tile, sched_flags, T, NR, MASK_FN)
        p, alpha, m_i, l_i = _softmax_step(sc, gl.full([BM], float("-inf"), gl.float32, row_s),
                                           gl.full([BM], 0.0, gl.float32, row_s), qk_scale, MASKED)
        p_prev = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = gl.full([BM, HEAD_DIM], 0.0, gl.float32, o_layout)
        qs_acc = 0
        rows = 1
        for i in range(lo + 1, hi):
            j = i - lo
            code = gl.load(sched_work + i)
            first = (code & 1) != 0
            qs = gl.where(first, rows % 2, qs_acc)
            mbarrier.wait(bars.index(qs), (rows // 2) & 1, pred=first)
            s = j % STAGES
            mbarrier.wait(bars.index(4 + s), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem.index(qs), k_smem.index(s).permute((1, 0)), zeros_s, use_acc=False,
                                  is_async=True)
            sp = (j - 1) % STAGES
            mbarrier.wait(bars.index(4 + STAGES + sp), ((j - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, v_smem.index(sp), acc, is_async=True)
            sc = warpgroup_mma_wait(1, deps=[s_tok])
            if MASKED:
                sc = _masked(sc, i, code, sched_tile, sched_flags, T, NR, MASK_FN)
            m_run = gl.where(first, float("-inf"), m_i)
            l_run = gl.where(first, 0.0, l_i)
            p, alpha, m_new, l_new = _softmax_step(sc, m_run, l_run, qk_scale, MASKED)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(bars.index(4 + 2 * STAGES + sp), count=1)
            if first:  # tile i - 1 closed a row: store it, free its Q slot, start afresh
                _finish_item(acc, m_i, l_i, code_acc, i - 1, out_ptr, lse_ptr, T, NR, sched_slot, sched_merge,
                             scratch_o, scratch_m, scratch_l, count, merge_start, merge_end, HEAD_DIM, row_o, o_layout,
                             SPLIT)
                mbarrier.arrive(bars.index(2 + qs_acc), count=1)
                acc = gl.full([BM, HEAD_DIM], 0.0, gl.float32, o_layout)
                code_acc = code
                qs_acc = qs
                rows += 1
            else:
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            m_i = m_new
            l_i = l_new
            p_prev = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        # The last tile's P V, then its row.
        j = hi - lo
        sp = (j - 1) % STAGES
        mbarrier.wait(bars.index(4 + STAGES + sp), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_prev, v_smem.index(sp), acc)
        mbarrier.arrive(bars.index(4 + 2 * STAGES + sp), count=1)
        _finish_item(acc, m_i, l_i, code_acc, hi - 1, out_ptr, lse_ptr, T, NR, sched_slot, sched_merge, scratch_o,
                     scratch_m, scratch_l, count, merge_start, merge_end, HEAD_DIM, row_o, o_layout, SPLIT)
        mbarrier.arrive(bars.index(2 + qs_acc), count=1)


@gluon.jit
def _gluon_fwd(q_desc, k_desc, v_desc, out_ptr, lse_ptr, prog_start, sched_tile, sched_work, sched_flags, qk_scale,
               T, NR, GROUP, sched_slot, sched_merge, scratch_o, scratch_m, scratch_l, count, merge_start, merge_end,
               HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, ASYNC: gl.constexpr = False,
               MASK_FN: gl.constexpr = None, SPLIT: gl.constexpr = False, PROBE: gl.constexpr = 0):
    """The forward over each program's tiles (schedule()); ASYNC takes _consumer_async, which
    alone applies a predicate MASK_FN to tiles whose entry is not FULL and (SPLIT) merges the
    pieces of split rows."""
    lo = gl.load(prog_start + gl.program_id(0))
    hi = gl.load(prog_start + gl.program_id(0) + 1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [4 + 3 * STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(4 + 3 * STAGES):
        mbarrier.init(bars.index(b), count=1)
    # (the partitions' arguments are spelled out per call: a tuple built first would turn the
    # constexprs in it into tensors)
    if PROBE == 1:
        gl.warp_specialize([(_consumer_loads, (bars, sched_work, lo, hi, STAGES)),
                            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work,
                                       lo, hi, T, NR, GROUP, STAGES))], [1], [48])
    elif ASYNC:
        gl.warp_specialize([(_consumer_async, (q_smem, k_smem, v_smem, bars, sched_work, lo, hi, out_ptr, lse_ptr,
                                               qk_scale, T, NR, sched_tile, sched_flags, sched_slot, sched_merge,
                                               scratch_o, scratch_m, scratch_l, count, merge_start, merge_end,
                                               HEAD_DIM, STAGES, MASK_FN, SPLIT)),
                            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work,
                                       lo, hi, T, NR, GROUP, STAGES, PROBE))], [1], [48])
    else:
        gl.warp_specialize([(_consumer, (q_smem, k_smem, v_smem, bars, sched_work, lo, hi, out_ptr, lse_ptr,
                                         qk_scale, T, NR, HEAD_DIM, STAGES)),
                            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work,
                                       lo, hi, T, NR, GROUP, STAGES))], [1], [48])

@gluon.jit
def _pair_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work, lo, hi, T, NR,
                 GROUP, STAGES: gl.constexpr):
    """The producer of the paired forward: per pair, both rows' Q tiles (consumer c's two slots
    c * 2 + 0/1), then each tile of the union of their key blocks once, for both consumers.
    Barriers: 4 c + slot Q full, 4 c + 2 + slot Q free; 8 + s K full, 8 + STAGES + s V full,
    8 + 2 STAGES + s K/V slot free (two arrivals: both consumers)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    pairs = 0
    for i in range(lo, hi):
        j = i - lo
        code = gl.load(sched_work + i)
        kb = gl.load(sched_tile + i)
        w = code >> 3
        head = w // NR
        if (code & 1) != 0:
            qs = pairs % 2
            for c in gl.static_range(2):
                mbarrier.wait(bars.index(4 * c + 2 + qs), ((pairs // 2) & 1) ^ 1)
                if c == 0 or (code & 4) != 0:
                    mbarrier.expect(bars.index(4 * c + qs), q_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(q_desc, [head * T + (w % NR + c) * BM, 0], bars.index(4 * c + qs),
                                                    q_smem.index(2 * c + qs))
                else:  # no second row: its slot reads as filled, so both consumers keep one phase count
                    mbarrier.arrive(bars.index(4 * c + qs), count=1)
            pairs += 1
        s = j % STAGES
        mbarrier.wait(bars.index(8 + 2 * STAGES + s), ((j // STAGES) & 1) ^ 1)
        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, 8, s, (head // GROUP) * T + kb * BM, STAGES)


@gluon.jit
def _pair_consumer(q_smem, k_smem, v_smem, bars, sched_work, sched_tile, sched_f, lo, hi, out_ptr, lse_ptr,
                   qk_scale, T, NR, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, C: gl.constexpr,
                   MASK_FN: gl.constexpr):
    """Consumer C (0: the pair's first row, 1: its second) of the paired forward: synchronous
    products as in _consumer, over the union of the pair's key blocks, skipping the tiles
    whose flag (sched_f, this consumer's) is -1. A skipped tile is still waited for before its
    slot is released: a release must not run ahead of the tile it releases."""
    MASKED: gl.constexpr = MASK_FN is not None
    BM: gl.constexpr = 64
    s_layout: gl.constexpr = _mma_layout(BM)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = _p_layout(HEAD_DIM)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i, l_i, acc = _fresh_row(HEAD_DIM)
    pairs = 0
    for i in range(lo, hi):
        j = i - lo
        code = gl.load(sched_work + i)
        f = gl.load(sched_f + i)
        row_code = ((code >> 3) + C) << 2  # the code _masked and _store_row read: row * 4
        qs = pairs % 2
        if (code & 1) != 0:
            mbarrier.wait(bars.index(4 * C + qs), (pairs // 2) & 1)
            m_i, l_i, acc = _fresh_row(HEAD_DIM)
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(bars.index(8 + s), phase)
        if f >= 0:
            sc = warpgroup_mma(q_smem.index(2 * C + qs), k_smem.index(s).permute((1, 0)),
                               gl.full([BM, BM], 0.0, gl.float32, s_layout), use_acc=False)
            if MASKED:
                sc = _masked(sc, i, row_code, sched_tile, sched_f, T, NR, MASK_FN)
            p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale, MASKED)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            mbarrier.wait(bars.index(8 + STAGES + s), phase)
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(s), acc)
        mbarrier.arrive(bars.index(8 + 2 * STAGES + s), count=1)
        if (code & 2) != 0:
            mbarrier.arrive(bars.index(4 * C + 2 + qs), count=1)
            if C == 0 or (code & 4) != 0:
                _store_row(acc, m_i, l_i, row_code, out_ptr, lse_ptr, T, NR, HEAD_DIM, row_o, o_layout)
            pairs += 1


@gluon.jit
def _gluon_fwd_pairs(q_desc, k_desc, v_desc, out_ptr, lse_ptr, prog_start, sched_tile, sched_work, sched_fa,
                     sched_fb, qk_scale, T, NR, GROUP, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                     MASK_FN: gl.constexpr = None, REGS: gl.constexpr = 128):
    """The paired forward (schedule_pairs): two 4-warp consumers, each walking one of two
    adjacent query rows, share one 1-warp producer and one K/V ring, so that a key block both
    rows attend is loaded once (half the K/V traffic of _gluon_fwd on a band); one program
    per SM."""
    lo = gl.load(prog_start + gl.program_id(0))
    hi = gl.load(prog_start + gl.program_id(0) + 1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [8 + 3 * STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(8):
        mbarrier.init(bars.index(b), count=1)
    for b in gl.static_range(3 * STAGES):
        mbarrier.init(bars.index(8 + b), count=2 if b >= 2 * STAGES else 1)
    gl.warp_specialize([(_pair_consumer, (q_smem, k_smem, v_smem, bars, sched_work, sched_tile, sched_fa, lo, hi,
                                          out_ptr, lse_ptr, qk_scale, T, NR, HEAD_DIM, STAGES, 0, MASK_FN)),
                        (_pair_consumer, (q_smem, k_smem, v_smem, bars, sched_work, sched_tile, sched_fb, lo, hi,
                                          out_ptr, lse_ptr, qk_scale, T, NR, HEAD_DIM, STAGES, 1, MASK_FN)),
                        (_pair_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, sched_tile, sched_work,
                                        lo, hi, T, NR, GROUP, STAGES))], [4, 1], [REGS, 48])


def schedule_pairs(row: np.ndarray, start: np.ndarray, end: np.ndarray, kblock: np.ndarray, flags: np.ndarray,
                   rows_per_head: int, programs: int):
    """Rows 2r and 2r + 1 of a head (one item per row: no split rows) as pairs, each pair's
    tiles the union of the two rows' key blocks in ascending order, pairs to programs
    round-robin: (prog_start, key block per tile, code per tile = first row * 8 + 1 on the
    pair's first tile + 2 on its last + 4 when the pair has a second row, the first row's
    entry flags per tile (-1: not its block), the second row's)."""
    assert len(np.unique(row)) == len(row), "split rows are not paired"
    counts = (end - start).astype(np.int64)
    entry_row = np.repeat(row.astype(np.int64), counts)
    entry = np.concatenate([np.arange(a, b) for a, b in zip(start, end)]) if len(row) else np.zeros(0, np.int64)
    kb = kblock[entry].astype(np.int64)
    fl = flags[entry].astype(np.int64)
    pair = (entry_row // rows_per_head) * ((rows_per_head + 1) // 2) + (entry_row % rows_per_head) // 2
    second = (entry_row % rows_per_head) % 2
    order = np.lexsort((second, kb, pair))
    pair, kb, fl, second = pair[order], kb[order], fl[order], second[order]
    new_tile = np.ones(len(kb), bool)
    new_tile[1:] = (pair[1:] != pair[:-1]) | (kb[1:] != kb[:-1])
    tile = np.cumsum(new_tile) - 1
    n = int(tile[-1]) + 1 if len(tile) else 0
    t_pair = np.zeros(n, np.int64)
    t_kb = np.zeros(n, np.int64)
    fa = np.full(n, -1, np.int64)
    fb = np.full(n, -1, np.int64)
    t_pair[tile], t_kb[tile] = pair, kb
    fa[tile[second == 0]] = fl[second == 0]
    fb[tile[second == 1]] = fl[second == 1]
    pairs_per_head = (rows_per_head + 1) // 2
    first_row = (t_pair // pairs_per_head) * rows_per_head + (t_pair % pairs_per_head) * 2
    has_b = (t_pair % pairs_per_head) * 2 + 1 < rows_per_head
    uniq, p_start, p_count = np.unique(t_pair, return_index=True, return_counts=True)
    owner = np.arange(len(uniq)) % programs
    porder = np.lexsort((np.arange(len(uniq)), owner))
    runs = p_count[porder]
    idx = np.concatenate([np.arange(a, a + c) for a, c in zip(p_start[porder], runs)]) if len(uniq) else tile[:0]
    prog_start = np.concatenate([[0], np.cumsum(np.bincount(owner, weights=p_count, minlength=programs))])
    offs = np.arange(len(idx)) - np.repeat(np.concatenate([[0], np.cumsum(runs)[:-1]]), runs)
    code = first_row[idx] * 8 + (offs == 0) + 2 * (offs == np.repeat(runs, runs) - 1) + 4 * has_b[idx]
    return tuple(a.astype(np.int32) for a in (prog_start, t_kb[idx], code, fa[idx], fb[idx]))


def schedule(row: np.ndarray, start: np.ndarray, end: np.ndarray, kblock: np.ndarray, programs: int,
             flags: np.ndarray | None = None, per_item: tuple = ()):
    """Items (``row``: each item's row) to programs round-robin (item i to program i % programs),
    each program's tiles in item order: (prog_start, key block per tile, row code per tile =
    row * 4 + 1 on the item's first tile + 2 on its last; with ``flags`` (per entry) each
    tile's entry flags; then each array of ``per_item`` (per item) repeated for its tiles)."""
    owner = np.arange(len(row)) % programs
    order = np.lexsort((np.arange(len(row)), owner))
    runs = (end - start)[order].astype(np.int64)
    prog_start = np.concatenate([[0], np.cumsum(np.bincount(owner, weights=end - start, minlength=programs))])
    first = np.concatenate([[0], np.cumsum(runs)[:-1]])
    offs = np.arange(int(runs.sum())) - np.repeat(first, runs)
    entry = np.repeat(start[order].astype(np.int64), runs) + offs
    code = np.repeat(row[order].astype(np.int64) * 4, runs) + (offs == 0) + 2 * (offs == np.repeat(runs, runs) - 1)
    out = (prog_start.astype(np.int32), kblock[entry].astype(np.int32), code.astype(np.int32))
    if flags is not None:
        out += (flags[entry].astype(np.int32),)
    return out + tuple(np.repeat(a[order], runs).astype(np.int32) for a in per_item)


def aot(head_dim: int, stages: int, use_async: bool = False, maxnreg: int | None = None,
        pattern: str | None = None, split: bool = False, probe: int = 0) -> None:
    """Compile for sm_90 without a GPU and print what the SASS holds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from sass_loops import sass_of
    shared = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)"
    desc = f"tensordesc<bf16[64, {head_dim}],{shared}>"
    sig = {"q_desc": desc, "k_desc": desc, "v_desc": desc, "out_ptr": "*bf16", "lse_ptr": "*fp32",
           "prog_start": "*i32", "sched_tile": "*i32", "sched_work": "*i32", "sched_flags": "*i32", "qk_scale": "fp32",
           "T": "i32", "NR": "i32", "GROUP": "i32", "sched_slot": "*i32", "sched_merge": "*i32",
           "scratch_o": "*fp32", "scratch_m": "*fp32", "scratch_l": "*fp32", "count": "*i32", "merge_start": "*i32",
           "merge_end": "*i32", "HEAD_DIM": "constexpr", "STAGES": "constexpr", "ASYNC": "constexpr",
           "MASK_FN": "constexpr", "SPLIT": "constexpr", "PROBE": "constexpr"}
    consts = {"HEAD_DIM": head_dim, "STAGES": stages, "ASYNC": use_async,
              "MASK_FN": gluon_predicate(pattern) if pattern else None, "SPLIT": split,
              "PROBE": probe}
    k = triton.compile(GluonASTSource(_gluon_fwd, sig, consts),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, **({"maxnreg": maxnreg} if maxnreg else {})})
    sass = sass_of(k.asm["cubin"])
    print(json.dumps({"head_dim": head_dim, "stages": stages, "async": use_async, "maxnreg": maxnreg,
                      "pattern": pattern, "split": split, "probe": probe,
                      "shared": k.metadata.shared,
                      "HGMMA": sass.count("HGMMA"), "UTMALDG": sass.count("UTMALDG"),
                      "SYNCS": sass.count("SYNCS"), "STL": sass.count("STL")}))


def aot_pairs(head_dim: int, stages: int, regs: int, maxnreg: int | None, pattern: str | None = None) -> None:
    """Compile the paired forward for sm_90 without a GPU and print what the SASS holds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from sass_loops import sass_of
    shared = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)"
    desc = f"tensordesc<bf16[64, {head_dim}],{shared}>"
    sig = {"q_desc": desc, "k_desc": desc, "v_desc": desc, "out_ptr": "*bf16", "lse_ptr": "*fp32",
           "prog_start": "*i32", "sched_tile": "*i32", "sched_work": "*i32", "sched_fa": "*i32", "sched_fb": "*i32",
           "qk_scale": "fp32", "T": "i32", "NR": "i32", "GROUP": "i32", "HEAD_DIM": "constexpr",
           "STAGES": "constexpr", "MASK_FN": "constexpr", "REGS": "constexpr"}
    consts = {"HEAD_DIM": head_dim, "STAGES": stages, "MASK_FN": gluon_predicate(pattern) if pattern else None,
              "REGS": regs}
    k = triton.compile(GluonASTSource(_gluon_fwd_pairs, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, **({"maxnreg": maxnreg} if maxnreg else {})})
    sass = sass_of(k.asm["cubin"])
    print(json.dumps({"pairs": True, "head_dim": head_dim, "stages": stages, "regs": regs, "maxnreg": maxnreg,
                      "pattern": pattern, "shared": k.metadata.shared, "num_regs": getattr(k, "n_regs", None),
                      "HGMMA": sass.count("HGMMA"), "UTMALDG": sass.count("UTMALDG"),
                      "SYNCS": sass.count("SYNCS"), "STL": sass.count("STL"), "SETMAXNREG": sass.count("SETMAXREG")}))


def main() -> None:
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.testing import do_bench_cudagraph
    import patterncc
    from patterncc.backends import triton_backend as tb
    from bench_attention import switched

    out_dir = os.environ.get("OUT", ".")

    def emit(rec: dict) -> None:
        """Print the pattern's record so far and append it to $OUT/gluon_fwd.jsonl (the last
        line of a pattern is its whole record)."""
        print(json.dumps(rec), flush=True)
        with open(f"{out_dir}/gluon_fwd.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    T, H = int(os.environ.get("T", "65536")), 16
    LOG2E = 1.4426950408889634
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for D in (64, 128):
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        layout = gl.NVMMASharedLayout.get_default_for([BLOCK, D], gl.bfloat16)
        descs = [TensorDescriptor.from_tensor(x.view(H * T, D), [BLOCK, D], layout) for x in (q, k, v)]
        pats = "block(64);block(512);block(1024);window(256);window(1023) & causal;window(256) | global([0])"
        for src in os.environ.get("PATS", pats).split(";"):
            lay = patterncc.compile(src).layout(T, H)
            ref_out, ref_lse = tb.forward(q, k, v, lay, D ** -0.5)  # the package as it is
            # The prototype has no thin columns or thin rows: a global key is a masked entry of
            # every row, a global query's row is cut into pieces that merge (SPLIT)
            with switched({"THIN_COLUMNS": False, "THIN_ROWS": False}):
                run_ = tb.launch_for(q, k, lay)
            walk = run_.plan.fwd
            assert walk.row_block == BLOCK and not walk.n_narrow and not walk.items.n_thin and not run_.plan.permuted
            masked = not bool((walk.flags & 1).all())
            mask_fn = gluon_predicate(src) if masked else None
            split = walk.items.n_slots > 0
            it = walk.items
            host = [x.cpu().numpy() for x in (it.row, it.start, it.end, walk.block, walk.flags, it.slot, it.merge)]
            scratch = [torch.empty(max(1, it.n_slots) * BLOCK * w, device="cuda") for w in (D, 1, 1)]
            merges = (walk.counters(1, 1), it.merge_start, it.merge_end)
            rec = {"D": D, "pattern": src, "T": T,
                   "patterncc_ms": do_bench_cudagraph(lambda: tb.forward(q, k, v, lay, D ** -0.5), rep=100)}
            # (programs per SM, pipeline stages, register cap, asynchronous products): the kernel
            # runs 8 warps (the loader's warp is padded to a warpgroup), so uncapped (255
            # registers) one program fits per SM, capped at 128 two (ptxas needs at least 94).
            # Masked tiles only in the asynchronous consumer.
            configs = ((2, 3, 128, False), (2, 2, 128, True), (2, 3, 128, True)) if D == 64 else \
                ((2, 2, 128, False), (2, 2, 128, True), (1, 3, None, True))
            probes = bool(os.environ.get("PROBES"))
            if probes:  # the fastest asynchronous config of the twenty-first session, and its probes
                configs = ((2, 3, 128, True),) if D == 64 else ((2, 2, 128, True),)
            for per_sm, stages, cap, use_async in configs:
                if (masked or split) and not use_async:
                    continue
                programs = sms * per_sm
                prog_start, tiles, codes, flags, slots, merge = (
                    torch.from_numpy(a).cuda() for a in schedule(*host[:4], programs, host[4], host[5:]))
                out = torch.full_like(q, float("nan"))
                lse = torch.full((1, H, T), float("nan"), device="cuda")
                opts = {"maxnreg": cap} if cap else {}

                def run(probe=0):
                    _gluon_fwd[(programs,)](*descs, out, lse, prog_start, tiles, codes, flags, D ** -0.5 * LOG2E, T,
                                            walk.rows_per_head, 1, slots, merge, *scratch, *merges, HEAD_DIM=D,
                                            STAGES=stages, ASYNC=use_async, MASK_FN=mask_fn, SPLIT=split,
                                            PROBE=probe, num_warps=4, **opts)
                key = f"{per_sm}x{stages}" + (f"-cap{cap}" if cap else "") + ("-async" if use_async else "")
                try:
                    run()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a config that does not fit is recorded, not fatal
                    rec[key] = f"{type(e).__name__}: {str(e)[:200]}"
                    emit(rec)
                    continue
                err = (out.float() - ref_out.float()).abs().max().item()
                lse_err = (lse - ref_lse).abs().max().item()
                # checked before timed, and recorded at once: a config that hangs the GPU (a
                # barrier phase gone wrong) leaves every earlier result on record
                rec[key] = {"max_err": err, "lse_err": lse_err}
                emit(rec)
                rec[key]["ms"] = do_bench_cudagraph(run, rep=100)
                emit(rec)
                if probes:  # the loads alone (1), the products alone on stale tiles (2)
                    for probe in (1, 2):
                        rec[key][f"probe{probe}_ms"] = do_bench_cudagraph(lambda: run(probe), rep=100)
                        emit(rec)
            if os.environ.get("PAIRS") and not split:
                pair_sched = [torch.from_numpy(a).cuda() for a in
                              schedule_pairs(*host[:5], walk.rows_per_head, sms)]
                # (stages, the second consumer's registers, the kernel's cap): 12 warps, one
                # program per SM, so at most 170 registers a thread
                for stages, regs, cap in (((4, 160, 168), (6, 160, 168)) if D == 64 else
                                          ((3, 160, 168), (4, 160, 168))):
                    out = torch.full_like(q, float("nan"))
                    lse = torch.full((1, H, T), float("nan"), device="cuda")

                    def run_pairs():
                        _gluon_fwd_pairs[(sms,)](*descs, out, lse, *pair_sched[:3], *pair_sched[3:],
                                                 D ** -0.5 * LOG2E, T, walk.rows_per_head, 1, HEAD_DIM=D,
                                                 STAGES=stages, MASK_FN=mask_fn, REGS=regs, num_warps=4, maxnreg=cap)
                    key = f"pairs-{stages}-r{regs}-cap{cap}"
                    try:
                        run_pairs()
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001
                        rec[key] = f"{type(e).__name__}: {str(e)[:200]}"
                        emit(rec)
                        continue
                    rec[key] = {"max_err": (out.float() - ref_out.float()).abs().max().item(),
                                "lse_err": (lse - ref_lse).abs().max().item()}
                    emit(rec)
                    rec[key]["ms"] = do_bench_cudagraph(run_pairs, rep=100)
                    emit(rec)


if __name__ == "__main__":
    if "--aot" in sys.argv:
        os.environ.pop("TRITON_INTERPRET", None)
        for d, s, a, cap, pat in ((64, 2, False, None, None), (64, 3, False, 128, None), (64, 3, True, 128, None),
                                  (128, 2, True, 128, None), (64, 3, True, 128, "window(256)"),
                                  (128, 2, True, 128, "window(1023) & causal")):
            aot(d, s, a, cap, pat)
        aot(64, 3, True, 128, "window(256) | global([0])", split=True)
        aot(128, 2, True, 128, "window(256) | global([0])", split=True)
        for probe in (1, 2):
            aot(128, 2, True, 128, "window(256)", probe=probe)
    else:
        main()
