"""Template: block-sparse attention backward (FlashAttention-2).

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, which defines ``token_mask`` / ``token_mask_t`` and
``class_mask`` (dQ only, see common.py _walked_mask) first.

Two or three passes, one launch each, deterministic:

1. ``_attn_bwd_dq``: one program per (query head, query row) tile walks the forward index,
   with the forward's items (a thin-row item, THIN_ROWS, computes the 16 rows holding its
   global queries and leaves zeros in its partial for the row's other positions). With
   DELTA_FROM_O its regular items also compute Delta = rowsum(dO * O) (fp32) from the O and
   dO rows they hold and store it for the pass below: every query row has a regular item,
   and the several items of a split row store the same bits (the same tile, the same sum).
2. ``_attn_bwd_preprocess``: Delta alone, one program per row tile; launched instead when
   dQ is not wanted (dK/dV only).
   Delta is stored by token, or in residue order by kernel position with a copy of the
   LSE beside it (``_store_stats``), so that dK/dV loads both as contiguous vectors; with
   STATS_PAIRED by position in every launch from a HEAD_PAD of STATS_PAIRED_MIN_HEAD_PAD, as
   (LSE, Delta) pairs that it loads at once.
3. ``_attn_bwd_dkdv``: one program per (kv head, key row) tile walks the *kv index*: the
   transposed layout of every query head sharing that kv head (GQA/MQA), so the program
   owns its dK/dV rows and sums over the group's query heads without races.
   With THIN_ROWS, dK/dV walks a split row's far blocks the other way round: the global
   queries of a query block as a 16-query tile, in a loop before the regular entries. With
   THIN_KEYS, a key row's far query blocks that attend only its global keys are items of
   their own (``item_thin`` >= 0): the 16 keys holding them against THIN_M queries a step,
   a partial that leaves the row's other keys zero, summed with the row's other items.

Rows are ROW_BLOCK positions (one layout block or several stacked, as in the forward;
flag bit ``1 + j`` then says stacked layout block j is FULL on that entry). Both walks
are cut into work items like the forward (at most ``split`` entries each); items of a
heavy row or column write fp32 partials to scratch slots, and the last of them to finish
sums them in slot order. Probabilities are recomputed as p = exp2(s * qk_scale - LSE):
LSE = +inf on rows no key reaches, so p is exactly 0 there. FULL blocks need no mask at
all here: positions that are not tokens read K = V = 0 and only feed dK/dV rows that are
never stored (and add 0 to dQ), and their queries read LSE = +inf (p = 0).
"""
import triton
import triton.language as tl

# The generated module's header sets these (codegen.SEQ_LEN_CLASSES, POSITION_STATS, PAIRED_STATS,
# PAIRED_STATS_MIN_HEAD_PAD).
DKDV_UNSPECIALISED = ["SEQ_LEN", "NR", "B", "H"]
STATS_BY_POSITION = tl.constexpr(True)
STATS_PAIRED = tl.constexpr(False)
STATS_PAIRED_MIN_HEAD_PAD = tl.constexpr(0)

# @template-begin


@triton.constexpr_function
def stats_paired(head_pad):
    """Whether a launch of padded head dim ``head_pad`` keeps LSE and Delta as (LSE, Delta) pairs
    by kernel position (STATS_PAIRED, from a HEAD_PAD of STATS_PAIRED_MIN_HEAD_PAD): decided
    here alone, at compile time in the kernels and by the backend (sizing the buffers) on the
    generated module."""
    return bool(STATS_PAIRED and head_pad >= STATS_PAIRED_MIN_HEAD_PAD)


@triton.constexpr_function
def stats_by_position(permuted, head_pad):
    """Whether Delta (with an LSE copy) is stored by kernel position, STATS_LEN a head, rather
    than by token: as pairs, or in residue order (STATS_BY_POSITION). See _store_stats."""
    return bool(stats_paired(head_pad) or (permuted and STATS_BY_POSITION))


