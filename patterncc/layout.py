"""Layout: the block-sparse structure of a pattern for one (seq_len, heads, block size).

For every head and query block the layout lists the key blocks it touches, each FULL
(every pair inside the sequence allowed, no mask needed) or PARTIAL (the token predicate
must be evaluated), as a CSR index over rows ``head * nblocks + query_block``, plus the
transposed index (rows ``head * nblocks + key_block``) for the backward pass.

It is built from each primitive's analytic block footprint (``ir``), never from a T x T
array, so memory grows with the touched blocks. ``get_layout`` caches layouts in an LRU
keyed by (pattern, seq_len, heads, block size), bounded in entries and in bytes (a layout
counts its arrays and everything memoised on it: token masks, kernel plans on the device).

Example:
    >>> from patterncc import parse
    >>> from patterncc.layout import get_layout
    >>> lay = get_layout(parse("window(256) | global([0])"), seq_len=4096, num_heads=2, block_size=64)
    >>> lay.nnz, round(lay.block_density, 4)
    (1348, 0.1646)
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import ir
from .ir import FULL, PARTIAL, Ctx

MAX_SEQ_LEN = 2 ** 31 - 1
MASK_LIMIT = 16384  # largest T for which mask() builds a dense [H, T, T] array


@dataclass(frozen=True)
class HeadLayout:
    """Blocks of one distinct head behaviour, sorted by (query block, key block)."""

    qb: np.ndarray
    kb: np.ndarray
    full: np.ndarray


def build_head(pattern: ir.Pattern, ctx: Ctx) -> HeadLayout:
    """Touched blocks of a head-free (specialised) pattern."""
    qb, kb = pattern.candidates(ctx)
    nb = ctx.nblocks
    keys = np.sort(qb.astype(np.int64) * nb + kb)  # distinct blocks; sort + diff beats np.unique's hashing here
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if keys.size else keys
    qb, kb = keys // nb, keys % nb
    state = pattern.classify(ctx, qb, kb)
    keep = state != ir.EMPTY
    return HeadLayout(qb[keep], kb[keep], state[keep] == FULL)


@dataclass(eq=False)
class Layout:
    """Block-sparse layout of ``pattern`` for a (seq_len, num_heads, block_size).

    Arrays (NumPy, on the host):

    * ``indptr`` [H * nb + 1], ``kblock`` [nnz], ``full`` [nnz]: forward CSR, row
      ``h * nb + qb`` lists its key blocks in increasing order;
    * ``t_indptr`` [H * nb + 1], ``t_qblock`` [nnz], ``t_entry`` [nnz]: transposed CSR,
      row ``h * nb + kb`` lists its query blocks; ``t_entry`` points back to the forward
      entry, so per-entry data (FULL flags, masks) is shared by both.
    """

    pattern: ir.Pattern
    seq_len: int
    num_heads: int
    block_size: int
    heads: tuple[ir.Pattern, ...]  # the specialised pattern of each head
    indptr: np.ndarray
    kblock: np.ndarray
    full: np.ndarray
    t_indptr: np.ndarray
    t_qblock: np.ndarray
    t_entry: np.ndarray
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._lock = threading.RLock()  # memoised data is computed once, whatever the threads
        self._size = (-1, 0)  # (len(_memo) when measured, bytes)

    # -- shape
    @property
    def nblocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def ctx(self) -> Ctx:
        return Ctx(self.seq_len, self.block_size)

    @property
    def nnz(self) -> int:
        return int(self.kblock.size)

    @property
    def entry_head(self) -> np.ndarray:
        """Head of every forward entry."""
        return self._cached("entry_head", lambda: np.repeat(
            np.arange(self.num_heads * self.nblocks) // self.nblocks, np.diff(self.indptr)))

    @property
    def entry_qblock(self) -> np.ndarray:
        """Query block of every forward entry."""
        return self._cached("entry_qblock", lambda: np.repeat(
            np.arange(self.num_heads * self.nblocks) % self.nblocks, np.diff(self.indptr)))

    def row_counts(self) -> np.ndarray:
        """[H, nb] number of key blocks each query block touches."""
        return np.diff(self.indptr).reshape(self.num_heads, self.nblocks)

    def col_counts(self) -> np.ndarray:
        """[H, nb] number of query blocks touching each key block."""
        return np.diff(self.t_indptr).reshape(self.num_heads, self.nblocks)

    def row(self, head: int, qblock: int) -> tuple[np.ndarray, np.ndarray]:
        """Key blocks and FULL flags of one query block."""
        r = head * self.nblocks + qblock
        s, e = self.indptr[r], self.indptr[r + 1]
        return self.kblock[s:e], self.full[s:e]

    def head_groups(self) -> list[list[int]]:
        """Heads grouped by identical behaviour (same specialised pattern)."""
        groups: dict[ir.Pattern, list[int]] = {}
        for h, p in enumerate(self.heads):
            groups.setdefault(p, []).append(h)
        return list(groups.values())

    # -- costs
    @property
    def block_density(self) -> float:
        """Touched blocks over all blocks (nb^2 per head)."""
        return self.nnz / (self.num_heads * self.nblocks ** 2)

    @property
    def full_fraction(self) -> float:
        return float(self.full.mean()) if self.nnz else 0.0

    def pairs_per_head(self) -> np.ndarray:
        """Exact number of allowed (q, k) pairs of each head.

        FULL blocks count rows x columns; PARTIAL blocks evaluate the predicate at token
        level, one block chunk at a time (heads with the same behaviour counted once).
        """
        return self._cached("pairs", self._count_pairs)

    def _count_pairs(self) -> np.ndarray:
        ctx = self.ctx
        lengths = np.diff(np.minimum(np.arange(self.nblocks + 1) * self.block_size, self.seq_len))
        out = np.zeros(self.num_heads, np.int64)
        for heads in self.head_groups():
            h = heads[0]
            s, e = self.indptr[h * self.nblocks], self.indptr[(h + 1) * self.nblocks]
            qb, kb, full = self.entry_qblock[s:e], self.kblock[s:e], self.full[s:e]
            total = int((lengths[qb[full]] * lengths[kb[full]]).sum())
            total += int(partial_block_masks(self.heads[h], ctx, qb[~full], kb[~full]).sum())
            out[heads] = total
        return out

    @property
    def density(self) -> float:
        """Allowed token pairs over T^2, averaged over heads."""
        return float(self.pairs_per_head().sum()) / (self.num_heads * float(self.seq_len) ** 2)

    def flops(self, head_dim: int, batch: int = 1, backward: bool = False) -> dict[str, float]:
        """Matmul FLOPs of the sparse kernel (touched blocks) and of dense attention."""
        per_pair = 4 * head_dim * (3.5 if backward else 1.0)  # QK^T and PV; backward ~2.5x more
        sparse = per_pair * self.nnz * self.block_size ** 2 * batch
        useful = per_pair * float(self.pairs_per_head().sum()) * batch
        dense = per_pair * self.num_heads * float(self.seq_len) ** 2 * batch
        return {"sparse": sparse, "useful": useful, "dense": dense}

    def kv_bytes(self, head_dim: int, itemsize: int = 2, batch: int = 1) -> dict[str, float]:
        """Bytes of K and V read by a block-sparse pass vs a dense one (no reuse in cache)."""
        per_block = 2 * self.block_size * head_dim * itemsize * batch
        return {"sparse": per_block * self.nnz, "dense": per_block * self.num_heads * self.nblocks ** 2}

    def summary(self) -> dict:
        counts = self.row_counts()
        return {
            "pattern": str(self.pattern), "seq_len": self.seq_len, "num_heads": self.num_heads,
            "block_size": self.block_size, "nblocks": self.nblocks, "touched_blocks": self.nnz,
            "block_density": self.block_density, "density": self.density,
            "full_fraction": self.full_fraction,
            "blocks_per_row": {"min": int(counts.min()), "mean": float(counts.mean()),
                               "max": int(counts.max())},
            "empty_rows": int((counts == 0).sum()),
        }

    # -- pictures and tests (small T only)
    def block_matrix(self, head: int) -> np.ndarray:
        """[nb, nb] int8: 0 untouched, 1 PARTIAL, 2 FULL, for one head (for pictures)."""
        nb = self.nblocks
        out = np.zeros((nb, nb), np.int8)
        s, e = self.indptr[head * nb], self.indptr[(head + 1) * nb]
        out[self.entry_qblock[s:e], self.kblock[s:e]] = np.where(self.full[s:e], FULL, PARTIAL)
        return out

    def mask(self) -> np.ndarray:
        """[H, T, T] bool token mask from the pattern's predicate (small T only)."""
        if self.seq_len > MASK_LIMIT:
            raise ValueError(f"mask() builds an [H, T, T] array; seq_len={self.seq_len} is over "
                             f"the {MASK_LIMIT} limit. Use the layout's blocks instead.")
        t = np.arange(self.seq_len)
        return np.stack([p.allowed(self.ctx, t[:, None], t[None, :]) for p in self.heads])

    def partial_masks(self) -> np.ndarray:
        """[nnz, B, B] bool token masks of every entry (FULL entries all True inside T).

        Memory grows with touched blocks; used by the PyTorch backend and tests.
        """
        return self._cached("partial_masks", self._entry_masks)

    def _entry_masks(self) -> np.ndarray:
        bs = self.block_size
        out = np.ones((self.nnz, bs, bs), bool)
        qb, kb = self.entry_qblock, self.kblock
        for heads in self.head_groups():
            sel = np.flatnonzero(np.isin(self.entry_head, heads) & ~self.full)
            if sel.size:
                out[sel] = partial_block_masks(self.heads[heads[0]], self.ctx, qb[sel], kb[sel])
        offs = np.arange(bs)
        qv = (qb[:, None] * bs + offs[None, :]) < self.seq_len
        kv = (kb[:, None] * bs + offs[None, :]) < self.seq_len
        out &= qv[:, :, None] & kv[:, None, :]
        return out

    def save_npz(self, path) -> None:
        np.savez_compressed(
            path, pattern=np.array(str(self.pattern)), seq_len=self.seq_len, num_heads=self.num_heads,
            block_size=self.block_size, indptr=self.indptr, kblock=self.kblock, full=self.full,
            t_indptr=self.t_indptr, t_qblock=self.t_qblock, t_entry=self.t_entry)

    def _cached(self, key, fn):
        got = self._memo.get(key)
        if got is None:
            with self._lock:
                got = self._memo.get(key)
                if got is None:
                    got = self._memo[key] = fn()
        return got

    def nbytes(self) -> int:
        """Bytes this layout holds: its index arrays plus everything memoised on it (token
        masks of PARTIAL blocks, per-device kernel plans: host and device memory alike)."""
        # No lock: the memo only grows, a snapshot of its values is taken atomically, and a
        # cache lookup must not wait for another thread building a plan on this layout.
        if self._size[0] != len(self._memo):
            values = tuple(self._memo.values())
            arrays = (self.indptr, self.kblock, self.full, self.t_indptr, self.t_qblock, self.t_entry)
            self._size = (len(values), _nbytes(arrays) + _nbytes(values))
        return self._size[1]


