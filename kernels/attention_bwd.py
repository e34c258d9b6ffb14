"""Template: block-sparse attention backward (FlashAttention-2).

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, which defines ``token_mask`` / ``token_mask_t`` first.

Three passes, no atomics, deterministic:

1. ``_attn_bwd_preprocess``: Delta = rowsum(dO * O) (fp32), one program per row tile.
2. ``_attn_bwd_dkdv``: one program per (kv head, key block) tile walks the *kv index*: the
   transposed layout of every query head sharing that kv head (GQA/MQA), so the program
   owns its dK/dV rows and sums over the group's query heads without races.
3. ``_attn_bwd_dq``: one program per (query head, query block) tile walks the forward index.

Both walks are cut into work items like the forward (at most ``split`` entries each);
items of a heavy row or column write fp32 partials to scratch slots, which
``_sum_partials`` adds up. Probabilities are recomputed as p = exp2(s * qk_scale - LSE):
LSE = +inf on rows no key reaches, so p is exactly 0 there. FULL blocks need no mask at
all here: padding keys past T read K = V = 0 and only feed dK/dV rows that are never stored
(and add 0 to dQ), padding queries read LSE = +inf (p = 0).
"""
import triton
import triton.language as tl

# @template-begin


@triton.jit(do_not_specialize=["SEQ_LEN", "M_BLOCKS"])
def _attn_bwd_preprocess(Out, dOut, Delta, SEQ_LEN, M_BLOCKS,
                         HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b, h, t] = sum_d dO * O in fp32; a 1-D grid of B * H * M_BLOCKS row tiles."""
    pid = tl.program_id(0)
    m_first = (pid % M_BLOCKS) * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    bh = (pid // M_BLOCKS).to(tl.int64) * SEQ_LEN
    o = _load_rows(Out + (bh + m_first) * HEAD_DIM, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
    do = _load_rows(dOut + (bh + m_first) * HEAD_DIM, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh + offs_m, delta, mask=offs_m < SEQ_LEN)


@triton.jit(do_not_specialize=["SEQ_LEN", "NB", "B", "H"])
def _attn_bwd_dkdv(
    Q, K, V, dOut, Lse, Delta,               # Lse / Delta [B, H, T] fp32
    dK, dV,                                  # [B, H_KV, T, D]
    ScratchK, ScratchV,                      # [slots, B, LAYOUT_BLOCK, HEAD_PAD] fp32
    item_row, item_start, item_end, item_slot,   # work items over kv rows kv_head * NB + key block
    qblock, qhead, entry_flags,              # kv index entries: query block, query head, flags
    tables,
    qk_scale, sm_scale,
    SEQ_LEN, NB, B, H, GROUP,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    M_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    pid = tl.program_id(0)
    b = tl.program_id(1)
    item = pid // N_TILES
    row = tl.load(item_row + item)
    start = tl.load(item_start + item)
    end = tl.load(item_end + item)
    slot = tl.load(item_slot + item)
    kv_head = row // NB

    n_first = (row % NB) * LAYOUT_BLOCK + (pid % N_TILES) * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    kv_base = ((b * (H // GROUP) + kv_head).to(tl.int64) * SEQ_LEN + n_first) * HEAD_DIM
    k = _load_rows(K + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
    v = _load_rows(V + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)

    dk = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
    # One flat loop over (entry, query sub-tile) pairs.
    for it in range(start * M_TILES, end * M_TILES):
        e = it // M_TILES
        qb = tl.load(qblock + e)
        head = tl.load(qhead + e)
        flags = tl.load(entry_flags + e)
        q_head = (b * H + head).to(tl.int64) * SEQ_LEN
        m_first = qb * LAYOUT_BLOCK + (it % M_TILES) * BLOCK_M
        offs_m = m_first + tl.arange(0, BLOCK_M)
        row_base = (q_head + m_first) * HEAD_DIM
        q = _load_rows(Q + row_base, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        do = _load_rows(dOut + row_base, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        lse = tl.load(Lse + q_head + offs_m, mask=offs_m < SEQ_LEN, other=float("inf"))
        delta = tl.load(Delta + q_head + offs_m, mask=offs_m < SEQ_LEN, other=0.0)
        # Transposed tiles ([BLOCK_N, BLOCK_M]) as in Triton's fused-attention tutorial:
        # the products below then need no register transposes of p or dS.
        qkT = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), PRECISION, UPCAST) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if (flags & 1) == 0:
            pT = tl.where(token_mask_t(offs_m, offs_n, head, flags, SEQ_LEN, tables), pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv, PRECISION, UPCAST)
        dpT = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk, PRECISION, UPCAST)
    dk = dk * sm_scale

    if slot < 0:
        _store_rows(dK + kv_base, n_first, offs_n, dk.to(dK.dtype.element_ty), SEQ_LEN, HEAD_DIM, HEAD_PAD)
        _store_rows(dV + kv_base, n_first, offs_n, dv.to(dV.dtype.element_ty), SEQ_LEN, HEAD_DIM, HEAD_PAD)
    else:
        s_row = (slot * B + b).to(tl.int64) * LAYOUT_BLOCK + (pid % N_TILES) * BLOCK_N
        r = tl.arange(0, BLOCK_N)
        c = tl.arange(0, HEAD_PAD)
        tl.store(ScratchK + (s_row + r)[:, None] * HEAD_PAD + c[None, :], dk)
        tl.store(ScratchV + (s_row + r)[:, None] * HEAD_PAD + c[None, :], dv)


@triton.jit(do_not_specialize=["SEQ_LEN", "NB", "B", "H"])
def _attn_bwd_dq(
    Q, K, V, dOut, Lse, Delta,
    dQ,                                      # [B, H, T, D]
    ScratchQ,                                # [slots, B, LAYOUT_BLOCK, HEAD_PAD] fp32
    item_row, item_start, item_end, item_slot,   # work items over rows head * NB + query block
    kblock, entry_flags,                     # forward CSR entries
    tables,
    qk_scale, sm_scale,
    SEQ_LEN, NB, B, H, GROUP,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    M_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    pid = tl.program_id(0)
    b = tl.program_id(1)
    item = pid // M_TILES
    row = tl.load(item_row + item)
    start = tl.load(item_start + item)
    end = tl.load(item_end + item)
    slot = tl.load(item_slot + item)
    head = row // NB
    kv_head = head // GROUP

    m_first = (row % NB) * LAYOUT_BLOCK + (pid % M_TILES) * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    q_head = (b * H + head).to(tl.int64) * SEQ_LEN
    row_base = (q_head + m_first) * HEAD_DIM
    kv_row0 = (b * (H // GROUP) + kv_head).to(tl.int64) * SEQ_LEN * HEAD_DIM
    q = _load_rows(Q + row_base, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
    do = _load_rows(dOut + row_base, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
    lse = tl.load(Lse + q_head + offs_m, mask=offs_m < SEQ_LEN, other=float("inf"))
    delta = tl.load(Delta + q_head + offs_m, mask=offs_m < SEQ_LEN, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # One flat loop over (entry, key sub-tile) pairs.
    for it in range(start * N_TILES, end * N_TILES):
        e = it // N_TILES
        kb = tl.load(kblock + e)
        flags = tl.load(entry_flags + e)
        n_first = kb * LAYOUT_BLOCK + (it % N_TILES) * BLOCK_N
        offs_n = n_first + tl.arange(0, BLOCK_N)
        kv_base = kv_row0 + n_first.to(tl.int64) * HEAD_DIM
        k = _load_rows(K + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        v = _load_rows(V + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if (flags & 1) == 0:
            p = tl.where(token_mask(offs_m, offs_n, head, flags, SEQ_LEN, tables), p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    dq = dq * sm_scale

    if slot < 0:
        _store_rows(dQ + row_base, m_first, offs_m, dq.to(dQ.dtype.element_ty), SEQ_LEN, HEAD_DIM, HEAD_PAD)
    else:
        s_row = (slot * B + b).to(tl.int64) * LAYOUT_BLOCK + (pid % M_TILES) * BLOCK_M
        r = tl.arange(0, BLOCK_M)
        c = tl.arange(0, HEAD_PAD)
        tl.store(ScratchQ + (s_row + r)[:, None] * HEAD_PAD + c[None, :], dq)


@triton.jit(do_not_specialize=["SEQ_LEN", "NB", "B", "H_DST"])
def _sum_partials(
    Dst, Scratch,                            # Dst [B, H_DST, T, D]; Scratch [slots, B, LAYOUT_BLOCK, HEAD_PAD]
    merge_row, merge_start, merge_end,       # per split row: row id (head * NB + block), slot range
    SEQ_LEN, NB, B, H_DST,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Dst rows of each split row = sum of its fp32 partials (dQ, dK or dV)."""
    TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK
    pid = tl.program_id(0)
    b = tl.program_id(1)
    i = pid // TILES
    row = tl.load(merge_row + i)
    s0 = tl.load(merge_start + i)
    s1 = tl.load(merge_end + i)
    first = (row % NB) * LAYOUT_BLOCK + (pid % TILES) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    r = tl.arange(0, BLOCK)
    c = tl.arange(0, HEAD_PAD)
    acc = tl.zeros([BLOCK, HEAD_PAD], tl.float32)
    for s in range(s0, s1):
        s_row = (s * B + b).to(tl.int64) * LAYOUT_BLOCK + (pid % TILES) * BLOCK
        acc += tl.load(Scratch + (s_row + r)[:, None] * HEAD_PAD + c[None, :])
    base = ((b * H_DST + row // NB).to(tl.int64) * SEQ_LEN + first) * HEAD_DIM
    _store_rows(Dst + base, first, offs, acc.to(Dst.dtype.element_ty), SEQ_LEN, HEAD_DIM, HEAD_PAD)