@triton.jit(do_not_specialize=["SEQ_LEN", "M_BLOCKS", "H"])
def _attn_bwd_preprocess(Out, dOut, Lse, Delta, LsePos, head_dil, head_seg, SEQ_LEN, M_BLOCKS, STATS_LEN, H,
                         HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         PERMUTED: tl.constexpr):
    """Delta = sum_d dO * O in fp32, stored as _store_stats says; a 1-D grid of B * H * M_BLOCKS
    tiles of kernel positions."""
    pid = tl.program_id(0)
    bh = pid // M_BLOCKS
    m_first = (pid % M_BLOCKS) * BLOCK_M
    dil, seg = _head_order(head_dil, head_seg, bh % H, SEQ_LEN, PERMUTED)
    tok, valid = _tokens(m_first, BLOCK_M, dil, seg, SEQ_LEN, PERMUTED)
    row0 = bh.to(tl.int64) * SEQ_LEN
    o = _load_rows(_row_ptrs(Out, row0, m_first, tok, HEAD_DIM, HEAD_PAD, PERMUTED), valid, HEAD_DIM, HEAD_PAD)
    do = _load_rows(_row_ptrs(dOut, row0, m_first, tok, HEAD_DIM, HEAD_PAD, PERMUTED), valid, HEAD_DIM, HEAD_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + row0 + tok, mask=valid, other=float("inf"))
    _store_stats(Delta, LsePos, _stats_row0(bh, SEQ_LEN, STATS_LEN, PERMUTED, HEAD_PAD), m_first, tok, valid, delta,
                 lse, PERMUTED, HEAD_PAD)


