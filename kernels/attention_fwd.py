"""Template: block-sparse attention forward (FlashAttention-2 online softmax).

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, which defines ``token_mask`` (the pattern's predicate) first.

Work decomposition (built by patterncc/lowering.py). The layout's forward CSR lists, for
every row ``head * NB + query_block``, its key blocks and a flag word per entry (bit 0:
FULL, bits 1..: random terms). The grid is (work items x query sub-tiles, batch). A work
item is a run of at most ``split`` entries of one row: ordinary rows are one item, which
writes the normalised output and the log-sum-exp directly (``slot < 0``); heavy rows (a
global query attending every key block) are cut into several items that each write an
unnormalised partial (acc, m, l) to a scratch slot, merged by ``_attn_fwd_merge``. So no
program walks much more than ``split`` blocks, and a pattern without heavy rows runs in
a single launch.

Softmax runs in base 2: scores are multiplied by ``qk_scale = scale * log2(e)`` so that
exp2 can be used, and LSE is stored in those units (log2-sum-exp2 of the scaled scores).
Rows that no key reaches keep l == 0: their output is 0 and their LSE is +inf, which
makes every backward probability exp2(s - LSE) exactly 0 for them.
"""
import triton
import triton.language as tl

# @template-begin


@triton.jit(do_not_specialize=["SEQ_LEN", "NB", "B", "H"])
def _attn_fwd(
    Q, K, V, Out, Lse,                       # [B, H, T, D], [B, H_KV, T, D] x2, [B, H, T, D], [B, H, T] fp32
    ScratchO, ScratchM, ScratchL,            # [slots, B, LAYOUT_BLOCK, HEAD_PAD] / [slots, B, LAYOUT_BLOCK] fp32
    item_row, item_start, item_end, item_slot,   # work items (int32)
    kblock, entry_flags,                     # forward CSR entries (int32)
    tables,                                  # int8 [n_tables, T] membership tables (global index sets)
    qk_scale,                                # softmax scale * log2(e)
    SEQ_LEN, NB, B, H, GROUP,                # tokens, blocks per head, batch, query heads, H // H_KV
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
    # int64 scalar bases: b * H * T * D can pass 2^31; the in-tile offsets stay int32.
    q_head = (b * H + head).to(tl.int64) * SEQ_LEN
    kv_row0 = (b * (H // GROUP) + kv_head).to(tl.int64) * SEQ_LEN * HEAD_DIM
    q = _load_rows(Q + (q_head + m_first) * HEAD_DIM, m_first, offs_m, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # One flat loop over (entry, key sub-tile): a 128-token layout block is two 64-key tiles.
    for it in range(start * N_TILES, end * N_TILES):
        e = it // N_TILES
        kb = tl.load(kblock + e)
        flags = tl.load(entry_flags + e)
        n_first = kb * LAYOUT_BLOCK + (it % N_TILES) * BLOCK_N
        offs_n = n_first + tl.arange(0, BLOCK_N)
        kv_base = kv_row0 + n_first.to(tl.int64) * HEAD_DIM
        k = _load_rows(K + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST) * qk_scale
        if (flags & 1) != 0:
            # FULL block: every pair is allowed, no predicate. Only the last key block
            # can run past the sequence end; mask its padding keys.
            if n_first + BLOCK_N > SEQ_LEN:
                qk = tl.where(offs_n[None, :] < SEQ_LEN, qk, float("-inf"))
        else:
            # PARTIAL block: the pattern's token predicate (generated from the IR).
            allowed = token_mask(offs_m, offs_n, head, flags, SEQ_LEN, tables)
            qk = tl.where(allowed & (offs_n[None, :] < SEQ_LEN), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no allowed key yet keeps m = -inf: subtract 0 instead,
        # so p and alpha are exp2(-inf) = 0 and never NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V + kv_base, n_first, offs_n, SEQ_LEN, HEAD_DIM, HEAD_PAD, 0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    if slot < 0:
        _finish_rows(Out + (q_head + m_first) * HEAD_DIM, Lse + q_head, m_first, offs_m,
                     acc, m_i, l_i, SEQ_LEN, HEAD_DIM, HEAD_PAD)
    else:
        # Part of a heavy row: keep the unnormalised partial for _attn_fwd_merge.
        s_row = (slot * B + b).to(tl.int64) * LAYOUT_BLOCK + (pid % M_TILES) * BLOCK_M
        r = tl.arange(0, BLOCK_M)
        c = tl.arange(0, HEAD_PAD)
        tl.store(ScratchO + (s_row + r)[:, None] * HEAD_PAD + c[None, :], acc)
        tl.store(ScratchM + s_row + r, m_i)
        tl.store(ScratchL + s_row + r, l_i)


@triton.jit
def _finish_rows(out_base, lse_base, m_first, offs_m, acc, m_i, l_i, SEQ_LEN,
                 HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Normalise and store one tile of output rows and their LSE; empty rows give 0 / +inf."""
    empty = l_i == 0.0
    # 0, not 0 * NaN: a row that attends nothing ignores non-finite values in its tiles.
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    _store_rows(out_base, m_first, offs_m, out.to(out_base.dtype.element_ty), SEQ_LEN, HEAD_DIM, HEAD_PAD)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_base + offs_m, lse, mask=offs_m < SEQ_LEN)


@triton.jit(do_not_specialize=["SEQ_LEN", "NB", "B", "H"])
def _attn_fwd_merge(
    Out, Lse, ScratchO, ScratchM, ScratchL,
    merge_row, merge_start, merge_end,       # per split row: its row id and scratch slot range
    SEQ_LEN, NB, B, H,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the partials of each heavy row by log-sum-exp (one program per row tile)."""
    M_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    pid = tl.program_id(0)
    b = tl.program_id(1)
    i = pid // M_TILES
    sub = pid % M_TILES
    row = tl.load(merge_row + i)
    s0 = tl.load(merge_start + i)
    s1 = tl.load(merge_end + i)
    head = row // NB
    m_first = (row % NB) * LAYOUT_BLOCK + sub * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, HEAD_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for s in range(s0, s1):
        s_row = (s * B + b).to(tl.int64) * LAYOUT_BLOCK + sub * BLOCK_M
        m_s = tl.load(ScratchM + s_row + r)
        l_s = tl.load(ScratchL + s_row + r)
        o_s = tl.load(ScratchO + (s_row + r)[:, None] * HEAD_PAD + c[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        beta = tl.math.exp2(m_s - m_sub)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m_i = m_new
    q_head = (b * H + head).to(tl.int64) * SEQ_LEN
    _finish_rows(Out + (q_head + m_first) * HEAD_DIM, Lse + q_head, m_first, offs_m,
                 acc, m_i, l_i, SEQ_LEN, HEAD_DIM, HEAD_PAD)
