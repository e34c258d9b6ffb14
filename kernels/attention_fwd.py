"""Template: block-sparse attention forward (FlashAttention-2 online softmax).

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, which defines ``token_mask`` (the pattern's predicate) and
``class_mask`` (the same on class coordinates, see common.py _mask_coords) first.

Work decomposition (built by patterncc/lowering.py). A *row* of the kernel plan is
ROW_BLOCK query positions of one head: one layout block, or several stacked (a 128-row
tile over a 64-token layout, so K/V tiles are loaded once per 128 queries). Its entries
list the key blocks any of its layout blocks touches, with a flag word: bit 0 FULL for
the whole row (every pair allowed: no predicate); when a row stacks several layout
blocks, bit ``1 + j`` says layout block j of the row is FULL on that entry, otherwise bits
1.. are the pattern's random terms; bit 30 says the key block holds positions that are
not tokens (the sequence tail, an empty residue slot). The grid is (work items x query
sub-tiles, batch). A work item is a run of at most ``split`` entries of one row: ordinary
rows are one item, which writes the normalised output and the log-sum-exp directly
(``slot < 0``); heavy rows (a global query attending every key block) are cut into
several items that each write an unnormalised partial (acc, m, l) to a scratch slot, and
the last of them to finish merges all of them by log-sum-exp. So no program walks much
more than ``split`` blocks, and the forward is one launch whatever the pattern. With
THIN_ROWS, an item may be *thin* (``item_thin`` >= 0): its entries are key blocks that only
a few global queries of the row attend, so it walks them with the 16 rows holding those
queries, and its partial leaves the row's other positions empty; with PAIR_THIN it folds two
key tiles per online-softmax step.

Softmax runs in base 2: scores are multiplied by ``qk_scale = scale * log2(e)`` so that
exp2 can be used, and LSE is stored in those units (log2-sum-exp2 of the scaled scores).
Rows that no key reaches keep l == 0: their output is 0 and their LSE is +inf, which
makes every backward probability exp2(s - LSE) exactly 0 for them.
"""
import triton
import triton.language as tl

# The generated module's header sets this (codegen.PEEL_THIN_COLUMN).
PEEL_THIN_COLUMN = tl.constexpr(True)

# @template-begin