@triton.jit
def _stats_row0(bh, SEQ_LEN, STATS_LEN, PERMUTED: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Where query head ``bh``'s Delta (and its LSE copy) start: see _store_stats."""
    if stats_by_position(PERMUTED, HEAD_PAD):
        return bh.to(tl.int64) * STATS_LEN
    else:
        return bh.to(tl.int64) * SEQ_LEN


@triton.jit
def _store_stats(Delta, LsePos, stats_row0, first, tok, valid, delta, lse, PERMUTED: tl.constexpr,
                 HEAD_PAD: tl.constexpr):
    """Store a query tile's Delta for the passes after this one: by token in token order; in
    residue order (STATS_BY_POSITION) by kernel position, STATS_LEN a head, with a copy of the
    tile's LSE beside it. dK/dV reads both for every walked query tile: by position they are
    contiguous vector loads, by token strided scalar ones with their addresses and masks.
    Positions that hold no token store LSE = +inf and Delta = 0 (the tile's loads read them
    so), so p = 0 there. STATS_PAIRED: by position in every launch (from a HEAD_PAD of
    STATS_PAIRED_MIN_HEAD_PAD), as (LSE, Delta) pairs in one buffer (Delta and LsePos both
    point at it), which dK/dV reads with one load."""
    if stats_paired(HEAD_PAD):
        pos = stats_row0 + first + tl.arange(0, tok.shape[0])
        tl.store(LsePos + pos[:, None] * 2 + tl.arange(0, 2)[None, :], tl.join(lse, delta))
    elif PERMUTED and STATS_BY_POSITION:
        pos = first + tl.arange(0, tok.shape[0])
        tl.store(Delta + stats_row0 + pos, delta)
        tl.store(LsePos + stats_row0 + pos, lse)
    else:
        tl.store(Delta + stats_row0 + tok, delta, mask=valid)


@triton.jit
def _load_delta(Delta, stats_row0, first, tok, valid, PERMUTED: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Delta of query positions first .. first + len(tok) - 1 (see _store_stats)."""
    if stats_paired(HEAD_PAD):
        return tl.load(Delta + (stats_row0 + first + tl.arange(0, tok.shape[0])) * 2 + 1)
    elif PERMUTED and STATS_BY_POSITION:
        return tl.load(Delta + stats_row0 + first + tl.arange(0, tok.shape[0]))
    else:
        return tl.load(Delta + stats_row0 + tok, mask=valid, other=0.0)


@triton.jit
def _load_lse(Lse, LsePos, q_row0, stats_row0, first, tok, valid, PERMUTED: tl.constexpr):
    """LSE of query positions first .. first + len(tok) - 1: the forward's, by token, or
    _store_stats's copy by position; +inf where no token is."""
    if PERMUTED and STATS_BY_POSITION:
        return tl.load(LsePos + stats_row0 + first + tl.arange(0, tok.shape[0]))
    else:
        return tl.load(Lse + q_row0 + tok, mask=valid, other=float("inf"))


@triton.jit
def _load_stat_pairs(Pairs, stats_row0, first, BLOCK_M: tl.constexpr):
    """LSE and Delta of query positions first .. first + BLOCK_M - 1 from their (LSE, Delta)
    pairs (STATS_PAIRED): one contiguous load, no mask (every position is stored)."""
    pos = stats_row0 + first + tl.arange(0, BLOCK_M)
    return tl.split(tl.load(Pairs + pos[:, None] * 2 + tl.arange(0, 2)[None, :]))


@triton.jit(do_not_specialize=DKDV_UNSPECIALISED)
def _attn_bwd_dkdv(
    Q, K, V, dOut, Lse, Delta, LsePos,       # Lse [B, H, T] fp32; Delta, LsePos: see _store_stats
    Qd, dOd,                                 # TMA descriptors of Q, dO (USE_TMA; else Q, dO again)
    dK, dV,                                  # [B, H_KV, T, D]
    ScratchK, ScratchV, Count,               # split columns: [slots, B, ROW_BLOCK, HEAD_PAD] fp32; counters
    item_row, item_start, item_end, item_slot, item_merge,   # work items over kv rows kv_head * NR + key row
    merge_start, merge_end,
    item_nstart, item_nend,                  # per item: its thin query entries (THIN_ROWS), after the regular ones
    qblock, qhead, entry_flags,              # kv index entries: query block (thin: 16-query sub-block), head, flags
    tables, head_dil, head_seg,
    item_thin,                               # per item: its 16-key sub-block (thin-key items), else -1
    qk_scale, sm_scale,
    SEQ_LEN, NR, B, H, GROUP, STATS_LEN,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NARROW: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, THIN_ROWS: tl.constexpr, THIN_KEYS: tl.constexpr, THIN_M: tl.constexpr,
):
    N_TILES: tl.constexpr = ROW_BLOCK // BLOCK_N
    M_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    STACKED: tl.constexpr = ROW_BLOCK > LAYOUT_BLOCK
    b, item, tile, start, end, slot, dil, seg, n_first, tok_n, valid_n, kv_row0 = _key_item(
        item_row, item_start, item_end, item_slot, head_dil, head_seg, SEQ_LEN, NR, H, GROUP, ROW_BLOCK, BLOCK_N,
        PERMUTED)
    thin = _thin_item(item_thin, item, THIN_KEYS)
    if thin >= 0:
        _dkdv_thin_partial(Q, K, V, dOut, Lse, Delta, LsePos, ScratchK, ScratchV, kv_row0, n_first, thin, tile,
                           slot, b, B, H, start, end, qblock, qhead, entry_flags, dil, seg, tables, qk_scale,
                           sm_scale, SEQ_LEN, STATS_LEN, HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, ROW_BLOCK, BLOCK_N,
                           NARROW, THIN_M, PERMUTED, PRECISION, UPCAST)
        _dkdv_sum_if_last(Count, ScratchK, ScratchV, item_merge, item, merge_start, merge_end, tile, b, B,
                          _row_ptrs(dK, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED),
                          _row_ptrs(dV, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED), valid_n, N_TILES,
                          BLOCK_N, ROW_BLOCK, HEAD_DIM, HEAD_PAD)
    else:
        k = _load_rows(_row_ptrs(K, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED), valid_n, HEAD_DIM,
                       HEAD_PAD)
        v = _load_rows(_row_ptrs(V, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED), valid_n, HEAD_DIM,
                       HEAD_PAD)
        sub_col = (tile * BLOCK_N + tl.arange(0, BLOCK_N)) // LAYOUT_BLOCK

        dk = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
        if THIN_ROWS:
            # A few global queries of a far query block: a 16-query tile, not a whole block.
            for e in range(tl.load(item_nstart + item), tl.load(item_nend + item)):
                dk, dv = _dkdv_step(k, v, dk, dv, Q, dOut, Q, dOut, Lse, Delta, LsePos,
                                    tl.load(qblock + e) * NARROW, tl.load(qhead + e), tl.load(entry_flags + e), b, H,
                                    tok_n, sub_col, dil, seg, tables, qk_scale, SEQ_LEN, STATS_LEN, NARROW, HEAD_DIM,
                                    HEAD_PAD, STACKED, PERMUTED, False, PRECISION, UPCAST)
        # One flat loop over (entry, query sub-tile) pairs.
        for it in range(start * M_TILES, end * M_TILES):
            e = it // M_TILES
            m_first = tl.load(qblock + e) * LAYOUT_BLOCK + (it % M_TILES) * BLOCK_M
            dk, dv = _dkdv_step(k, v, dk, dv, Q, dOut, Qd, dOd, Lse, Delta, LsePos, m_first, tl.load(qhead + e),
                                tl.load(entry_flags + e), b, H, tok_n, sub_col, dil, seg, tables, qk_scale, SEQ_LEN,
                                STATS_LEN, BLOCK_M, HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST)
        dk = dk * sm_scale

        dk_ptrs = _row_ptrs(dK, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED)
        dv_ptrs = _row_ptrs(dV, kv_row0, n_first, tok_n, HEAD_DIM, HEAD_PAD, PERMUTED)
        if slot < 0:
            _store_rows(dk_ptrs, dk.to(dK.dtype.element_ty), valid_n, HEAD_DIM, HEAD_PAD)
            _store_rows(dv_ptrs, dv.to(dV.dtype.element_ty), valid_n, HEAD_DIM, HEAD_PAD)
        else:
            tl.store(_scratch_ptrs(ScratchK, slot, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD), dk)
            tl.store(_scratch_ptrs(ScratchV, slot, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD), dv)
            _dkdv_sum_if_last(Count, ScratchK, ScratchV, item_merge, item, merge_start, merge_end, tile, b, B,
                              dk_ptrs, dv_ptrs, valid_n, N_TILES, BLOCK_N, ROW_BLOCK, HEAD_DIM, HEAD_PAD)


@triton.jit
def _dkdv_sum_if_last(Count, ScratchK, ScratchV, item_merge, item, merge_start, merge_end, tile, b, B, dk_ptrs,
                      dv_ptrs, valid_n, N_TILES: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
                      HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """After a split key row's dK/dV partials are written: the last of its items sums them
    (in slot order) and stores dK and dV."""
    last, s0, s1 = _arrive(Count, tl.load(item_merge + item), tile, N_TILES, b, B, merge_start, merge_end)
    if last:
        dk = _sum_partials(ScratchK, s0, s1, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD)
        dv = _sum_partials(ScratchV, s0, s1, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD)
        _store_rows(dk_ptrs, dk.to(dk_ptrs.dtype.element_ty), valid_n, HEAD_DIM, HEAD_PAD)
        _store_rows(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), valid_n, HEAD_DIM, HEAD_PAD)


@triton.jit
def _dkdv_thin_partial(Q, K, V, dOut, Lse, Delta, LsePos, ScratchK, ScratchV, kv_row0, n_first, thin, tile, slot, b,
                       B, H, start, end, qblock, qhead, entry_flags, dil, seg, tables, qk_scale, sm_scale, SEQ_LEN,
                       STATS_LEN, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                       ROW_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr, THIN_M: tl.constexpr,
                       PERMUTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A thin-key item's dK/dV partial for this program's tile of the key row: the NARROW keys
    of sub-block ``thin`` (they hold global keys; its entries' queries attend no other key
    of the block) against its entries, THIN_M queries a step, and zero for the tile's other
    rows. A 16-key tile does a quarter of a 64-key tile's products and exponentials: the
    backward has no row max or rescale to keep, so its steps shrink with their width."""
    local, others = _thin_rows_in_tile(thin, tile, BLOCK_N, NARROW)
    zero = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)
    tl.store(_scratch_ptrs(ScratchK, slot, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD), zero,
             mask=others[:, None])
    tl.store(_scratch_ptrs(ScratchV, slot, b, B, tile * BLOCK_N, BLOCK_N, ROW_BLOCK, HEAD_PAD), zero,
             mask=others[:, None])
    if (local >= 0) & (local < BLOCK_N):
        t_first, tok_t, valid_t, k = _thin_tile_rows(K, kv_row0, n_first, local, dil, seg, SEQ_LEN, NARROW,
                                                     HEAD_DIM, HEAD_PAD, PERMUTED)
        v = _load_rows(_row_ptrs(V, kv_row0, t_first, tok_t, HEAD_DIM, HEAD_PAD, PERMUTED), valid_t, HEAD_DIM,
                       HEAD_PAD)
        dk = tl.zeros([NARROW, HEAD_PAD], tl.float32)
        dv = tl.zeros([NARROW, HEAD_PAD], tl.float32)
        sub_t = tl.zeros([NARROW], tl.int32)
        M_STEPS: tl.constexpr = LAYOUT_BLOCK // THIN_M
        for it in range(start * M_STEPS, end * M_STEPS):
            e = it // M_STEPS
            dk, dv = _dkdv_step(k, v, dk, dv, Q, dOut, Q, dOut, Lse, Delta, LsePos,
                                tl.load(qblock + e) * LAYOUT_BLOCK + (it % M_STEPS) * THIN_M, tl.load(qhead + e),
                                tl.load(entry_flags + e), b, H, tok_t, sub_t, dil, seg, tables, qk_scale, SEQ_LEN,
                                STATS_LEN, THIN_M, HEAD_DIM, HEAD_PAD, False, PERMUTED, False, PRECISION, UPCAST)
        tl.store(_scratch_ptrs(ScratchK, slot, b, B, tile * BLOCK_N + local, NARROW, ROW_BLOCK, HEAD_PAD),
                 dk * sm_scale)
        tl.store(_scratch_ptrs(ScratchV, slot, b, B, tile * BLOCK_N + local, NARROW, ROW_BLOCK, HEAD_PAD), dv)


@triton.jit
def _dkdv_step(k, v, dk, dv, Q, dOut, Qd, dOd, Lse, Delta, LsePos, m_first, head, flags, b, H, tok_n, sub_col, dil,
               seg, tables, qk_scale, SEQ_LEN, STATS_LEN, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               HEAD_PAD: tl.constexpr, STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV contribution of queries m_first .. m_first + BLOCK_M of query head ``head``."""
    q_row0 = (b * H + head).to(tl.int64) * SEQ_LEN
    tok_m, valid_m = _walked_tokens(m_first, BLOCK_M, dil, seg, SEQ_LEN, PERMUTED, HEAD_PAD)
    q = _walked_tile(Q, Qd, q_row0, b * H + head, m_first, tok_m, valid_m, seg, BLOCK_M, HEAD_DIM,
                     HEAD_PAD, PERMUTED, USE_TMA)
    do = _walked_tile(dOut, dOd, q_row0, b * H + head, m_first, tok_m, valid_m, seg, BLOCK_M, HEAD_DIM,
                      HEAD_PAD, PERMUTED, USE_TMA)
    stats_row0 = _stats_row0(b * H + head, SEQ_LEN, STATS_LEN, PERMUTED, HEAD_PAD)
    if stats_paired(HEAD_PAD):
        lse, delta = _load_stat_pairs(LsePos, stats_row0, m_first, BLOCK_M)
    else:
        lse = _load_lse(Lse, LsePos, q_row0, stats_row0, m_first, tok_m, valid_m, PERMUTED)
        delta = _load_delta(Delta, stats_row0, m_first, tok_m, valid_m, PERMUTED, HEAD_PAD)
    # Transposed tiles ([BLOCK_N, BLOCK_M]) as in Triton's fused-attention tutorial:
    # the products below then need no register transposes of p or dS.
    qkT = _mma(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], tl.float32), PRECISION, UPCAST) * qk_scale
    pT = tl.math.exp2(qkT - lse[None, :])
    if (flags & 1) == 0:
        allowed = token_mask_t(tok_m, tok_n, head, flags, SEQ_LEN, tables)
        if STACKED:
            allowed = allowed | (((flags >> (1 + sub_col)) & 1) != 0)[:, None]
        pT = tl.where(allowed, pT, 0.0)
    dv = _mma(pT.to(do.dtype), do, dv, PRECISION, UPCAST)
    dpT = _mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], tl.float32), PRECISION, UPCAST)
    dsT = pT * (dpT - delta[None, :])
    dk = _mma(dsT.to(q.dtype), q, dk, PRECISION, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=["SEQ_LEN", "NR", "B", "H"])
