"""Template: helpers shared by patterncc's attention kernels.

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, after the pattern's token predicate and its class form. Tiles
are [rows, HEAD_PAD] slices of a contiguous [B, H, T, D] tensor; HEAD_PAD is D rounded up to
a power of two (at least 16, the smallest tl.dot), and the padding columns read as 0 and are
never stored.

Kernel positions and tokens. The kernels walk the layout in *kernel order*: normally
position p is token p. With ``PERMUTED`` a head may run in *residue order* (patterncc's
lowering does this for dilated windows): with factor ``dil`` and class length ``seg``,
positions c * seg .. c * seg + seg - 1 hold the tokens t = c (mod dil) in increasing
order, so a dilated window becomes a plain band of FULL blocks. Every load and store goes
through the token of its position; outputs, LSE and gradients stay in token order (only the
backward's own Delta and its copy of the LSE are kept by position: attention_bwd.py).
``PERMUTED`` is 0 (token order), 1 (residue order, every class at least as long as any
tile and (T + 1) * HEAD_DIM below 2^31: division-free tokens, int32 in-head row offsets)
or 2 (residue order, general: short classes or huge heads).
"""
import triton
import triton.language as tl

# @template-begin


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32.

    PRECISION is "ieee" for fp32 inputs (exact fp32 products, no TF32 rounding) and "tf32"
    otherwise (ignored for fp16/bf16). UPCAST is only set under the CPU interpreter
    (TRITON_INTERPRET=1), whose bf16 tl.dot is wrong: there the tiles are upcast first.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _work_item(item_row, item_start, item_end, item_slot, TILES: tl.constexpr):
    """This program's batch, work item and tile of the item's row (TILES programs per item
    on grid axis 0), then the item's row, first entry, one past its last, and scratch slot
    (or -1)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    item = pid // TILES
    tile = pid % TILES
    return (b, item, tile, tl.load(item_row + item), tl.load(item_start + item), tl.load(item_end + item),
            tl.load(item_slot + item))


@triton.jit
def _query_item(item_row, item_start, item_end, item_slot, head_dil, head_seg, SEQ_LEN, NR, H, GROUP,
                ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, PERMUTED: tl.constexpr):
    """Who this program is in a pass over query rows (forward, dQ): its batch, work item and
    BLOCK_M tile of the item's row; the item's entries and scratch slot; the row's head and
    its kernel order; the tile's first (kernel-order) position; and the int64 offsets of the
    head's query rows and of its kv head's key rows."""
    b, item, tile, row, start, end, slot = _work_item(item_row, item_start, item_end, item_slot,
                                                      ROW_BLOCK // BLOCK_M)
    head = row // NR
    dil, seg = _head_order(head_dil, head_seg, head, SEQ_LEN, PERMUTED)
    m_first = (row % NR) * ROW_BLOCK + tile * BLOCK_M
    q_row0 = (b * H + head).to(tl.int64) * SEQ_LEN
    kv_bh = b * (H // GROUP) + head // GROUP
    kv_row0 = kv_bh.to(tl.int64) * SEQ_LEN
    return b, item, tile, start, end, slot, head, dil, seg, m_first, q_row0, kv_bh, kv_row0


@triton.jit
def _key_item(item_row, item_start, item_end, item_slot, head_dil, head_seg, SEQ_LEN, NR, H, GROUP,
              ROW_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr):
    """Who this program is in the pass over key rows (dK/dV): _query_item's counterpart, for a
    BLOCK_N tile of a kv head's key row, with the tile's tokens (original positions) and which
    of them exist. The query heads of one kv head share its kernel order
    (the lowering sees to that), so the order is read from the group's first query head."""
    b, item, tile, row, start, end, slot = _work_item(item_row, item_start, item_end, item_slot,
                                                      ROW_BLOCK // BLOCK_N)
    kv_head = row // NR
    dil, seg = _head_order(head_dil, head_seg, kv_head * GROUP, SEQ_LEN, PERMUTED)
    n_first = (row % NR) * ROW_BLOCK + tile * BLOCK_N
    tok_n, valid_n = _tokens(n_first, BLOCK_N, dil, seg, SEQ_LEN, PERMUTED)
    kv_row0 = (b * (H // GROUP) + kv_head).to(tl.int64) * SEQ_LEN
    return b, item, tile, start, end, slot, dil, seg, n_first, tok_n, valid_n, kv_row0


@triton.jit
def _thin_item(item_thin, item, THIN: tl.constexpr):
    """The 16-position sub-block a thin item owns (of its query row in the forward and dQ, of
    its key row in dK/dV), else -1; always -1 without the flag (THIN_ROWS, THIN_KEYS), so
    the caller's thin branch folds away at compile time."""
    if THIN:
        return tl.load(item_thin + item)
    else:
        return -1


@triton.jit
def _thin_rows_in_tile(thin, tile, BLOCK_M: tl.constexpr, NARROW: tl.constexpr):
    """Where a thin-row item's NARROW rows (sub-block ``thin`` of its row) fall in this
    program's tile: their first row within the tile (it may lie outside the tile), and the
    tile's other rows, whose partial the item leaves empty."""
    local = thin * NARROW - tile * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    return local, (r < local) | (r >= local + NARROW)


@triton.jit
def _thin_tile_rows(X, row0, first, local, dil, seg, SEQ_LEN, NARROW: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_PAD: tl.constexpr, PERMUTED: tl.constexpr):
    """The NARROW rows a thin item owns (``local`` rows into its tile from ``first``): their
    first position, tokens, which exist, and their tile of X (Q in the forward and dQ, K in
    dK/dV)."""
    t_first = first + local
    tok_t, valid_t = _tokens(t_first, NARROW, dil, seg, SEQ_LEN, PERMUTED)
    x = _load_rows(_row_ptrs(X, row0, t_first, tok_t, HEAD_DIM, HEAD_PAD, PERMUTED), valid_t, HEAD_DIM, HEAD_PAD)
    return t_first, tok_t, valid_t, x


@triton.jit
def _head_order(head_dil, head_seg, head, SEQ_LEN, PERMUTED: tl.constexpr):
    """(dil, seg) of one head: its residue factor and class length (1, SEQ_LEN in token order)."""
    if PERMUTED:
        dil = tl.load(head_dil + head)
        seg = tl.load(head_seg + head)
    else:
        dil = 1
        seg = SEQ_LEN
    return dil, seg


@triton.jit
def _class_of(first, seg):
    """The class first // seg of residue-order position ``first`` (classes ``seg`` long), once
    per walked tile. An integer division by a value known only at run time is ~20 sm_90
    instructions; a float estimate by the reciprocal (which the compiler hoists out of the
    walk) and one correction step are ~7 (the dilated forward's FULL tile 355 -> 342). Exact
    while first / seg < 2**21 (its relative error is a few 2**-24, so the estimate is off by
    at most one); positions are below d * seg, so lowering.MAX_RESIDUE_FACTOR bounds it."""
    c = (first.to(tl.float32) * (1.0 / seg.to(tl.float32))).to(tl.int32)
    r = first - c * seg
    return tl.where(r < 0, c - 1, tl.where(r >= seg, c + 1, c))


@triton.jit
def _tokens(first, BLOCK: tl.constexpr, dil, seg, SEQ_LEN, PERMUTED: tl.constexpr):
    """Tokens at kernel positions first .. first + BLOCK - 1, and which of them exist.

    A position past the sequence (or an empty slot of a short residue class) is not a
    token: ``valid`` is False there, and its token reads as SEQ_LEN or more.
    """
    offs = first + tl.arange(0, BLOCK)
    if PERMUTED == 1:
        # Position p holds token (p mod seg) * dil + p // seg. A vector integer division is
        # tens of instructions per element on every walked tile, so divide the tile's first
        # position only: with classes at least a tile long, a tile spans at most two.
        c0 = _class_of(first, seg)
        i = offs - c0 * seg
        nxt = i >= seg
        tok = tl.where(nxt, i - seg, i) * dil + c0 + nxt.to(tl.int32)
    elif PERMUTED:
        tok = (offs % seg) * dil + offs // seg
    if PERMUTED:
        valid = (offs < dil * seg) & (tok < SEQ_LEN)
        tok = tl.where(valid, tok, SEQ_LEN)
    else:
        tok = offs
        valid = offs < SEQ_LEN
    return tok, valid


@triton.jit
def _walked_tokens(first, BLOCK: tl.constexpr, dil, seg, SEQ_LEN, PERMUTED: tl.constexpr,
                   HEAD_PAD: tl.constexpr):
    """_tokens of a walked tile (K/V in the forward and dQ, Q/dO in dK/dV: at most a layout
    block, inside one). Up to AFFINE_MAX_HEAD_PAD (codegen.AFFINE_TOKENS_MAX_HEAD_PAD): the
    lowering pads residue classes to whole layout blocks, so the tile lies in one class c,
    and its tokens (first - c * seg + j) * d + c are affine in j, with no per-element class
    test (dK/dV's FULL tile, which needs the tokens of its Q, dO, LSE and Delta loads, is 18%
    shorter). Wider heads keep the general form: there dK/dV already spills registers, and
    with the affine form ptxas spilled more and the kernel ran slower (bench/RESULTS.md)."""
    if PERMUTED and HEAD_PAD <= AFFINE_MAX_HEAD_PAD:
        c = _class_of(first, seg)
        tok = (first - c * seg) * dil + c + tl.arange(0, BLOCK) * dil
        valid = tok < SEQ_LEN  # the empty slots at a class's end
        return tl.where(valid, tok, SEQ_LEN), valid
    else:
        return _tokens(first, BLOCK, dil, seg, SEQ_LEN, PERMUTED)


@triton.jit
def _mask_coords(first, tok, BLOCK: tl.constexpr, seg, CLASS_GAP: tl.constexpr):
    """What the predicate reads for positions first .. first + BLOCK - 1 (a program's own
    rows, computed once): their tokens ``tok``; or with CLASS_GAP (a residue-order launch,
    patterncc.codegen.class_forms) the class coordinates u = p + (p // seg) * CLASS_GAP, on
    which one class's pairs differ as their class indices do and two classes' pairs are
    more than CLASS_GAP apart. A PARTIAL tile then tests a band of u, as a token-order
    window tests a band of tokens, instead of a dilated window's token arithmetic."""
    if CLASS_GAP > 0:
        offs = first + tl.arange(0, BLOCK)
        return offs + (offs // seg) * CLASS_GAP
    else:
        return tok


@triton.jit
def _walked_mask(at_m, first, tok, head, flags, seg, SEQ_LEN, tables, BLOCK: tl.constexpr,
                 CLASS_GAP: tl.constexpr):
    """The predicate of a PARTIAL tile [rows, walked keys] (forward, dQ): the program's rows
    (``at_m``, from _mask_coords) against the keys first .. first + BLOCK - 1 (tokens ``tok``).
    dK/dV tests tokens (token_mask_t) whatever CLASS_GAP: Triton 3.6 miscompiles the
    transposed class band there (in its PTX, odd query columns take the lower bound of the
    even column beside them; bench/RESULTS.md, seventeenth session), Triton 3.9 does not."""
    if CLASS_GAP > 0:
        # A walked tile never spans two classes (they are padded to the layout block): one
        # class per tile, the one its TMA coordinates take too.
        at_n = first + _class_of(first, seg) * CLASS_GAP + tl.arange(0, BLOCK)
        return class_mask(at_m, at_n, head, flags, SEQ_LEN, tables)
    else:
        return token_mask(at_m, tok, head, flags, SEQ_LEN, tables)


@triton.jit
def _row_ptrs(base, head_row0, first, tok, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
              PERMUTED: tl.constexpr):
    """[len(tok), HEAD_PAD] pointers to rows ``tok`` of one head (row 0 at int64 ``head_row0``).

    In token order the tile is contiguous: an int64 scalar base at its first row and small
    int32 in-tile offsets (b * H * T * D can pass 2^31). In residue order rows are strided
    or scattered: an int64 base at the head's row 0 and int32 offsets within the head
    (PERMUTED 1: the host checked (T + 1) * HEAD_DIM < 2^31), else int64 row offsets.
    """
    cols = tl.arange(0, HEAD_PAD)
    if PERMUTED == 1:
        return base + head_row0 * HEAD_DIM + (tok * HEAD_DIM)[:, None] + cols[None, :]
    elif PERMUTED:
        rows = (head_row0 + tok.to(tl.int64)) * HEAD_DIM
        return base + rows[:, None] + cols[None, :]
    else:
        return base + (head_row0 + first) * HEAD_DIM + ((tok - first) * HEAD_DIM)[:, None] + cols[None, :]


@triton.jit
def _load_rows(ptrs, valid, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Load a [rows, HEAD_PAD] tile; rows that are not tokens and padding columns read 0."""
    if HEAD_DIM == HEAD_PAD:
        x = tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        cols = tl.arange(0, HEAD_PAD)
        x = tl.load(ptrs, mask=valid[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _walked_tile(X, Xd, row0, bh, first, tok, valid, seg, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_PAD: tl.constexpr, PERMUTED: tl.constexpr, USE_TMA: tl.constexpr):
    """A [BLOCK, HEAD_PAD] tile of the walked axis (K/V in the forward and dQ, Q/dO in dK/dV).

    With USE_TMA the Hopper copy engine fetches it through the tensor descriptor ``Xd``: no
    pointer tensor held in registers, rows past T and padding columns filled with 0 by the
    hardware. In token order ``Xd`` is [B * heads, T, D]; in residue order (the host allows
    it only with one residue factor d for all heads, d dividing T, and tiles inside one
    class) it is the [B * heads, T / d, d, D] view, where class c = first // seg is column
    c and its rows are strided by d. Otherwise by pointers.
    """
    if USE_TMA:
        if PERMUTED:
            c = _class_of(first, seg)
            x = Xd.load([bh, first - c * seg, c, 0]).reshape(BLOCK, HEAD_PAD)
        else:
            x = Xd.load([bh, first, 0]).reshape(BLOCK, HEAD_PAD)
    else:
        x = _load_rows(_row_ptrs(X, row0, first, tok, HEAD_DIM, HEAD_PAD, PERMUTED), valid, HEAD_DIM, HEAD_PAD)
    return x


@triton.jit
def _store_rows(ptrs, x, valid, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Store a [rows, HEAD_PAD] tile (inverse of _load_rows)."""
    if HEAD_DIM == HEAD_PAD:
        tl.store(ptrs, x, mask=valid[:, None])
    else:
        cols = tl.arange(0, HEAD_PAD)
        tl.store(ptrs, x, mask=valid[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _scratch_ptrs(Scratch, slot, b, B, row_offset, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                  HEAD_PAD: tl.constexpr):
    """Pointers to one partial tile [ROWS, HEAD_PAD] of a split row: Scratch[slot, b, row_offset:]."""
    s_row = (slot * B + b).to(tl.int64) * ROW_BLOCK + row_offset
    r = tl.arange(0, ROWS)
    c = tl.arange(0, HEAD_PAD)
    return Scratch + (s_row + r)[:, None] * HEAD_PAD + c[None, :]


@triton.jit
def _arrive(Count, merged, tile, TILES: tl.constexpr, b, B, merge_start, merge_end):
    """Count this program's partial of split row ``merged`` as written; True for the last.

    The barrier makes every thread's partial stores happen before the release of the
    atomic; the last program to arrive (acquire) then reads all partials and resets the
    counter for the next call (CUDA-graph replays included). Which program arrives last
    varies; the order the partials are summed in does not, so results are deterministic.
    """
    s0 = tl.load(merge_start + merged)
    s1 = tl.load(merge_end + merged)
    idx = (merged * TILES + tile) * B + b
    tl.debug_barrier()
    arrived = tl.atomic_add(Count + idx, 1, sem="acq_rel")
    last = arrived == s1 - s0 - 1
    if last:
        tl.store(Count + idx, 0)
    return last, s0, s1


@triton.jit
def _sum_partials(Scratch, s0, s1, b, B, row_offset, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                  HEAD_PAD: tl.constexpr):
    """Sum of the fp32 partials in slots s0 .. s1 - 1 (read past L1: other SMs wrote them)."""
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    for s in range(s0, s1):
        acc += tl.load(_scratch_ptrs(Scratch, s, b, B, row_offset, ROWS, ROW_BLOCK, HEAD_PAD),
                       cache_modifier=".cg")
    return acc
