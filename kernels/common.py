"""Template: helpers shared by patterncc's attention kernels.

Not imported on its own: patterncc/codegen.py pastes everything below the template marker
into each generated module, after the pattern's token predicate. Tiles are [rows, HEAD_PAD]
slices of a contiguous [B, H, T, D] tensor; HEAD_PAD is D rounded up to a power of two
(at least 16, the smallest tl.dot), and the padding columns read as 0 and are never stored.
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
def _load_rows(base, first, offs, SEQ_LEN, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, other):
    """Rows ``offs`` (token positions starting at ``first``) of one head: [len(offs), HEAD_PAD].

    ``base`` already points at row ``first`` (int64 arithmetic done by the caller), so the
    in-tile offsets stay small int32. Rows past the sequence end and padding columns read 0.
    """
    cols = tl.arange(0, HEAD_PAD)
    ptrs = base + (offs - first)[:, None] * HEAD_DIM + cols[None, :]
    if HEAD_DIM == HEAD_PAD:
        x = tl.load(ptrs, mask=(offs < SEQ_LEN)[:, None], other=other)
    else:
        x = tl.load(ptrs, mask=(offs < SEQ_LEN)[:, None] & (cols < HEAD_DIM)[None, :], other=other)
    return x


@triton.jit
def _store_rows(base, first, offs, x, SEQ_LEN, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Store ``x`` [len(offs), HEAD_PAD] into rows ``offs`` of one head (inverse of _load_rows)."""
    cols = tl.arange(0, HEAD_PAD)
    ptrs = base + (offs - first)[:, None] * HEAD_DIM + cols[None, :]
    if HEAD_DIM == HEAD_PAD:
        tl.store(ptrs, x, mask=(offs < SEQ_LEN)[:, None])
    else:
        tl.store(ptrs, x, mask=(offs < SEQ_LEN)[:, None] & (cols < HEAD_DIM)[None, :])