def _attn_bwd_dq(
    Q, K, V, dOut, Out, Lse, Delta, LsePos,  # Delta: read, or written here (DELTA_FROM_O; see _store_stats)
    Kd, Vd,                                  # TMA descriptors of K, V (USE_TMA; else K, V again)
    dQ,                                      # [B, H, T, D]
    ScratchQ, Count,                         # split rows: [slots, B, ROW_BLOCK, HEAD_PAD] fp32; counters
    item_row, item_start, item_end, item_slot, item_merge,   # work items over rows head * NR + query row
    merge_start, merge_end,
    item_nstart, item_nend,                  # per item: its narrow entries (thin global columns)
    kblock, entry_flags,                     # forward entries
    nblock, nflags,                          # narrow entries: 16-key sub-block, flags
    tables, head_dil, head_seg,
    item_thin,                               # per item: its 16-row sub-block (thin-row items), else -1
    qk_scale, sm_scale,
    SEQ_LEN, NR, B, H, GROUP, STATS_LEN,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NARROW: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, THIN_ROWS: tl.constexpr, DELTA_FROM_O: tl.constexpr,
    CLASS_GAP: tl.constexpr,
):
    M_TILES: tl.constexpr = ROW_BLOCK // BLOCK_M
    STACKED: tl.constexpr = ROW_BLOCK > LAYOUT_BLOCK
    b, item, tile, start, end, slot, head, dil, seg, m_first, q_row0, kv_bh, kv_row0 = _query_item(
        item_row, item_start, item_end, item_slot, head_dil, head_seg, SEQ_LEN, NR, H, GROUP, ROW_BLOCK, BLOCK_M,
        PERMUTED)
    tok_m, valid_m = _tokens(m_first, BLOCK_M, dil, seg, SEQ_LEN, PERMUTED)
    stats_row0 = _stats_row0(b * H + head, SEQ_LEN, STATS_LEN, PERMUTED, HEAD_PAD)
    dq_ptrs = _row_ptrs(dQ, q_row0, m_first, tok_m, HEAD_DIM, HEAD_PAD, PERMUTED)
    thin = _thin_item(item_thin, item, THIN_ROWS)
    if thin >= 0:
        _dq_thin_partial(Q, K, V, dOut, Out, Lse, Delta, Kd, Vd, ScratchQ, q_row0, stats_row0, kv_row0, kv_bh,
                         m_first, thin, tile, slot, b, B, start, end, kblock, entry_flags, head, dil, seg, tables,
                         qk_scale, sm_scale, SEQ_LEN, HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, ROW_BLOCK, BLOCK_M, BLOCK_N,
                         NARROW, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST, DELTA_FROM_O, CLASS_GAP)
        _dq_sum_if_last(Count, ScratchQ, item_merge, item, merge_start, merge_end, tile, b, B, dq_ptrs, valid_m,
                        M_TILES, BLOCK_M, ROW_BLOCK, HEAD_DIM, HEAD_PAD)
    else:
        q = _load_rows(_row_ptrs(Q, q_row0, m_first, tok_m, HEAD_DIM, HEAD_PAD, PERMUTED), valid_m, HEAD_DIM,
                       HEAD_PAD)
        do = _load_rows(_row_ptrs(dOut, q_row0, m_first, tok_m, HEAD_DIM, HEAD_PAD, PERMUTED), valid_m, HEAD_DIM,
                        HEAD_PAD)
        lse = tl.load(Lse + q_row0 + tok_m, mask=valid_m, other=float("inf"))
        delta = _row_delta(Out, Delta, do, q_row0, stats_row0, m_first, tok_m, valid_m, HEAD_DIM, HEAD_PAD,
                           PERMUTED, DELTA_FROM_O)
        if DELTA_FROM_O:  # for the dK/dV pass after this one (a split row's items store the same bits)
            _store_stats(Delta, LsePos, stats_row0, m_first, tok_m, valid_m, delta, lse, PERMUTED, HEAD_PAD)
        sub_row = (tile * BLOCK_M + tl.arange(0, BLOCK_M)) // LAYOUT_BLOCK
        at_m = _mask_coords(m_first, tok_m, BLOCK_M, seg, CLASS_GAP)  # what the predicate reads for the rows

        dq = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        # Thin global key columns first (16-wide tiles), then the entries.
        for e in range(tl.load(item_nstart + item), tl.load(item_nend + item)):
            dq = _dq_step(q, do, lse, delta, dq, K, V, K, V, kv_row0, kv_bh, tl.load(nblock + e) * NARROW,
                          tl.load(nflags + e), at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, NARROW,
                          HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, False, PRECISION, UPCAST, CLASS_GAP)
        dq = _dq_entries(q, do, lse, delta, dq, K, V, Kd, Vd, kv_row0, kv_bh, start, end, kblock, entry_flags,
                         at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, HEAD_DIM, HEAD_PAD,
                         LAYOUT_BLOCK, BLOCK_N, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST, CLASS_GAP)
        dq = dq * sm_scale

        if slot < 0:
            _store_rows(dq_ptrs, dq.to(dQ.dtype.element_ty), valid_m, HEAD_DIM, HEAD_PAD)
        else:
            tl.store(_scratch_ptrs(ScratchQ, slot, b, B, tile * BLOCK_M, BLOCK_M, ROW_BLOCK, HEAD_PAD), dq)
            _dq_sum_if_last(Count, ScratchQ, item_merge, item, merge_start, merge_end, tile, b, B, dq_ptrs,
                            valid_m, M_TILES, BLOCK_M, ROW_BLOCK, HEAD_DIM, HEAD_PAD)