def _nbytes(obj, depth: int = 0) -> int:
    """Bytes of the arrays and tensors inside ``obj`` (tuples, lists, dicts, dataclasses)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if depth > 8:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x, depth + 1) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    nbytes = getattr(obj, "nbytes", None)  # torch.Tensor (any device) and other array types
    if isinstance(nbytes, int):
        return nbytes
    return 0


def partial_block_masks(pattern: ir.Pattern, ctx: Ctx, qb: np.ndarray, kb: np.ndarray,
                        chunk: int = 512) -> np.ndarray:
    """[n, B, B] token masks of blocks (qb[i], kb[i]); tokens past the sequence are False."""
    bs = ctx.block
    out = np.zeros((qb.size, bs, bs), bool)
    offs = np.arange(bs, dtype=np.int64)
    for s in range(0, qb.size, chunk):
        q = qb[s:s + chunk, None, None] * bs + offs[None, :, None]
        k = kb[s:s + chunk, None, None] * bs + offs[None, None, :]
        valid = (q < ctx.seq_len) & (k < ctx.seq_len)
        q, k = np.minimum(q, ctx.seq_len - 1), np.minimum(k, ctx.seq_len - 1)
        out[s:s + chunk] = pattern.allowed(ctx, q, k) & valid
    return out


def build_layout(pattern: ir.Pattern, seq_len: int, num_heads: int, block_size: int = 64) -> Layout:
    """Build a layout (uncached; prefer :func:`get_layout`).

    >>> from patterncc import parse
    >>> lay = build_layout(parse("window(8) & causal"), seq_len=64, num_heads=1, block_size=16)
    >>> lay.row(0, 2)                 # query block 2: key blocks 1 (PARTIAL) and 2 (PARTIAL)
    (array([1, 2], dtype=int32), array([False, False]))
    """
    _check_sizes(seq_len, num_heads, block_size)
    pattern.check_heads(num_heads)
    ctx = Ctx(seq_len, block_size)
    nb = ctx.nblocks
    specialised = tuple(pattern.specialize(h) for h in range(num_heads))
    per_pattern: dict[ir.Pattern, HeadLayout] = {}
    for p in specialised:
        if p not in per_pattern:
            per_pattern[p] = build_head(p, ctx)
    parts = [per_pattern[p] for p in specialised]
    counts = np.stack([np.bincount(hl.qb, minlength=nb) for hl in parts]).reshape(-1)
    indptr = np.zeros(num_heads * nb + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    kblock = np.concatenate([hl.kb for hl in parts]).astype(np.int32)
    full = np.concatenate([hl.full for hl in parts])
    heads = np.repeat(np.arange(num_heads, dtype=np.int64), [hl.kb.size for hl in parts])
    qblock = np.concatenate([hl.qb for hl in parts])
    order = _transpose_order(heads, kblock, qblock, num_heads, nb)
    t_counts = np.bincount(heads * nb + kblock, minlength=num_heads * nb)
    t_indptr = np.zeros(num_heads * nb + 1, np.int64)
    np.cumsum(t_counts, out=t_indptr[1:])
    lay = Layout(pattern, seq_len, num_heads, block_size, specialised, indptr, kblock, full,
                 t_indptr, qblock[order].astype(np.int32), order.astype(np.int64))
    lay._memo["entry_head"] = heads
    lay._memo["entry_qblock"] = qblock
    return lay


def _transpose_order(heads, kblock, qblock, num_heads: int, nb: int) -> np.ndarray:
    """Entries ordered by head, then key block, then query block (the transposed CSR)."""
    if num_heads * nb * nb < 2 ** 62:  # one int64 key: a stable argsort is about twice as fast
        return np.argsort((heads * nb + kblock) * nb + qblock, kind="stable")
    return np.lexsort((qblock, kblock, heads))


def _check_sizes(seq_len: int, num_heads: int, block_size: int) -> None:
    for name, v in (("seq_len", seq_len), ("num_heads", num_heads)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if seq_len > MAX_SEQ_LEN:
        raise ValueError(f"seq_len={seq_len} is over the supported maximum {MAX_SEQ_LEN}")
    check_block_size(block_size)


def check_block_size(block_size) -> int:
    """The block size as an int, or ValueError unless it is a power of two from 16 to 256."""
    if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
            or block_size < 16 or block_size & (block_size - 1) or block_size > 256):
        raise ValueError(f"block_size must be a power of two between 16 and 256, got {block_size!r}")
    return int(block_size)


DEFAULT_CACHE_BYTES = 1 << 30
CACHE_BYTES_ENV = "PATTERNCC_LAYOUT_CACHE_BYTES"


def _bytes_from_env(default: int = DEFAULT_CACHE_BYTES) -> int:
    """``$PATTERNCC_LAYOUT_CACHE_BYTES``: a byte count, optionally with a K, M or G suffix
    (powers of 1024), e.g. ``512M``; the default (1 GiB) when unset or malformed."""
    text = os.environ.get(CACHE_BYTES_ENV, "").strip()
    if not text:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
        if value < 0:
            raise ValueError
    except ValueError:
        warnings.warn(f"{CACHE_BYTES_ENV}={text!r} is not a byte count such as 1073741824 or 512M; "
                      f"using {default}", stacklevel=2)
        return default
    return value


class LayoutCache:
    """LRU of layouts keyed by (pattern, seq_len, num_heads, block_size), bounded both in
    entries (``max_entries``) and in bytes (``max_bytes``, default
    ``$PATTERNCC_LAYOUT_CACHE_BYTES`` or 1 GiB).

    A layout's bytes (:meth:`Layout.nbytes`) include what is memoised on it after it was
    cached (token masks, kernel plans on each device), so the bound is enforced again on
    every lookup. The layout just returned is never evicted, even if it alone is over the
    bound. Thread-safe: concurrent lookups of one missing key build it once; ``hits`` and
    ``misses`` count lookups.
    """

    def __init__(self, max_entries: int = 32, max_bytes: int | None = None):
        self.max_entries = max_entries
        self.max_bytes = _bytes_from_env() if max_bytes is None else max_bytes
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._building: dict = {}  # key -> lock held while that layout is being built
        self._bytes: dict = {}  # key -> bytes when last measured
        self._total = 0
        self.hits = self.misses = 0

    def get(self, pattern: ir.Pattern, seq_len: int, num_heads: int, block_size: int) -> Layout:
        _check_sizes(seq_len, num_heads, block_size)
        key = (pattern, int(seq_len), int(num_heads), int(block_size))
        while True:
            with self._lock:
                lay = self._items.get(key)
                if lay is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    self._shrink(key)
                    return lay
                building = self._building.get(key)
                if building is None:
                    building = self._building[key] = threading.Lock()
                    building.acquire()
                    self.misses += 1
                    break
            with building:  # another thread builds this layout: wait for it, then look again
                pass
        try:
            lay = build_layout(pattern, *key[1:])
            with self._lock:
                self._items[key] = lay
                self._shrink(key)
        finally:
            with self._lock:
                del self._building[key]
            building.release()
        return lay

    def _shrink(self, keep) -> None:
        """Re-measure ``keep`` (what is memoised on a layout grows after it was cached, and
        it is handed out only through here) and evict least recently used layouts, never
        ``keep``, until within both bounds."""
        items, sizes = self._items, self._bytes
        now = items[keep].nbytes()
        self._total += now - sizes.get(keep, 0)
        sizes[keep] = now
        while len(items) > max(1, self.max_entries) or (self._total > self.max_bytes and len(items) > 1):
            key = next(iter(items))
            if key == keep:  # only when keep is the single entry left
                break
            del items[key]
            self._total -= sizes.pop(key)

    def nbytes(self) -> int:
        """Bytes held by the cached layouts (see :meth:`Layout.nbytes`), measured now."""
        with self._lock:
            return sum(lay.nbytes() for lay in self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes.clear()
            self._total = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


CACHE = LayoutCache()


def get_layout(pattern: ir.Pattern, seq_len: int, num_heads: int, block_size: int = 64) -> Layout:
    """The cached layout of ``pattern`` for (seq_len, num_heads, block_size).

    >>> from patterncc import parse
    >>> p = parse("window(256) | global([0])")
    >>> get_layout(p, 4096, 2) is get_layout(p, 4096, 2)
    True
    """
    return CACHE.get(pattern, seq_len, num_heads, block_size)