@triton.jit(do_not_specialize=["SEQ_LEN", "NR", "B", "H"])
def _attn_fwd(
    Q, K, V, Out, Lse,                       # [B, H, T, D], [B, H_KV, T, D] x2, [B, H, T, D], [B, H, T] fp32
    Kd, Vd,                                  # TMA descriptors of K, V (USE_TMA; else K, V again)
    ScratchO, ScratchM, ScratchL, Count,     # split rows: [slots, B, ROW_BLOCK, HEAD_PAD] / [slots, B, ROW_BLOCK] fp32; int32 counters
    item_row, item_start, item_end, item_slot, item_merge,   # work items (int32)
    merge_start, merge_end,                  # per split row: its scratch slots
    item_nstart, item_nend,                  # per item: its narrow entries (thin global columns)
    kblock, entry_flags,                     # forward entries (int32)
    nblock, nflags,                          # narrow entries: 16-key sub-block, flags
    tables,                                  # int8 [n_tables, T] membership tables (global index sets)
    head_dil, head_seg,                      # per head: residue factor and class length (PERMUTED only)
    item_thin,                               # per item: its 16-row sub-block (thin-row items), else -1
    qk_scale,                                # softmax scale * log2(e)
    SEQ_LEN, NR, B, H, GROUP,                # tokens, plan rows per head, batch, query heads, H // H_KV
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NARROW: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, THIN_ROWS: tl.constexpr,
    TAIL: tl.constexpr, CLASS_GAP: tl.constexpr, PAIR_THIN: tl.constexpr,
):
    M_TILES: tl.constexpr = ROW_BLOCK // BLOCK_M
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    STACKED: tl.constexpr = ROW_BLOCK > LAYOUT_BLOCK
    b, item, tile, start, end, slot, head, dil, seg, m_first, q_row0, kv_bh, kv_row0 = _query_item(
        item_row, item_start, item_end, item_slot, head_dil, head_seg, SEQ_LEN, NR, H, GROUP, ROW_BLOCK, BLOCK_M,
        PERMUTED)
    tok_m, valid_m = _tokens(m_first, BLOCK_M, dil, seg, SEQ_LEN, PERMUTED)
    out_ptrs = _row_ptrs(Out, q_row0, m_first, tok_m, HEAD_DIM, HEAD_PAD, PERMUTED)
    thin = _thin_item(item_thin, item, THIN_ROWS)
    if thin >= 0:
        _thin_partial(Q, K, V, Kd, Vd, ScratchO, ScratchM, ScratchL, q_row0, kv_row0, kv_bh, m_first, thin, tile,
                      slot, b, B, start, end, kblock, entry_flags, head, dil, seg, tables, qk_scale, SEQ_LEN,
                      HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, ROW_BLOCK, BLOCK_M, BLOCK_N, NARROW, STACKED, PERMUTED,
                      USE_TMA, PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP, PAIR_THIN)
        _merge_if_last(Count, ScratchO, ScratchM, ScratchL, item_merge, item, merge_start, merge_end, tile, b, B,
                       out_ptrs, Lse + q_row0 + tok_m, valid_m, M_TILES, BLOCK_M, ROW_BLOCK, HEAD_DIM, HEAD_PAD)
    else:
        q = _load_rows(_row_ptrs(Q, q_row0, m_first, tok_m, HEAD_DIM, HEAD_PAD, PERMUTED), valid_m, HEAD_DIM, HEAD_PAD)
        at_m = _mask_coords(m_first, tok_m, BLOCK_M, seg, CLASS_GAP)  # what the predicate reads for the rows
        # Layout block of each query row inside a stacked row (its FULL bit is 1 + that).
        sub_row = (tile * BLOCK_M + tl.arange(0, BLOCK_M)) // LAYOUT_BLOCK

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        # Thin global key columns first: a few keys cost a 16-wide tile, not a whole block.
        n_lo = tl.load(item_nstart + item)
        n_hi = tl.load(item_nend + item)
        if PEEL_THIN_COLUMN:
            # The first step starts from the empty state: outside a loop the compiler drops the
            # rescale of a zero accumulator, and the steps left (rarely any) go unpipelined.
            if n_hi > n_lo:
                acc, m_i, l_i = _thin_column_step(q, acc, m_i, l_i, K, V, kv_row0, kv_bh, nblock, nflags, n_lo, at_m,
                                                  sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, NARROW,
                                                  HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, PRECISION, UPCAST,
                                                  FOLD_SCALE, TAIL, CLASS_GAP)
            n_lo += 1
        for e in tl.range(n_lo, n_hi, num_stages=1 if PEEL_THIN_COLUMN else None):
            acc, m_i, l_i = _thin_column_step(q, acc, m_i, l_i, K, V, kv_row0, kv_bh, nblock, nflags, e, at_m,
                                              sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, NARROW, HEAD_DIM,
                                              HEAD_PAD, STACKED, PERMUTED, PRECISION, UPCAST, FOLD_SCALE, TAIL,
                                              CLASS_GAP)
        acc, m_i, l_i = _walk_entries(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, start * N_TILES, end * N_TILES,
                                      kblock, entry_flags, at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN,
                                      HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, BLOCK_N, STACKED, PERMUTED, USE_TMA,
                                      PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
        if slot < 0:
            _finish_rows(out_ptrs, Lse + q_row0 + tok_m, acc, m_i, l_i, valid_m, HEAD_DIM, HEAD_PAD)
        else:
            # Part of a heavy row: keep the unnormalised partial; the last part merges them.
            r = tl.arange(0, BLOCK_M)
            s_row = (slot * B + b).to(tl.int64) * ROW_BLOCK + tile * BLOCK_M
            tl.store(_scratch_ptrs(ScratchO, slot, b, B, tile * BLOCK_M, BLOCK_M, ROW_BLOCK, HEAD_PAD), acc)
            tl.store(ScratchM + s_row + r, m_i)
            tl.store(ScratchL + s_row + r, l_i)
            _merge_if_last(Count, ScratchO, ScratchM, ScratchL, item_merge, item, merge_start, merge_end, tile, b,
                           B, out_ptrs, Lse + q_row0 + tok_m, valid_m, M_TILES, BLOCK_M, ROW_BLOCK, HEAD_DIM,
                           HEAD_PAD)


@triton.jit
def _merge_if_last(Count, ScratchO, ScratchM, ScratchL, item_merge, item, merge_start, merge_end, tile, b, B,
                   out_ptrs, lse_ptrs, valid_m, M_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                   ROW_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """After a split row's partial is written: the last of its items to arrive merges all
    of them and writes the row's output and LSE."""
    last, s0, s1 = _arrive(Count, tl.load(item_merge + item), tile, M_TILES, b, B, merge_start, merge_end)
    if last:
        acc, m_i, l_i = _merge_partials(ScratchO, ScratchM, ScratchL, s0, s1, b, B, tile * BLOCK_M,
                                        BLOCK_M, ROW_BLOCK, HEAD_PAD)
        _finish_rows(out_ptrs, lse_ptrs, acc, m_i, l_i, valid_m, HEAD_DIM, HEAD_PAD)


@triton.jit
def _walk_entries(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, it_start, it_end, kblock, entry_flags, at_m,
                  sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, HEAD_DIM: tl.constexpr,
                  HEAD_PAD: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, STACKED: tl.constexpr,
                  PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr, CLASS_GAP: tl.constexpr):
    """Key tiles it_start .. it_end - 1 of a row folded into (acc, m, l): one flat loop over
    (entry, key sub-tile), tile ``it`` being sub-tile it % N_TILES of entry it // N_TILES, so
    a 128-token layout block is two 64-key tiles."""
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for it in range(it_start, it_end):
        e = it // N_TILES
        n_first = tl.load(kblock + e) * LAYOUT_BLOCK + (it % N_TILES) * BLOCK_N
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, n_first, tl.load(entry_flags + e),
                                at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, BLOCK_N,
                                HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA, PRECISION, UPCAST, FOLD_SCALE, TAIL,
                                CLASS_GAP)
    return acc, m_i, l_i


@triton.jit
def _walk_pairs(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, it_start, it_end, kblock, entry_flags, at_m,
                sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, STACKED: tl.constexpr, PERMUTED: tl.constexpr,
                USE_TMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr,
                TAIL: tl.constexpr, CLASS_GAP: tl.constexpr):
    """_walk_entries two key tiles per softmax step (_attend_pair), an odd last one alone."""
    N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    for it in range(it_start, it_end - 1, 2):
        e_a = it // N_TILES
        e_b = (it + 1) // N_TILES
        acc, m_i, l_i = _attend_pair(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh,
                                     tl.load(kblock + e_a) * LAYOUT_BLOCK + (it % N_TILES) * BLOCK_N,
                                     tl.load(entry_flags + e_a),
                                     tl.load(kblock + e_b) * LAYOUT_BLOCK + ((it + 1) % N_TILES) * BLOCK_N,
                                     tl.load(entry_flags + e_b), at_m, sub_row, head, dil, seg, tables, qk_scale,
                                     SEQ_LEN, BLOCK_N, HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA, PRECISION,
                                     UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
    if (it_end - it_start) % 2 == 1:
        acc, m_i, l_i = _walk_entries(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, it_end - 1, it_end, kblock,
                                      entry_flags, at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN,
                                      HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, BLOCK_N, STACKED, PERMUTED, USE_TMA,
                                      PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
    return acc, m_i, l_i


@triton.jit
def _thin_partial(Q, K, V, Kd, Vd, ScratchO, ScratchM, ScratchL, q_row0, kv_row0, kv_bh, m_first, thin, tile, slot,
                  b, B, start, end, kblock, entry_flags, head, dil, seg, tables, qk_scale, SEQ_LEN,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                  ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
                  STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr, CLASS_GAP: tl.constexpr,
                  PAIR_THIN: tl.constexpr):
    """A thin-row item's partial for this program's tile of the row: the NARROW rows of
    sub-block ``thin`` against its entries (only global queries attend them, so a 64-row
    tile would compute 48 or more masked rows), and empty (m = -inf, l = 0, acc = 0) for the
    tile's other rows, which the merge then ignores."""
    local, others = _thin_rows_in_tile(thin, tile, BLOCK_M, NARROW)
    r = tl.arange(0, BLOCK_M)
    s_row = (slot * B + b).to(tl.int64) * ROW_BLOCK + tile * BLOCK_M
    tl.store(ScratchM + s_row + r, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=others)
    tl.store(ScratchL + s_row + r, tl.zeros([BLOCK_M], tl.float32), mask=others)
    tl.store(_scratch_ptrs(ScratchO, slot, b, B, tile * BLOCK_M, BLOCK_M, ROW_BLOCK, HEAD_PAD),
             tl.zeros([BLOCK_M, HEAD_PAD], tl.float32), mask=others[:, None])
    if (local >= 0) & (local < BLOCK_M):
        t_first, tok_t, valid_t, q = _thin_tile_rows(Q, q_row0, m_first, local, dil, seg, SEQ_LEN, NARROW, HEAD_DIM,
                                                      HEAD_PAD, PERMUTED)
        m_i = tl.full([NARROW], float("-inf"), tl.float32)
        l_i = tl.zeros([NARROW], tl.float32)
        acc = tl.zeros([NARROW, HEAD_PAD], tl.float32)
        N_TILES: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
        at_t = _mask_coords(t_first, tok_t, NARROW, seg, CLASS_GAP)
        sub_t = tl.zeros([NARROW], tl.int32)
        if PAIR_THIN:  # 16-row tiles have registers to spare for two key tiles a step
            acc, m_i, l_i = _walk_pairs(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, start * N_TILES,
                                        end * N_TILES, kblock, entry_flags, at_t, sub_t, head, dil, seg, tables,
                                        qk_scale, SEQ_LEN, HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, BLOCK_N, STACKED,
                                        PERMUTED, USE_TMA, PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
        else:
            acc, m_i, l_i = _walk_entries(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, start * N_TILES,
                                          end * N_TILES, kblock, entry_flags, at_t, sub_t, head, dil, seg, tables,
                                          qk_scale, SEQ_LEN, HEAD_DIM, HEAD_PAD, LAYOUT_BLOCK, BLOCK_N, STACKED,
                                          PERMUTED, USE_TMA, PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
        r16 = tl.arange(0, NARROW)
        tl.store(_scratch_ptrs(ScratchO, slot, b, B, tile * BLOCK_M + local, NARROW, ROW_BLOCK, HEAD_PAD), acc)
        tl.store(ScratchM + s_row + local + r16, m_i)
        tl.store(ScratchL + s_row + local + r16, l_i)


@triton.jit
def _thin_column_step(q, acc, m_i, l_i, K, V, kv_row0, kv_bh, nblock, nflags, e, at_m, sub_row, head, dil, seg,
                      tables, qk_scale, SEQ_LEN, NARROW: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_PAD: tl.constexpr, STACKED: tl.constexpr, PERMUTED: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr,
                      CLASS_GAP: tl.constexpr):
    """The online-softmax step of narrow entry ``e``: its 16-key sub-block of a thin column,
    loaded by pointers (no TMA)."""
    return _attend(q, acc, m_i, l_i, K, V, K, V, kv_row0, kv_bh, tl.load(nblock + e) * NARROW, tl.load(nflags + e),
                   at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, NARROW, HEAD_DIM, HEAD_PAD, STACKED,
                   PERMUTED, False, PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)


@triton.jit
def _attend(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, n_first, flags, at_m, sub_row, head, dil, seg,
            tables, qk_scale, SEQ_LEN, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
            STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr, CLASS_GAP: tl.constexpr):
    """One step of the online softmax: fold keys n_first .. n_first + BLOCK_N into (acc, m, l).
    ``at_m``: the rows as the predicate reads them (_mask_coords: tokens, or class coordinates).

    FOLD_SCALE (qk_scale > 0): the scores stay unscaled until exp2, whose argument
    qk * qk_scale - m is one FFMA per score; the row max is taken unscaled and scaled once
    (max commutes with a positive factor). Else the scores are scaled first (and the later
    factor is 1)."""
    qk, tok_n, valid_n = _scores(q, K, Kd, kv_row0, kv_bh, n_first, flags, at_m, sub_row, head, dil, seg, tables,
                                 qk_scale, SEQ_LEN, BLOCK_N, HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA,
                                 PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
    late_scale = _late_scale(qk_scale, FOLD_SCALE)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * late_scale)
    # A row that has seen no allowed key yet keeps m = -inf: subtract 0 instead,
    # so p and alpha are exp2(-inf) = 0 and never NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * late_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _walked_tile(V, Vd, kv_row0, kv_bh, n_first, tok_n, valid_n, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                     PERMUTED, USE_TMA)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attend_pair(q, acc, m_i, l_i, K, V, Kd, Vd, kv_row0, kv_bh, a_first, a_flags, b_first, b_flags, at_m,
                 sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_PAD: tl.constexpr, STACKED: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr,
                 CLASS_GAP: tl.constexpr):
    """_attend over two key tiles (from a_first and from b_first) in one online-softmax step:
    one row max and one rescale of acc and l for both. For 16-row tiles, whose steps are
    short chains of waits (mma.sync through shared memory) more than products."""
    qk_a, tok_a, valid_a = _scores(q, K, Kd, kv_row0, kv_bh, a_first, a_flags, at_m, sub_row, head, dil, seg,
                                   tables, qk_scale, SEQ_LEN, BLOCK_N, HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA,
                                   PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
    qk_b, tok_b, valid_b = _scores(q, K, Kd, kv_row0, kv_bh, b_first, b_flags, at_m, sub_row, head, dil, seg,
                                   tables, qk_scale, SEQ_LEN, BLOCK_N, HEAD_DIM, HEAD_PAD, STACKED, PERMUTED, USE_TMA,
                                   PRECISION, UPCAST, FOLD_SCALE, TAIL, CLASS_GAP)
    late_scale = _late_scale(qk_scale, FOLD_SCALE)
    m_new = tl.maximum(m_i, tl.maximum(tl.max(qk_a, 1), tl.max(qk_b, 1)) * late_scale)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p_a = tl.math.exp2(qk_a * late_scale - m_sub[:, None])
    p_b = tl.math.exp2(qk_b * late_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
    v_a = _walked_tile(V, Vd, kv_row0, kv_bh, a_first, tok_a, valid_a, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                       PERMUTED, USE_TMA)
    v_b = _walked_tile(V, Vd, kv_row0, kv_bh, b_first, tok_b, valid_b, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                       PERMUTED, USE_TMA)
    acc = _mma(p_a.to(v_a.dtype), v_a, acc * alpha[:, None], PRECISION, UPCAST)
    acc = _mma(p_b.to(v_b.dtype), v_b, acc, PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _late_scale(qk_scale, FOLD_SCALE: tl.constexpr):
    """The factor exp2's argument applies to _scores' output: qk_scale if they are unscaled."""
    if FOLD_SCALE:
        return qk_scale
    else:
        return 1.0


@triton.jit
def _scores(q, K, Kd, kv_row0, kv_bh, n_first, flags, at_m, sub_row, head, dil, seg, tables, qk_scale, SEQ_LEN,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, STACKED: tl.constexpr,
            PERMUTED: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            FOLD_SCALE: tl.constexpr, TAIL: tl.constexpr, CLASS_GAP: tl.constexpr):
    """The masked scores of keys n_first .. n_first + BLOCK_N (-inf where a pair is not
    allowed; scaled unless FOLD_SCALE) and the keys' tokens and validity, for their V tile."""
    tok_n, valid_n = _walked_tokens(n_first, BLOCK_N, dil, seg, SEQ_LEN, PERMUTED, HEAD_PAD)
    k = _walked_tile(K, Kd, kv_row0, kv_bh, n_first, tok_n, valid_n, seg, BLOCK_N, HEAD_DIM, HEAD_PAD,
                     PERMUTED, USE_TMA)
    qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST)
    if not FOLD_SCALE:
        qk = qk * qk_scale
    # A FULL entry (every pair allowed) needs no mask unless its block holds positions that
    # are not tokens (the sequence tail, an empty residue slot: flag bit 30). One `if`, one
    # `where`, no branch inside: an if/else that each rewrite qk made Triton 3.6 compute exp2
    # twice per element (run 4), and a mask chosen by a nested if/else is carried across the
    # branches as packed predicate bits (~250 more instructions per masked tile, sm_90
    # SASS). A FULL tail block evaluates the predicate too (rare) and ORs its FULL bit in.
    # Without TAIL (a walk with no tail entry) the predicate is applied alone: the tail test
    # and the FULL bit cost a masked tile more instructions than the predicate itself.
    masked = (flags & 1) == 0
    if TAIL:
        masked = masked | ((flags & (1 << 30)) != 0)
    if masked:
        allowed = _walked_mask(at_m, n_first, tok_n, head, flags, seg, SEQ_LEN, tables, BLOCK_N, CLASS_GAP)
        if TAIL:
            allowed = allowed | ((flags & 1) != 0)
        if STACKED:
            allowed = allowed | (((flags >> (1 + sub_row)) & 1) != 0)[:, None]
        if TAIL:
            allowed = allowed & valid_n[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
    return qk, tok_n, valid_n


@triton.jit
def _finish_rows(out_ptrs, lse_ptrs, acc, m_i, l_i, valid, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Normalise and store one tile of output rows and their LSE; empty rows give 0 / +inf."""
    empty = l_i == 0.0
    # 0, not 0 * NaN: a row that attends nothing ignores non-finite values in its tiles.
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    _store_rows(out_ptrs, out.to(out_ptrs.dtype.element_ty), valid, HEAD_DIM, HEAD_PAD)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptrs, lse, mask=valid)


@triton.jit
def _merge_partials(ScratchO, ScratchM, ScratchL, s0, s1, b, B, row_offset, ROWS: tl.constexpr,
                    ROW_BLOCK: tl.constexpr, HEAD_PAD: tl.constexpr):
    """(acc, m, l) of a split row from its partials in slots s0 .. s1 - 1, by log-sum-exp."""
    r = tl.arange(0, ROWS)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    for s in range(s0, s1):
        s_row = (s * B + b).to(tl.int64) * ROW_BLOCK + row_offset
        m_s = tl.load(ScratchM + s_row + r, cache_modifier=".cg")
        l_s = tl.load(ScratchL + s_row + r, cache_modifier=".cg")
        o_s = tl.load(_scratch_ptrs(ScratchO, s, b, B, row_offset, ROWS, ROW_BLOCK, HEAD_PAD), cache_modifier=".cg")
        m_new = tl.maximum(m_i, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        beta = tl.math.exp2(m_s - m_sub)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m_i = m_new
    return acc, m_i, l_i