@triton.jit
def _dq_entries(q, do, lse, delta, dq, K, V, Kd, Vd, kv_row0, kv_bh, start, end, kblock, entry_flags, at_m,
                sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, STACKED: tl.constexpr, PERMUTED: tl.constexpr,
                USE_TMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, CLASS_GAP: tl.constexpr):
    """dQ of entries start .. end - 1: one flat loop over (entry, key sub-tile) pairs."""
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for it in range(start * N_TILES, end * N_TILES):
        e = it // N_TILES
        n_first = tl.load(kblock + e) * LAYOUT_BLOCK + (it % N_TILES) * BLOCK_N
        dq = _dq_step(q, do, lse, delta, dq, K, V, Kd, Vd, kv_row0, kv_bh, n_first, tl.load(entry_flags + e),
                      at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, BLOCK_N,
                      HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST, CLASS_GAP)
    return dq


@triton.jit
def _dq_thin_partial(Q, K, V, dOut, Out, Lse, Delta, Kd, Vd, ScratchQ, q_row0, stats_row0, kv_row0, kv_bh, m_first,
                     thin, tile, slot, b, B, start, end, kblock, entry_flags, head, dil, seg, tables, qk_scale,
                     sm_scale, SEQ_LEN,
                     HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                     ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
                     STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, DELTA_FROM_O: tl.constexpr, CLASS_GAP: tl.constexpr):
    """A thin-row item's dQ partial for this program's tile (as the forward's _thin_partial):
    the NARROW rows of sub-block ``thin``, zero for the tile's other rows."""
    local, others = _thin_rows_in_tile(thin, tile, BLOCK_M, NARROW)
    tl.store(_scratch_ptrs(ScratchQ, slot, b, B, tile * BLOCK_M, BLOCK_M, ROW_BLOCK, HEAD_PAD),
             tl.zeros([BLOCK_M, HEAD_PAD], tl.float32), mask=others[:, None])
    if (local >= 0) & (local < BLOCK_M):
        t_first, tok_t, valid_t, q = _thin_tile_rows(Q, q_row0, m_first, local, dil, seg, SEQ_LEN, NARROW, HEAD_DIM,
                                                      HEAD_PAD, PERMUTED)
        do = _load_rows(_row_ptrs(dOut, q_row0, t_first, tok_t, HEAD_DIM, HEAD_PAD, PERMUTED), valid_t, HEAD_DIM,
                        HEAD_PAD)
        lse = tl.load(Lse + q_row0 + tok_t, mask=valid_t, other=float("inf"))
        # (the row's regular item stores these rows' Delta: a second writer could store other bits)
        delta = _row_delta(Out, Delta, do, q_row0, stats_row0, t_first, tok_t, valid_t, HEAD_DIM, HEAD_PAD,
                           PERMUTED, DELTA_FROM_O)
        dq = _dq_entries(q, do, lse, delta, tl.zeros([NARROW, HEAD_PAD], tl.float32), K, V, Kd, Vd, kv_row0, kv_bh,
                         start, end, kblock, entry_flags, _mask_coords(t_first, tok_t, NARROW, seg, CLASS_GAP),
                         tl.zeros([NARROW], tl.int32), head, dil, seg, tables, qk_scale, SEQ_LEN, HEAD_DIM, HEAD_PAD,
                         LAYOUT_BLOCK, BLOCK_N, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST, CLASS_GAP)
        tl.store(_scratch_ptrs(ScratchQ, slot, b, B, tile * BLOCK_M + local, NARROW, ROW_BLOCK, HEAD_PAD),
                 dq * sm_scale)


@triton.jit
def _row_delta(Out, Delta, do, q_row0, stats_row0, first, tok, valid, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
               PERMUTED: tl.constexpr, FROM_O: tl.constexpr):
    """Delta = rowsum(dO * O) of these query rows: with FROM_O computed from O here (one more
    tile load per program, where a separate pass reads O and dO again and launches once
    more); else read."""
    if FROM_O:
        o = _load_rows(_row_ptrs(Out, q_row0, first, tok, HEAD_DIM, HEAD_PAD, PERMUTED), valid, HEAD_DIM, HEAD_PAD)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = _load_delta(Delta, stats_row0, first, tok, valid, PERMUTED, HEAD_PAD)
    return delta


@triton.jit
def _dq_sum_if_last(Count, ScratchQ, item_merge, item, merge_start, merge_end, tile, b, B, dq_ptrs, valid_m,
                    M_TILES: tl.constexpr, BLOCK_M: tl.constexpr, ROW_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_PAD: tl.constexpr):
    """After a split row's dQ partial is written: the last of its items sums them and stores dQ."""
    last, s0, s1 = _arrive(Count, tl.load(item_merge + item), tile, M_TILES, b, B, merge_start, merge_end)
    if last:
        dq = _sum_partials(ScratchQ, s0, s1, b, B, tile * BLOCK_M, BLOCK_M, ROW_BLOCK, HEAD_PAD)
        _store_rows(dq_ptrs, dq.to(dq_ptrs.dtype.element_ty), valid_m, HEAD_DIM, HEAD_PAD)


@triton.jit
def _dq_step(q, do, lse, delta, dq, K, V, Kd, Vd, kv_row0, kv_bh, n_first, flags, at_m, sub_row, head, dil, seg,
             tables, qk_scale, SEQ_LEN, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
             STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr, CLASS_GAP: tl.constexpr):
    """dQ contribution of keys n_first .. n_first + BLOCK_N (FULL: no mask; see the module notes;
    ``at_m``: the rows as the predicate reads them, see _mask_coords)."""
    tok_n, valid_n = _walked_tokens(n_first, BLOCK_N, dil, seg, SEQ_LEN, PERMUTED, HEAD_PAD)
    k = _walked_tile(K, Kd, kv_row0, kv_bh, n_first, tok_n, valid_n, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                     PERMUTED, USE_TMA)
    v = _walked_tile(V, Vd, kv_row0, kv_bh, n_first, tok_n, valid_n, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                     PERMUTED, USE_TMA)
    qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if (flags & 1) == 0:
        allowed = _walked_mask(at_m, n_first, tok_n, head, flags, seg, SEQ_LEN, tables, BLOCK_N, CLASS_GAP)
        if STACKED:
            allowed = allowed | (((flags >> (1 + sub_row)) & 1) != 0)[:, None]
        p = tl.where(allowed, p, 0.0)
    dp = _mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    return _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
