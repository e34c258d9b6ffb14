"""Graph diagnostics: what a pattern (or a stack of per-layer patterns) lets each token see.

The attention graph of one layer has an edge k -> q wherever query q attends key k on
*any* head (information flows from key to query), plus the residual self-loop q -> q.
Composing the layers in order (layer 1 first), the *receptive field* of token q after l
layers is the set of positions whose information can reach q through l layers.
:func:`diagnose` reports, per layer, the receptive-field sizes (min / median / max) and
their coverage (the fraction of the positions q could see at all: all T positions, or
its causal prefix 0..q when every layer's pattern is causal), the hop diameter and strong
connectivity of that layer's single-layer graph, the positions whose receptive field is
still incomplete, the number of layers until every receptive field is complete, and the
same per head group.

Two methods, named in the report (``method``, ``exact``, ``guarantee``):

* ``token`` -- exact, token level (the default for T <= 4096, allowed up to 16384; the
  cost grows like T^2). Receptive fields are bitsets (one bit per position); a layer ORs,
  for every query, the bitsets of the keys it attends. A query's keys are decomposed into
  contiguous ranges and progressions of equal ranges (a dilated window is one progression
  of single positions), each read in O(1) from a sparse table of ORs over the previous
  layer's bitsets; ranges every query of a block shares (random blocks, global columns)
  are read once per block. The diameter and the layers past the program take up to 48
  layers one at a time, then binary lifting over powers of the layer graph (repeated
  squaring), so even window(1) at T=4096 (diameter 4095) costs a few dozen compositions.
* ``block`` -- block level, for long sequences: a node per block of ``block_size``
  tokens, an edge wherever any head touches the (query block, key block) pair. When every
  touched block pair is FULL on some head the token graph is the blow-up of the block graph
  and every number is exact (``exact`` is True; a block with no edge to itself is handled:
  its tokens see each other only through a cycle). Otherwise the block graph
  over-approximates: receptive fields and coverage are upper bounds, the hop diameter and
  ``layers_to_full_coverage`` are lower bounds, ``strongly_connected=False``, a null
  ``layers_to_full_coverage`` and incomplete positions are certain, and the FULL block
  pairs alone give an upper bound on the diameter (``hop_diameter_upper``; when they
  connect everything, ``strongly_connected=True`` is certain too). A T x T array is never
  built.

networkx is used for the block graph (strongly connected components) and by
:func:`attention_graph`, which returns the graph of a layout at token level (small T) or
block level for users who want to run their own graph algorithms.

Example:
    >>> from patterncc import parse
    >>> from patterncc.analysis import diagnose
    >>> rep = diagnose(parse("window(4)"), seq_len=32, layers=3)
    >>> rep.hop_diameter, rep.layers_to_full_coverage, rep.exact
    (8, 8, True)
    >>> [(r.layer, r.rf_min, r.rf_max) for r in rep.per_layer]
    [(1, 5, 9), (2, 9, 17), (3, 13, 25)]
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import ir
from .layout import Layout, get_layout, partial_block_masks
from .report import head_ranges

EXACT_AUTO_MAX = 4096     # token-level analysis by default up to this sequence length
EXACT_MAX = 16384         # ... and on request (exact=True) up to this one
DEFAULT_LAYERS = 12       # layers analysed for a single pattern when none are given
MAX_POSITIONS = 16        # incomplete positions listed per layer
_MIN_PROGRESSION = 4      # shorter arithmetic progressions are read point by point
_MAX_STRIDES = 8          # distinct progression kinds given their own sparse table
_DIRECT_STEPS = 48        # layers applied one by one before switching to repeated squaring
_TABLE_BUDGET = 256 * 2 ** 20   # bytes of one sparse table
_GATHER_BUDGET = 64 * 2 ** 20   # bytes gathered at once
_CHUNK_BUDGET = 32 * 2 ** 20    # bytes of one chunk of dense boolean rows


# ========================================================================================
# report


@dataclass
class LayerDiagnostics:
    """Receptive fields after ``layer`` layers and the single-layer graph of that layer.

    Sizes count positions; coverage is size / positions the token could see at all
    (T, or q + 1 when every layer is causal). ``unreachable_positions`` lists (the first
    few) query positions whose receptive field is still incomplete after this layer.
    """

    layer: int
    pattern: str
    rf_min: int
    rf_median: float
    rf_max: int
    rf_mean: float
    coverage_min: float
    coverage_mean: float
    unreachable_count: int
    unreachable_positions: list[int]
    hop_diameter: int | None
    strongly_connected: bool
    diameter_reason: str | None
    reach_diameter: int | None


@dataclass
class GraphDiagnostics:
    """Single-layer attention graph of one pattern (over all heads, or a head group).

    ``hop_diameter``: the largest shortest-path length over ordered pairs (None when the
    graph is not strongly connected; ``reason`` says why). ``reach_diameter``: the same
    over the pairs that can be connected at all (k <= q for causal reports), so a causal
    window gets a number too. ``unreachable_pairs`` counts ordered pairs (k, q) with no
    path from k to q, ``example_unreachable`` gives one as (k, q). Block level, not exact:
    ``hop_diameter`` is a lower bound, ``hop_diameter_upper`` an upper bound (from the
    FULL blocks alone, None if they do not connect everything), ``strongly_connected_certain``
    says whether the answer holds at token level.
    """

    pattern: str
    strongly_connected: bool
    strongly_connected_certain: bool
    hop_diameter: int | None
    hop_diameter_upper: int | None
    reach_diameter: int | None
    unreachable_pairs: int
    example_unreachable: tuple[int, int] | None
    components: int | None
    reason: str | None


@dataclass
class HeadGroupDiagnostics:
    """The same analysis restricted to one group of heads (every layer uses only them).

    Heads are grouped when their specialised patterns agree in every layer, up to their
    random draws (a group's graph is the union of its heads, so heads differing only in
    their random blocks form one group). Receptive-field statistics are after the last
    analysed layer; ``strongly_connected`` / ``hop_diameter`` are of the first layer's
    graph of the group. Groups use the report's method while (groups x T^2) stays within
    about four exact runs at T=4096, else the block level; ``exact`` says which holds.
    """

    heads: list[int]
    patterns: list[str]
    rf_min: int
    rf_median: float
    rf_max: int
    coverage_min: float
    unreachable_count: int
    strongly_connected: bool
    hop_diameter: int | None
    layers_to_full_coverage: int | None
    full_coverage_reason: str | None
    exact: bool


@dataclass
class DiagnosticsReport:
    """Result of :func:`diagnose`. ``to_dict()`` / ``to_json()`` give the JSON form.

    Top-level ``hop_diameter`` and ``strongly_connected`` describe the *first* layer's
    single-layer graph (each ``per_layer`` entry carries its own layer's values, and
    ``graphs`` one entry per distinct pattern). ``layers_to_full_coverage`` counts layers
    from the input until every token's receptive field is complete, running past the
    analysed layers with the program's remaining layers and then its last pattern
    repeated; None when that never happens (``full_coverage_reason`` says why).
    """

    seq_len: int
    num_heads: int
    block_size: int
    layers: int
    source: str
    patterns: list[str]
    causal: bool
    method: str
    exact: bool
    guarantee: str
    hop_diameter: int | None
    strongly_connected: bool
    diameter_reason: str | None
    layers_to_full_coverage: int | None
    full_coverage_reason: str | None
    unreachable_count: int
    unreachable_positions: list[int]
    per_layer: list[LayerDiagnostics]
    graphs: list[GraphDiagnostics]
    head_groups: list[HeadGroupDiagnostics]
    seconds: float
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-able dict (plain ints, floats, strings, lists, None)."""
        return _jsonable(asdict(self))

    def to_json(self, indent: int | None = 1) -> str:
        import json
        return json.dumps(self.to_dict(), indent=indent)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    return x


# ========================================================================================
# bitsets: one row of uint64 words per node, bit k of row q set when k is in q's set


_HAS_BITCOUNT = hasattr(np, "bitwise_count")
_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _words(n: int) -> int:
    return max(1, -(-n // 64))


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits per row of a [n, W] uint64 array."""
    if _HAS_BITCOUNT:
        return np.bitwise_count(bits).sum(axis=1, dtype=np.int64)
    return _POP8[bits.view(np.uint8)].sum(axis=1, dtype=np.int64)


def _pack(rows: np.ndarray, words: int) -> np.ndarray:
    """bool [r, n] -> uint64 [r, words]."""
    packed = np.packbits(rows, axis=1, bitorder="little")
    out = np.zeros((rows.shape[0], words * 8), np.uint8)
    out[:, :packed.shape[1]] = packed
    return out.view(np.uint64)


def _unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """uint64 [r, W] -> bool [r, n]."""
    return np.unpackbits(np.ascontiguousarray(bits).view(np.uint8), axis=1, count=n,
                         bitorder="little").view(bool)


def _identity(n: int) -> np.ndarray:
    out = np.zeros((n, _words(n)), np.uint64)
    idx = np.arange(n)
    out[idx, idx >> 6] = np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64))
    return out


def _diagonal(bits: np.ndarray) -> np.ndarray:
    idx = np.arange(bits.shape[0])
    return ((bits[idx, idx >> 6] >> (idx & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)


def _first_missing(row_bits: np.ndarray, n: int, limit: int) -> int:
    """First position < limit whose bit is clear in one row."""
    row = _unpack(row_bits[None], n)[0, :limit]
    miss = np.flatnonzero(~row)
    return int(miss[0]) if miss.size else -1


# ========================================================================================
# runs: each row's set as contiguous ranges, and progressions of equal ranges


@dataclass
class _Runs:
    """Row ``row[i]`` holds ``count[i]`` ranges of ``length[i]`` positions, the first at
    ``start[i]`` and each next one ``spacing[i]`` further (a dilated window is a progression
    of single positions, ``strided(2) | strided(3)`` one of 3-position ranges spaced by 6).

    Runs are sorted by row; a row's runs may overlap (they are OR-ed).
    """

    n: int
    row: np.ndarray
    start: np.ndarray
    length: np.ndarray
    count: np.ndarray
    spacing: np.ndarray
    shared: "_Runs | None" = None  # runs common to every row of a block (rows = blocks)
    block: int = 1

    @property
    def size(self) -> int:
        return int(self.row.size)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, position) of every member (for small graphs only)."""
        per = self.length * self.count
        total = int(per.sum())
        i = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
        length = np.repeat(self.length, per)
        col = np.repeat(self.start, per) + (i // length) * np.repeat(self.spacing, per) + i % length
        rows, cols = [np.repeat(self.row, per)], [col]
        if self.shared is not None and self.shared.size:
            br, bc = self.shared.positions()
            for b in np.unique(br):
                members = bc[br == b]
                own = np.arange(b * self.block, min(self.n, (b + 1) * self.block))
                rows.append(np.repeat(own, members.size))
                cols.append(np.tile(members, own.size))
        return np.concatenate(rows), np.concatenate(cols)


def _set_bits(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) of every set bit of a uint64 [r, W] array, in row-major order."""
    r, w = np.nonzero(words)
    if r.size == 0:
        return r.astype(np.int64), w.astype(np.int64)
    bits = np.unpackbits(words[r, w].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    i, b = np.nonzero(bits)
    return r[i].astype(np.int64), w[i].astype(np.int64) * 64 + b


def _run_bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, first, last) of every maximal range of set bits of packed rows, computed on
    the words (a bit starts a range when the bit before it is clear)."""
    one = np.uint64(1)
    prev = np.zeros_like(x)
    prev[:, 1:] = x[:, :-1] >> np.uint64(63)
    starts = x & ~((x << one) | prev)
    nxt = np.zeros_like(x)
    nxt[:, :-1] = (x[:, 1:] & one) << np.uint64(63)
    ends = x & ~((x >> one) | nxt)
    sr, sc = _set_bits(starts)
    _, ec = _set_bits(ends)
    return sr, sc, ec


def _runs_of_rows(x: np.ndarray, n: int, row0: int) -> tuple[np.ndarray, ...]:
    """Runs of packed rows x [r, W] (n columns) whose first row is node ``row0``.

    Maximal ranges first; then, among a row's ranges of one length, progressions at equal
    spacing (kept when at least _MIN_PROGRESSION long): consecutive ones first, then, for
    interleaved periodic rows such as ``strided(4) | strided(6)``, those of one residue
    modulo the rows' most common period.
    """
    row, start, last = _run_bounds(x)
    length = last - start + 1
    ids = np.arange(row.size)
    # consecutive ranges of a row (already in (row, start) order): dilated windows, strides
    parts, left = _progressions(row, length, start, ids, n)
    if left.size >= _MIN_PROGRESSION:  # ranges of one length within a row
        lr, ll = row[left], length[left]
        order = left[np.argsort(lr * (n + 2) + ll, kind="stable")]
        found, left = _progressions(row[order], length[order], start[order], order, n)
        parts += found
    if left.size >= _MIN_PROGRESSION:  # interleaved: one residue modulo the common period
        period = _common_period(row[left], length[left], start[left])
        if period:
            lr, ll, ls = row[left], length[left], start[left]
            order = left[np.lexsort((ls, ls % period, ll, lr))]
            found, left = _progressions(row[order], length[order], start[order], order, n,
                                        only_gap=period)
            parts += found
    ones = np.ones(left.size, np.int64)
    parts.append((row[left], start[left], length[left], ones, ones))
    return tuple(np.concatenate([p[i] for p in parts]).astype(np.int64) + (row0 if i == 0 else 0)
                 for i in range(5))


def _progressions(row, length, start, ids, n, only_gap: int = 0):
    """Progressions among runs sorted so that candidates are consecutive.

    Returns ([(row, start, length, count, spacing)], ids of the runs left uncovered).
    """
    if row.size < 2:
        return [], ids
    gap = start[1:] - start[:-1]
    same = (row[1:] == row[:-1]) & (length[1:] == length[:-1]) & (gap > 0)
    if only_gap:
        same &= gap == only_gap
    key = np.where(same, gap * (n + 1) + length[:-1], 0)
    bounds = np.flatnonzero(np.diff(key) != 0) + 1
    seg_s = np.concatenate([[0], bounds])
    seg_e = np.concatenate([bounds, [key.size]])  # pair indices [s, e) join runs s..e
    nrun = seg_e - seg_s + 1
    keep = (key[seg_s] > 0) & (nrun >= _MIN_PROGRESSION)
    if not keep.any():
        return [], ids
    ks, ke = seg_s[keep], seg_e[keep]
    mark = np.bincount(ks, minlength=row.size + 1) - np.bincount(ke + 1, minlength=row.size + 1)
    covered = np.cumsum(mark)[:-1] > 0
    found = [(row[ks], start[ks], length[ks], nrun[keep], gap[ks])]
    return found, np.sort(ids[~covered])


def _common_period(row, length, start) -> int:
    """The most common distance between a run and the 2nd..4th next run of its row and
    length (0 when there is none)."""
    order = np.lexsort((start, length, row))
    row, length, start = row[order], length[order], start[order]
    diffs = []
    for p in (2, 3, 4):
        if row.size > p:
            ok = (row[p:] == row[:-p]) & (length[p:] == length[:-p])
            diffs.append((start[p:] - start[:-p])[ok])
    if not diffs:
        return 0
    allv = np.concatenate(diffs)
    if allv.size < _MIN_PROGRESSION:
        return 0
    vals, counts = np.unique(allv, return_counts=True)
    return int(vals[np.argmax(counts)])


def _share(runs: _Runs, block: int) -> _Runs:
    """Move the runs that every row of a block has (random blocks, global columns, FULL
    blocks, complete rows) to ``runs.shared``, read once per block."""
    if block <= 1 or runs.size == 0:
        return runs
    t = runs.n
    blk = runs.row // block
    k1 = runs.start * (t + 1) + runs.length
    k2 = runs.count * (t + 1) + runs.spacing
    order = np.lexsort((k2, k1, blk))
    b, a1, a2 = blk[order], k1[order], k2[order]
    new = np.ones(b.size, bool)
    new[1:] = (b[1:] != b[:-1]) | (a1[1:] != a1[:-1]) | (a2[1:] != a2[:-1])
    gid = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    whole = np.bincount(gid) == np.minimum(block, t - b[first] * block)
    if not whole.any():
        return runs
    shared_sorted = whole[gid]
    mine = np.zeros(runs.size, bool)
    mine[order] = shared_sorted
    heads = order[first[whole]]  # one representative per shared group, in block order
    shared = _Runs(-(-t // block), blk[heads], runs.start[heads], runs.length[heads],
                   runs.count[heads], runs.spacing[heads])
    keep = ~mine
    return _Runs(t, runs.row[keep], runs.start[keep], runs.length[keep], runs.count[keep],
                 runs.spacing[keep], shared, block)


def _build_runs(n: int, n_cols: int, chunk_rows, chunk: int, block: int = 1) -> tuple[_Runs, np.ndarray]:
    """Runs and packed bitsets of n rows produced by ``chunk_rows(r0, r1)`` (bool rows).

    With ``block`` > 1, runs common to all rows of a block are kept once per block."""
    words = _words(n_cols)
    bits = np.zeros((n, words), np.uint64)
    pieces = []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        bits[r0:r1] = _pack(chunk_rows(r0, r1), words)
        pieces.append(_runs_of_rows(bits[r0:r1], n_cols, r0))
    cols = [np.concatenate([p[i] for p in pieces]) for i in range(5)]
    order = np.argsort(cols[0], kind="stable")
    return _share(_limit_kinds(_Runs(n, *(c[order] for c in cols))), block), bits


def _limit_kinds(runs: _Runs) -> _Runs:
    """Keep at most _MAX_STRIDES kinds (length, spacing) of progressions; split the
    others into their single ranges."""
    prog = runs.count > 1
    if not prog.any():
        return runs
    kind = runs.length * (runs.n + 2) + runs.spacing
    kinds = np.unique(kind[prog])
    if kinds.size <= _MAX_STRIDES:
        return runs
    weight = np.array([(runs.length * runs.count)[prog & (kind == k)].sum() for k in kinds])
    drop = prog & np.isin(kind, kinds[np.argsort(-weight)[_MAX_STRIDES:]])
    c = runs.count[drop]
    i = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
    split = (np.repeat(runs.row[drop], c), np.repeat(runs.start[drop], c) + i * np.repeat(runs.spacing[drop], c),
             np.repeat(runs.length[drop], c), np.ones(i.size, np.int64), np.ones(i.size, np.int64))
    keep = ~drop
    cols = [np.concatenate([getattr(runs, f)[keep], sp])
            for f, sp in zip(("row", "start", "length", "count", "spacing"), split)]
    order = np.argsort(cols[0], kind="stable")
    return _Runs(runs.n, *(c[order] for c in cols))


def _runs_of_bits(bits: np.ndarray, n: int, block: int = 1) -> _Runs:
    """Runs of packed rows (rows are nodes, n columns)."""
    cols = [np.asarray(c) for c in _runs_of_rows(bits, n, 0)]
    order = np.argsort(cols[0], kind="stable")
    return _share(_limit_kinds(_Runs(bits.shape[0], *(c[order] for c in cols))), block)


def _sparse_table(base: np.ndarray, stride: int, levels: int) -> np.ndarray:
    """[levels + 1, n, W]: level j row a = OR of base[a + i * stride] for i < 2^j (clipped)."""
    n = base.shape[0]
    table = np.empty((levels + 1,) + base.shape, np.uint64)
    table[0] = base
    for j in range(1, levels + 1):
        h = (1 << (j - 1)) * stride
        if h < n:
            np.bitwise_or(table[j - 1, :n - h], table[j - 1, h:], out=table[j, :n - h])
            table[j, n - h:] = table[j - 1, n - h:]
        else:
            table[j] = table[j - 1]
    return table


def _levels(longest: int, row_bytes: int) -> int:
    need = int(math.floor(math.log2(max(1, longest))))
    return max(0, min(need, _TABLE_BUDGET // max(1, row_bytes) - 1))


def _read(table: np.ndarray, out: np.ndarray, row, start, count, stride: int) -> None:
    """out[row[i]] |= OR of table[0][start[i] + m * stride] for m < count[i] (rows sorted)."""
    if row.size == 0:
        return
    cap = table.shape[0] - 1
    level = np.minimum(np.floor(np.log2(count)).astype(np.int64), cap)
    size = np.left_shift(1, level)
    pieces = -(-count // size)
    total = int(pieces.sum())
    prow = np.repeat(row, pieces)
    k = np.arange(total) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    psize = np.repeat(size, pieces)
    offset = np.minimum(k * psize, np.repeat(count, pieces) - psize)
    idx = np.repeat(start, pieces) + offset * stride
    plev = np.repeat(level, pieces)
    step = max(1, _GATHER_BUDGET // (out.shape[1] * 8))
    for a in range(0, total, step):
        b = min(total, a + step)
        r = prow[a:b]
        gathered = table[plev[a:b], idx[a:b]]
        first = np.concatenate([[0], np.flatnonzero(r[1:] != r[:-1]) + 1])
        out[r[first]] |= np.bitwise_or.reduceat(gathered, first, axis=0)


def _compose(runs: _Runs, x: np.ndarray) -> np.ndarray:
    """Row q of the result: OR of x[k] over every k in row q of ``runs``.

    Sparse tables of ORs (level j: 2^j rows, spaced by 1 or by a progression's spacing)
    make every range or progression cost one or two row reads whatever its length. Runs
    shared by a whole block are read once for the block.
    """
    n_src, words = x.shape
    out = np.zeros((runs.n, words), np.uint64)
    parts = [(runs, out)]
    shared = runs.shared
    if shared is not None and shared.size:
        bout = np.zeros((shared.n, words), np.uint64)
        parts.append((shared, bout))
    parts = [(r, o) for r, o in parts if r.size]
    if not parts:
        return out
    row_bytes = n_src * words * 8
    longest = max(int(r.length.max()) for r, _ in parts)
    table = _sparse_table(x, 1, _levels(longest, row_bytes)) if longest > 1 else x[None]
    for r, o in parts:
        single = r.count == 1
        _read(table, o, r.row[single], r.start[single], r.length[single], 1)
    kinds = [np.stack([r.length[r.count > 1], r.spacing[r.count > 1]], 1) for r, _ in parts]
    kinds = np.unique(np.concatenate(kinds), axis=0) if kinds else np.zeros((0, 2), np.int64)
    for length, spacing in kinds.tolist():
        if length == 1:
            base = x
        else:  # base[a] = OR of x[a .. a + length - 1]
            j = min(int(math.floor(math.log2(length))), table.shape[0] - 1)
            base = table[j].copy()
            span = 1 << j
            a = 0
            while a + span < length:  # ranges longer than the table's reach
                a = min(a + span, length - span)
                base[:n_src - a] |= table[j, a:]
        sels = [(r, o, (r.count > 1) & (r.length == length) & (r.spacing == spacing)) for r, o in parts]
        most = max(int(r.count[sel].max()) for r, _, sel in sels if sel.any())
        sub = _sparse_table(base, int(spacing), _levels(most, row_bytes))
        for r, o, sel in sels:
            if sel.any():
                _read(sub, o, r.row[sel], r.start[sel], r.count[sel], int(spacing))
        del sub
    if len(parts) and shared is not None and shared.size:
        out |= np.repeat(bout, runs.block, axis=0)[:runs.n]
    return out


# ========================================================================================
# attention graphs of a layout (token or block level)


class _Graph:
    """Single-layer attention graph of a layout restricted to some heads.

    Nodes are tokens (``level == 'token'``; the residual self-loops are part of the runs)
    or blocks (``level == 'block'``; ``self_loop[b]`` says whether b attends itself).
    ``weight[b]`` is the number of tokens of node b.
    """

    def __init__(self, lay: Layout, heads: list[int], level: str):
        self.lay, self.heads, self.level = lay, list(heads), level
        self.seq_len, self.block = lay.seq_len, lay.block_size
        nb = lay.nblocks
        # distinct specialised patterns of the selected heads, with their entries
        reps: dict[ir.Pattern, int] = {}
        for h in self.heads:
            reps.setdefault(lay.heads[h], h)
        self.patterns = list(reps)
        ent_q, ent_k, ent_f, ent_p = [], [], [], []
        for i, h in enumerate(reps.values()):
            s, e = lay.indptr[h * nb], lay.indptr[(h + 1) * nb]
            ent_q.append(lay.entry_qblock[s:e].astype(np.int64))
            ent_k.append(lay.kblock[s:e].astype(np.int64))
            ent_f.append(lay.full[s:e])
            ent_p.append(np.full(e - s, i, np.int64))
        qb, kb = np.concatenate(ent_q), np.concatenate(ent_k)
        full, pat = np.concatenate(ent_f), np.concatenate(ent_p)
        key = qb * nb + kb
        ukey, inv = np.unique(key, return_inverse=True)
        ufull = np.zeros(ukey.size, bool)
        np.logical_or.at(ufull, inv, full)
        self.bq, self.bk, self.bfull = ukey // nb, ukey % nb, ufull
        # entries whose union is PARTIAL: (pattern index, query block, key block)
        need = ~ufull[inv]
        self.pq, self.pk, self.pp = qb[need], kb[need], pat[need]
        self.all_full = bool(ufull.all())
        if level == "token":
            self.n = self.seq_len
            self.weight = np.ones(self.n, np.int64)
            self.self_loop = np.ones(self.n, bool)
            chunk = max(self.block, (_CHUNK_BUDGET // max(1, self.n)) // self.block * self.block)
            self.runs, self.bits = _build_runs(self.n, self.n, self._token_rows, chunk, self.block)
        else:
            self.n = nb
            starts = np.arange(nb, dtype=np.int64) * self.block
            self.weight = np.minimum(starts + self.block, self.seq_len) - starts
            self.self_loop = np.zeros(nb, bool)
            self.self_loop[self.bq[self.bq == self.bk]] = True
            chunk = max(1, _CHUNK_BUDGET // max(1, nb))
            self.runs, self.bits = _build_runs(nb, nb, self._block_rows, chunk)
        self._powers: list[np.ndarray] = []
        self._power_runs: list[_Runs] = []
        self.closed = False  # powers reached the transitive closure

    def _block_rows(self, r0: int, r1: int) -> np.ndarray:
        rows = np.zeros((r1 - r0, self.n), bool)
        sel = (self.bq >= r0) & (self.bq < r1)
        rows[self.bq[sel] - r0, self.bk[sel]] = True
        return rows

    def _token_rows(self, r0: int, r1: int) -> np.ndarray:
        """Dense bool rows r0..r1 (block aligned) of the token adjacency, with self-loops."""
        bs, nb, t = self.block, self.lay.nblocks, self.seq_len
        b0, b1 = r0 // bs, -(-r1 // bs)
        dense = np.zeros((b1 - b0, bs, nb, bs), bool)
        sel = (self.bq >= b0) & (self.bq < b1) & self.bfull
        dense[self.bq[sel] - b0, :, self.bk[sel], :] = True
        sel = np.flatnonzero((self.pq >= b0) & (self.pq < b1))
        if sel.size:
            masks = np.zeros((sel.size, bs, bs), bool)
            ctx = self.lay.ctx
            for i, p in enumerate(self.patterns):
                mine = self.pp[sel] == i
                if mine.any():
                    masks[mine] = partial_block_masks(p, ctx, self.pq[sel][mine], self.pk[sel][mine])
            key = self.pq[sel] * nb + self.pk[sel]
            order = np.argsort(key, kind="stable")
            key, masks = key[order], masks[order]
            first = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
            merged = np.logical_or.reduceat(masks, first, axis=0)
            ukey = key[first]
            dense[ukey // nb - b0, :, ukey % nb, :] = merged
        rows = dense.reshape((b1 - b0) * bs, nb * bs)[: r1 - r0, :t]
        i = np.arange(r1 - r0)
        rows[i, r0 + i] = True
        return rows

    # -- reachability
    def step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One layer: (new reflexive reach sets, whether each node is on a cycle so far)."""
        y = _compose(self.runs, x)
        if self.level == "token":
            return y, np.ones(self.n, bool)
        cyc = _diagonal(y)
        return y | _identity(self.n), cyc

    def power(self, i: int) -> np.ndarray | None:
        """Reflexive reach within 2^i hops (None past the transitive closure)."""
        if not self._powers:
            p = self.bits.copy() if self.level == "token" else self.bits | _identity(self.n)
            self._powers.append(p)
            self._power_runs.append(self.runs if self.level == "token" else _runs_of_bits(p, self.n))
        while len(self._powers) <= i:
            if self.closed:
                return None
            last = self._powers[-1]
            nxt = _compose(self._power_runs[-1], last)
            if np.array_equal(nxt, last):
                self.closed = True
                return None
            self._powers.append(nxt)
            self._power_runs.append(_runs_of_bits(nxt, self.n, self.block if self.level == "token" else 1))
        return self._powers[i]

    def apply_power(self, i: int, x: np.ndarray) -> np.ndarray:
        self.power(i)
        return _compose(self._power_runs[i], x)


def _target_counts(n: int, causal: bool) -> np.ndarray:
    """Bits a complete row holds: all n nodes, or the prefix 0..q."""
    return np.arange(1, n + 1, dtype=np.int64) if causal else np.full(n, n, np.int64)


def _min_more_steps(g: _Graph, x: np.ndarray, cyc: np.ndarray, causal: bool,
                    progress=None) -> tuple[int | None, np.ndarray]:
    """Fewest further layers of g after state (x, cyc) for every row to be complete.

    Up to _DIRECT_STEPS layers are applied one at a time (cheap: the layer's own runs;
    small-world graphs finish here); past that, binary lifting over the powers of g
    (long chains such as windows, whose powers are still a few ranges per row), so the
    cost is O(log of the answer) compositions. Returns (steps or None, the state reached:
    the closure applied to x when never).
    """
    target = _target_counts(g.n, causal)
    need_cycle = (g.weight > 1)

    def done_x(state):
        return bool((_popcount(state) == target).all())

    def done_cyc(c):
        return bool((c | ~need_cycle).all())

    steps = 0
    for _ in range(_DIRECT_STEPS):
        if done_x(x) and done_cyc(cyc):
            return steps, x
        y, c = g.step(x)
        steps += 1
        if np.array_equal(y, x) and np.array_equal(c, cyc):
            return None, x  # a fixed point short of complete
        x, cyc = y, c
        if progress:
            progress()
    if done_x(x):
        if done_cyc(cyc):
            return steps, x
        y, c = g.step(x)
        return (steps + 1, y) if done_cyc(c) else (None, y)
    # grow the power until it completes x or reaches the transitive closure
    m = 0
    while True:
        if progress:
            progress()
        if g.power(m) is None:
            return None, _compose(g._power_runs[-1], x)
        if done_x(g.apply_power(m, x)):
            break
        m += 1
    n_steps, cur = 0, x
    for i in range(m - 1, -1, -1):
        t = g.apply_power(i, cur)
        if not done_x(t):
            cur, n_steps = t, n_steps + (1 << i)
    # cur is the state after n_steps; one more layer completes every row's reach
    y, c = g.step(cur)
    if done_cyc(c):
        return steps + n_steps + 1, y
    y2, c2 = g.step(y)
    return (steps + n_steps + 2, y2) if done_cyc(c2) else (None, y2)


def _token_sizes(g: _Graph, x: np.ndarray, cyc: np.ndarray, causal: bool) -> np.ndarray:
    """Receptive-field size of every token from a state (exact at token level, an upper
    bound at block level unless every touched block is FULL)."""
    if g.level == "token":
        return _popcount(x)
    nb, bs, t = g.n, g.block, g.seq_len
    total = np.zeros(nb, np.int64)
    chunk = max(1, _CHUNK_BUDGET // max(1, nb))
    for a in range(0, nb, chunk):
        b = min(nb, a + chunk)
        total[a:b] = _unpack(x[a:b], nb).astype(np.int64) @ g.weight
    own = np.repeat(np.arange(nb), g.weight)
    if causal:
        offset = np.arange(t) - own * bs           # position inside its block
        before = np.repeat(total - g.weight, g.weight)  # earlier blocks (x holds no later ones)
        return before + np.where(cyc[own], offset + 1, 1)
    return np.repeat(total - np.where(cyc, 0, g.weight - 1), g.weight)


def _all_full(lay: Layout, heads: list[int]) -> bool:
    """Whether every block pair touched by these heads is FULL on at least one of them."""
    nb = lay.nblocks
    sel = np.isin(lay.entry_head, heads)
    key = lay.entry_qblock[sel].astype(np.int64) * nb + lay.kblock[sel]
    return bool(np.isin(key[~lay.full[sel]], key[lay.full[sel]]).all())


def _visible(t: int, causal: bool) -> np.ndarray:
    return np.arange(1, t + 1, dtype=np.int64) if causal else np.full(t, t, np.int64)


def _is_causal(lay: Layout) -> bool:
    """Whether no head lets a query see a later key (checked on the blocks, then on the
    diagonal blocks' token masks)."""
    if (lay.kblock > lay.entry_qblock).any():
        return False
    diag = lay.kblock == lay.entry_qblock
    bs = lay.block_size
    upper = np.triu(np.ones((bs, bs), bool), 1)
    lengths = np.minimum((np.arange(lay.nblocks) + 1) * bs, lay.seq_len) - np.arange(lay.nblocks) * bs
    if (diag & lay.full & (lengths[lay.entry_qblock] > 1)).any():
        return False
    for heads in lay.head_groups():
        h = heads[0]
        s, e = lay.indptr[h * lay.nblocks], lay.indptr[(h + 1) * lay.nblocks]
        sel = np.flatnonzero(diag[s:e] & ~lay.full[s:e]) + s
        if sel.size:
            m = partial_block_masks(lay.heads[h], lay.ctx, lay.entry_qblock[sel], lay.kblock[sel])
            if (m & upper).any():
                return False
    return True


# ========================================================================================
# single-layer graph properties


def _graph_diagnostics(g: _Graph, pattern: str, causal: bool, graph_causal: bool, exact: bool,
                       progress=None) -> GraphDiagnostics:
    """Strong connectivity, hop diameter, reach diameter and unreachable pairs of g.

    ``causal``: the report measures coverage against prefixes; ``graph_causal``: this
    graph has no edge from a later to an earlier position (then it is not strongly
    connected for T > 1, and one pass over prefix targets gives its closure too)."""
    n, t = g.n, g.seq_len
    ident = _identity(n)
    start_cyc = np.full(n, g.level == "token")  # no cycle is walked in zero layers
    upper = None
    if graph_causal and t > 1:
        diam = None
        reach, reached = _min_more_steps(g, ident, start_cyc, True, progress)
        if not causal:
            reach = None  # coverage of all T positions: a causal layer never gets there
    else:
        # hop diameter over all ordered pairs (reflexive reach from the identity)
        diam, reached = _min_more_steps(g, ident, start_cyc, False, progress)
        reach = diam
        if g.level == "block" and not exact and diam is not None:
            fg = _FullGraph(g)  # FULL block pairs alone connect every token pair they cover
            upper, _ = _min_more_steps(fg, ident, start_cyc, False)
    strongly = diam is not None
    certain = exact or not strongly or upper is not None
    components = 1 if strongly else None
    reason, unreachable, example = None, 0, None
    if not strongly:
        closure = reached  # the reflexive transitive closure (or the prefix-complete state)
        unreachable, example = _unreachable_pairs(g, closure)
        if g.level == "block":
            components = _block_components(g)
        elif n <= EXACT_AUTO_MAX:
            components = _token_components(closure, n)
        reason = _disconnect_reason(g, closure, unreachable, example, graph_causal, components)
    return GraphDiagnostics(pattern, strongly, certain, diam, diam if exact else upper,
                            reach, unreachable, example, components, reason)


class _FullGraph(_Graph):
    """The block graph with only the FULL block pairs (each a true all-pairs edge set)."""

    def __init__(self, g: _Graph):  # noqa: D107 - shares the parent's arrays
        self.lay, self.heads, self.level = g.lay, g.heads, "block"
        self.seq_len, self.block, self.n, self.weight = g.seq_len, g.block, g.n, g.weight
        keep = g.bfull
        self.bq, self.bk, self.bfull = g.bq[keep], g.bk[keep], g.bfull[keep]
        self.patterns, self.pq, self.pk, self.pp = g.patterns, g.pq[:0], g.pk[:0], g.pp[:0]
        self.all_full = True
        self.self_loop = np.zeros(self.n, bool)
        self.self_loop[self.bq[self.bq == self.bk]] = True
        chunk = max(1, _CHUNK_BUDGET // max(1, self.n))
        self.runs, self.bits = _build_runs(self.n, self.n, self._block_rows, chunk)
        self._powers, self._power_runs, self.closed = [], [], False


def _token_components(closure: np.ndarray, n: int) -> int:
    """Strongly connected components from the reflexive transitive closure."""
    m = _unpack(closure, n)
    mutual = np.packbits(m & m.T, axis=1)
    return int(np.unique(mutual, axis=0).shape[0])


def _block_components(g: _Graph) -> int:
    import networkx as nx
    graph = nx.DiGraph()
    graph.add_nodes_from(range(g.n))
    graph.add_edges_from(zip(g.bk.tolist(), g.bq.tolist()))
    return nx.number_strongly_connected_components(graph)


def _unreachable_pairs(g: _Graph, closure: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """Ordered token pairs (k, q) with no path k -> q, and the first such pair."""
    n, t = g.n, g.seq_len
    if g.level == "token":
        counts = _popcount(closure)
        missing = int(t * t - counts.sum())
        rows = np.flatnonzero(counts < t)
        if not rows.size:
            return 0, None
        q = int(rows[0])
        return missing, (_first_missing(closure[q], n, n), q)
    # block level: blocks missing from the closure, plus blocks on no cycle
    cyc = _diagonal(_compose(g.runs, closure))
    reach_w = np.zeros(n, np.int64)
    chunk = max(1, _CHUNK_BUDGET // max(1, n))
    for a in range(0, n, chunk):
        reach_w[a:a + chunk] = _unpack(closure[a:a + chunk], n).astype(np.int64) @ g.weight
    inside = np.where(cyc, 0, g.weight * (g.weight - 1))
    missing = int((g.weight * (t - reach_w)).sum() + inside.sum())
    counts = _popcount(closure)
    rows = np.flatnonzero(counts < n)
    if rows.size:
        b = int(rows[0])
        a = _first_missing(closure[b], n, n)
        return missing, (a * g.block, b * g.block)
    lonely = np.flatnonzero(~cyc & (g.weight > 1))
    if lonely.size:
        b = int(lonely[0])
        return missing, (b * g.block + 1, b * g.block)
    return missing, None


def _disconnect_reason(g, closure, unreachable, example, causal, components) -> str:
    t = g.seq_len
    parts = []
    if example is not None:
        k, q = example
        parts.append(f"position {k} never reaches position {q}")
    parts.append(f"{unreachable} of {t * t} ordered pairs have no path")
    if components is not None:
        parts.append(f"{components} strongly connected components"
                     + (" at block level" if g.level == "block" else ""))
    if causal:
        parts.insert(0, "causal: no path from a later position to an earlier one")
    return "not strongly connected: " + "; ".join(parts)


# ========================================================================================
# head groups


_STREAM = re.compile(r", stream=\d+")


def _head_groups(layouts: list[Layout]) -> list[list[int]]:
    """Heads whose specialised patterns agree in every layout, up to random draws."""
    groups: dict[tuple, list[int]] = {}
    for h in range(layouts[0].num_heads):
        key = tuple(_STREAM.sub("", str(lay.heads[h])) for lay in layouts)
        groups.setdefault(key, []).append(h)
    return list(groups.values())


# ========================================================================================
# progress bar


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done = max(1, total), 0
        self.enabled = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, label: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        self._draw(label)

    def tick(self) -> None:
        self._draw("")

    def _draw(self, label: str) -> None:
        if self.enabled:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{time.perf_counter() - self.t0:5.1f}s {label[:40]:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


# ========================================================================================
# the analysis


def _as_program(program) -> ir.Program:
    if isinstance(program, ir.Program):
        return program
    if isinstance(program, ir.Pattern):
        return ir.Program((ir.Section(0, -1, program),))
    if isinstance(program, str):
        from .parser import parse_program
        return parse_program(program)
    raise TypeError(f"diagnose() takes a Pattern, a Program or a source string, not {type(program).__name__}")


def _layer_patterns(prog: ir.Program, layers: int) -> list[ir.Pattern]:
    """Pattern of layers 0..layers-1; past the program, its last section repeats."""
    last = prog.sections[-1].pattern
    n = prog.num_layers
    return [prog.pattern_for_layer(i) if (n is None or i < n) else last for i in range(layers)]


def diagnose(program, seq_len: int, *, num_heads: int | None = None, layers: int | None = None,
             block_size: int | None = None, exact: bool | None = None,
             progress: bool = False) -> DiagnosticsReport:
    """Receptive fields, hop diameter, connectivity and layers to full coverage.

    Args:
        program: a :class:`patterncc.Program` (one pattern per layer section), a single
            :class:`patterncc.Pattern` (repeated ``layers`` times) or a source string.
        seq_len: sequence length T.
        num_heads: heads (default: the program's ``heads`` option, else 1).
        layers: layers analysed (default: the program's layer count, else 12); past the
            program's last section its pattern repeats.
        block_size: layout block size (default: the program's option, else 64); also the
            node size of the block-level analysis.
        exact: True for the exact token-level analysis (T <= 16384), False for the
            block-level one, None to pick: token level up to T = 4096, else block level
            (which is exact anyway when every touched block pair is FULL).
        progress: draw a progress bar on stderr (only when stderr is a terminal).

    Example:
        >>> from patterncc import parse, parse_program
        >>> rep = diagnose(parse("window(2) & causal"), seq_len=9, layers=2)
        >>> rep.causal, rep.strongly_connected, rep.layers_to_full_coverage
        (True, False, 4)
        >>> rep.per_layer[-1].rf_max, rep.per_layer[-1].coverage_min
        (5, 0.5555555555555556)
        >>> prog = parse_program("layers 0..2: window(4)\\nlayers 2..4: window(8)")
        >>> [r.rf_max for r in diagnose(prog, 200).per_layer]
        [9, 17, 33, 49]
    """
    t_start = time.perf_counter()
    prog = _as_program(program)
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    seq_len = int(seq_len)
    heads = int(num_heads or prog.heads or 1)
    block = int(block_size or prog.block_size or 64)
    if layers is None:
        layers = prog.num_layers or DEFAULT_LAYERS
    if not isinstance(layers, (int, np.integer)) or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers!r}")
    layers = int(layers)
    if exact and seq_len > EXACT_MAX:
        raise ValueError(f"the exact token-level analysis keeps a T x T bitset and is limited to "
                         f"seq_len <= {EXACT_MAX}; got {seq_len}. Use exact=None or False for the "
                         f"block-level analysis.")
    timing: dict[str, float] = {}

    # layer patterns, and the program's own layers past the analysed ones (for coverage)
    per_layer_pat = _layer_patterns(prog, layers)
    tail_pat = _layer_patterns(prog, max(layers, prog.num_layers or 0))[layers:]
    distinct = list(dict.fromkeys(per_layer_pat + tail_pat))
    t0 = time.perf_counter()
    layouts = {p: get_layout(p, seq_len, heads, block) for p in distinct}
    layout_causal = {p: _is_causal(lay) for p, lay in layouts.items()}
    causal = all(layout_causal.values())
    timing["layouts"] = time.perf_counter() - t0

    token = exact if exact is not None else seq_len <= EXACT_AUTO_MAX
    level = "token" if token else "block"
    groups = _head_groups([layouts[p] for p in distinct])
    n_steps = len(distinct) * (2 + len(groups)) + layers * (1 + len(groups)) + 4
    bar = _Progress(n_steps, progress)
    try:
        t0 = time.perf_counter()
        main = _analyse(layouts, layout_causal, per_layer_pat, tail_pat, list(range(heads)), level, causal, bar)
        timing["analysis"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        group_reports = []
        if len(groups) > 1:
            # token level for the groups too while that costs at most ~4 exact runs at 4096
            group_level = level if len(groups) * seq_len ** 2 <= 4 * EXACT_AUTO_MAX ** 2 else "block"
            for g in groups:
                r = _analyse(layouts, layout_causal, per_layer_pat, tail_pat, g, group_level, causal, bar,
                             stats_only=True)
                group_reports.append(_group_report(g, distinct, layouts, r))
        else:
            group_reports.append(_group_report(groups[0], distinct, layouts, main))
        timing["head_groups"] = time.perf_counter() - t0
    finally:
        bar.close()

    exact_flag = main["exact"]
    if level == "token":
        method = "token: exact token-level reachability (bitsets over all positions)"
        guarantee = "every number is exact"
    elif exact_flag:
        method = ("block: block-level reachability; every touched block pair is FULL, so the "
                  "token graph is the block graph blown up and the numbers are exact")
        guarantee = "every number is exact"
    else:
        method = ("block: block-level over-approximation (a block pair is an edge when any of its "
                  "token pairs is attended)")
        guarantee = ("receptive-field sizes and coverage are upper bounds; hop_diameter and "
                     "layers_to_full_coverage are lower bounds (hop_diameter_upper in graphs is an "
                     "upper bound from FULL blocks); strongly_connected=False, a null "
                     "layers_to_full_coverage and unreachable positions are certain; "
                     "strongly_connected=True is certain where strongly_connected_certain is")
    first_graph = main["graphs"][per_layer_pat[0]]
    final = main["per_layer"][-1]
    return DiagnosticsReport(
        seq_len=seq_len, num_heads=heads, block_size=block, layers=layers, source=str(prog),
        patterns=[str(p) for p in dict.fromkeys(per_layer_pat)], causal=causal,
        method=method, exact=exact_flag, guarantee=guarantee,
        hop_diameter=first_graph.hop_diameter, strongly_connected=first_graph.strongly_connected,
        diameter_reason=first_graph.reason,
        layers_to_full_coverage=main["full"], full_coverage_reason=main["full_reason"],
        unreachable_count=final.unreachable_count, unreachable_positions=final.unreachable_positions,
        per_layer=main["per_layer"], graphs=list(main["graphs"].values()),
        head_groups=group_reports, seconds=round(time.perf_counter() - t_start, 4),
        timing={k: round(v, 4) for k, v in timing.items()})


def _analyse(layouts, layout_causal, per_layer_pat, tail_pat, heads, level, causal, bar,
             stats_only=False) -> dict:
    """Layer-by-layer receptive fields over the given heads, plus graph properties."""
    distinct = list(dict.fromkeys(per_layer_pat + tail_pat))

    class Graphs(dict):  # built on first use: the program's tail may not be needed
        def __missing__(self, p):
            g = self[p] = _Graph(layouts[p], heads, level)
            bar("building graphs")
            return g

    graphs = Graphs()
    exact = level == "token" or all(_all_full(layouts[p], heads) for p in distinct)
    t = layouts[distinct[0]].seq_len
    visible = _visible(t, causal)
    # graph properties of each distinct layer pattern
    gdiag: dict[ir.Pattern, GraphDiagnostics] = {}
    todo = [per_layer_pat[0]] if stats_only else list(dict.fromkeys(per_layer_pat))
    for p in todo:
        gdiag[p] = _graph_diagnostics(graphs[p], str(p), causal, layout_causal[p], exact, bar.tick)
        bar("graph properties")
    # receptive fields layer by layer
    n = graphs[per_layer_pat[0]].n
    x = _identity(n)
    cyc = np.full(n, level == "token")
    full_at = None
    rows = []
    sizes = None
    saturated = False  # every receptive field complete: later layers change nothing
    for i, p in enumerate(per_layer_pat):
        if not saturated:
            x, cyc = graphs[p].step(x)
            sizes = _token_sizes(graphs[p], x, cyc, causal)
            saturated = bool((sizes == visible).all())
        incomplete = np.flatnonzero(sizes < visible)
        if full_at is None and incomplete.size == 0:
            full_at = i + 1
        if not stats_only or i == len(per_layer_pat) - 1:
            cov = sizes / visible
            gd = gdiag.get(p)
            rows.append(LayerDiagnostics(
                layer=i + 1, pattern=str(p), rf_min=int(sizes.min()), rf_median=float(np.median(sizes)),
                rf_max=int(sizes.max()), rf_mean=float(sizes.mean()), coverage_min=float(cov.min()),
                coverage_mean=float(cov.mean()), unreachable_count=int(incomplete.size),
                unreachable_positions=[int(v) for v in incomplete[:MAX_POSITIONS]],
                hop_diameter=gd.hop_diameter if gd else None,
                strongly_connected=gd.strongly_connected if gd else False,
                diameter_reason=gd.reason if gd else None,
                reach_diameter=gd.reach_diameter if gd else None))
        bar(f"layer {i + 1}")
    # layers to full coverage: the program's remaining layers, then its last pattern repeated
    reason = None
    if full_at is None:
        done = len(per_layer_pat)
        for p in tail_pat:
            x, cyc = graphs[p].step(x)
            done += 1
            s = _token_sizes(graphs[p], x, cyc, causal)
            if (s >= visible).all():
                full_at = done
                break
        if full_at is None:
            last = (tail_pat or per_layer_pat)[-1]
            more, state = _min_more_steps(graphs[last], x, cyc, causal, bar.tick)
            if more is not None:
                full_at = done + more
            else:
                reason = _never_reason(graphs[last], state, causal, str(last), done)
    bar("coverage")
    return {"per_layer": rows, "graphs": gdiag, "full": full_at, "full_reason": reason, "exact": exact,
            "first_graph": gdiag[per_layer_pat[0]]}


def _never_reason(g: _Graph, closure: np.ndarray, causal: bool, pattern: str, done: int) -> str:
    cyc = np.ones(g.n, bool) if g.level == "token" else _diagonal(_compose(g.runs, closure))
    sizes = _token_sizes(g, closure, cyc, causal)
    visible = _visible(g.seq_len, causal)
    bad = np.flatnonzero(sizes < visible)
    what = f"{bad.size} of {g.seq_len} positions never see every position they could"
    if bad.size:
        q = int(bad[0])
        if g.level == "token":
            k = _first_missing(closure[q], g.n, q + 1 if causal else g.n)
        else:
            b = q // g.block
            a = _first_missing(closure[b], g.n, b + 1 if causal else g.n)
            k = a * g.block if a >= 0 and a != b else (b * g.block if q != b * g.block else q + 1)
        what += f" (e.g. position {q} never sees position {k})"
    return (f"never: after {done} layers, repeating '{pattern}' the receptive fields stop "
            f"growing short of complete; {what}")


def _group_report(heads, distinct, layouts, r) -> HeadGroupDiagnostics:
    last = r["per_layer"][-1]
    first = r["first_graph"]
    pats = list(dict.fromkeys(_STREAM.sub("", str(layouts[p].heads[heads[0]])) for p in distinct))
    return HeadGroupDiagnostics(
        heads=list(heads), patterns=pats, rf_min=last.rf_min, rf_median=last.rf_median, rf_max=last.rf_max,
        coverage_min=last.coverage_min, unreachable_count=last.unreachable_count,
        strongly_connected=first.strongly_connected, hop_diameter=first.hop_diameter,
        layers_to_full_coverage=r["full"], full_coverage_reason=r["full_reason"], exact=r["exact"])


# ========================================================================================
# graphs for users, table and plot


def attention_graph(pattern, seq_len: int, num_heads: int = 1, block_size: int = 64, *,
                    level: str = "token", heads: list[int] | None = None):
    """The single-layer attention graph as a ``networkx.DiGraph``.

    Edge k -> q wherever query q attends key k on any of ``heads`` (default: all), plus the
    residual self-loops. ``level='token'`` has a node per position (T <= 4096: the graph
    holds every attended pair); ``level='block'`` a node per block, each edge with
    ``full=True`` when the block pair is FULL on some head.

    Example:
        >>> from patterncc import parse
        >>> import networkx as nx
        >>> g = attention_graph(parse("window(2)"), seq_len=10)
        >>> nx.diameter(g)
        5
    """
    import networkx as nx
    if isinstance(pattern, Layout):
        lay = pattern
    else:
        lay = get_layout(pattern, seq_len, num_heads, block_size)
    if level not in ("token", "block"):
        raise ValueError(f"level must be 'token' or 'block', got {level!r}")
    if level == "token" and lay.seq_len > EXACT_AUTO_MAX:
        raise ValueError(f"a token-level networkx graph at seq_len={lay.seq_len} is too large "
                         f"(limit {EXACT_AUTO_MAX}); use level='block'")
    g = _Graph(lay, list(range(lay.num_heads)) if heads is None else heads, level)
    out = nx.DiGraph()
    out.add_nodes_from(range(g.n))
    if level == "block":
        out.add_edges_from((int(k), int(q), {"full": bool(f)}) for q, k, f in zip(g.bq, g.bk, g.bfull))
        out.add_edges_from((i, i) for i in range(g.n) if not out.has_edge(i, i))
        return out
    row, col = g.runs.positions()
    out.add_edges_from(zip(col.tolist(), row.tolist()))
    return out


def receptive_field_sizes(program, seq_len: int, *, num_heads: int | None = None, layers: int | None = None,
                          block_size: int | None = None, exact: bool | None = None) -> np.ndarray:
    """[layers, T] receptive-field size of every token after each layer (same rules as
    :func:`diagnose`; block level gives upper bounds unless every touched block is FULL).

    Example:
        >>> from patterncc import parse
        >>> receptive_field_sizes(parse("window(1)"), seq_len=5, layers=2).tolist()
        [[2, 3, 3, 3, 2], [3, 4, 5, 4, 3]]
    """
    prog = _as_program(program)
    heads = int(num_heads or prog.heads or 1)
    block = int(block_size or prog.block_size or 64)
    layers = int(layers or prog.num_layers or DEFAULT_LAYERS)
    pats = _layer_patterns(prog, layers)
    layouts = {p: get_layout(p, seq_len, heads, block) for p in dict.fromkeys(pats)}
    causal = all(_is_causal(lay) for lay in layouts.values())
    token = exact if exact is not None else seq_len <= EXACT_AUTO_MAX
    level = "token" if token else "block"
    graphs = {p: _Graph(lay, list(range(heads)), level) for p, lay in layouts.items()}
    n = graphs[pats[0]].n
    x = _identity(n)
    out = np.zeros((layers, seq_len), np.int64)
    for i, p in enumerate(pats):
        x, cyc = graphs[p].step(x)
        out[i] = _token_sizes(graphs[p], x, cyc, causal)
    return out


def format_table(report: DiagnosticsReport) -> str:
    """An aligned terminal table of the per-layer results, with a summary.

    Example:
        >>> from patterncc import parse
        >>> print(format_table(diagnose(parse("window(4)"), seq_len=32, layers=2)).splitlines()[0])
        window(4): seq_len=32 heads=1 block_size=64 layers=2 [token: exact]
    """
    r = report
    kind = r.method.split(":")[0] + (": exact" if r.exact else ": bounds")
    lines = [f"{' ; '.join(r.patterns) if len(r.patterns) <= 2 else r.source.replace(chr(10), ' ; ')}: "
             f"seq_len={r.seq_len} heads={r.num_heads} block_size={r.block_size} layers={r.layers} [{kind}]"]
    header = ("layer", "rf min", "rf median", "rf max", "coverage min", "mean", "incomplete",
              "prefix diam" if r.causal else "diameter", "pattern")
    rows = []
    prev = None
    for e in r.per_layer:
        d = e.reach_diameter if r.causal else e.hop_diameter
        diam = "-" if d is None else str(d)
        pat = e.pattern if e.pattern != prev else '"'
        prev = e.pattern
        rows.append((str(e.layer), str(e.rf_min), f"{e.rf_median:g}", str(e.rf_max), f"{e.coverage_min:.4f}",
                     f"{e.coverage_mean:.4f}", str(e.unreachable_count), diam, pat))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(cells):
        out = [str(c).rjust(w) if i < len(cells) - 1 else str(c) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines.append("")
    lc = r.layers_to_full_coverage
    lines.append(f"layers to full coverage: {lc if lc is not None else 'never'}"
                 + (f"  ({r.full_coverage_reason})" if r.full_coverage_reason else ""))
    lines.append(f"layer 1 graph: strongly connected: {'yes' if r.strongly_connected else 'no'}, "
                 f"hop diameter: {r.hop_diameter if r.hop_diameter is not None else '-'}"
                 + (f"  ({r.diameter_reason})" if r.diameter_reason else ""))
    if r.causal:
        lines.append("causal: coverage is measured against each token's prefix; 'prefix diam' is the "
                     "longest shortest path from a position to a later one")
    if r.unreachable_count:
        pos = ", ".join(map(str, r.unreachable_positions))
        more = " ..." if r.unreachable_count > len(r.unreachable_positions) else ""
        lines.append(f"incomplete after layer {r.layers}: {r.unreachable_count} positions ({pos}{more})")
    if len(r.head_groups) > 1:
        lines.append("")
        gh = ("heads", "rf min", "rf median", "rf max", "coverage min", "connected", "diameter", "full at", "pattern")
        grows = [(head_ranges(g.heads), str(g.rf_min), f"{g.rf_median:g}", str(g.rf_max), f"{g.coverage_min:.4f}",
                  "yes" if g.strongly_connected else "no", str(g.hop_diameter) if g.hop_diameter is not None else "-",
                  str(g.layers_to_full_coverage) if g.layers_to_full_coverage is not None else "never",
                  " ; ".join(g.patterns)) for g in r.head_groups]
        widths = [max(len(str(x)) for x in col) for col in zip(gh, *grows)]
        lines.append(f"per head group, after layer {r.layers} (each group alone):")
        lines += [fmt(gh), fmt(["-" * w for w in widths])] + [fmt(row) for row in grows]
    if not r.exact:
        lines.append("")
        lines.append(f"note: {r.guarantee}")
    return "\n".join(lines)


def plot_growth(report: DiagnosticsReport, path) -> Path:
    """Write a PNG of receptive-field growth per layer: min / median / max sizes (left
    axis) and minimum / mean coverage (right axis). Returns the path.

    Example:
        >>> import tempfile, os
        >>> from patterncc import parse
        >>> rep = diagnose(parse("window(4)"), seq_len=64, layers=4)
        >>> p = plot_growth(rep, os.path.join(tempfile.mkdtemp(), "rf.png"))
        >>> p.stat().st_size > 0
        True
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    layers = [e.layer for e in report.per_layer]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(layers, [e.rf_min for e in report.per_layer], [e.rf_max for e in report.per_layer],
                    alpha=0.2, color="C0", label="min..max")
    ax.plot(layers, [e.rf_median for e in report.per_layer], "o-", color="C0", label="median")
    ax.plot(layers, [e.rf_min for e in report.per_layer], "--", color="C0", lw=0.8)
    ax.plot(layers, [e.rf_max for e in report.per_layer], "--", color="C0", lw=0.8)
    ax.axhline(report.seq_len, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("receptive field (positions)")
    ax.set_ylim(0, report.seq_len * 1.05)
    ax2 = ax.twinx()
    ax2.plot(layers, [e.coverage_min for e in report.per_layer], "s-", color="C3", label="coverage min")
    ax2.plot(layers, [e.coverage_mean for e in report.per_layer], "^-", color="C2", label="coverage mean", alpha=0.7)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("coverage")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    lc = report.layers_to_full_coverage
    title = (f"T={report.seq_len}, {report.num_heads} heads, "
             f"full coverage after {lc if lc is not None else 'never'} layers"
             + ("" if report.exact else " (block-level bounds)"))
    ax.set_title(title, fontsize=9)
    if len(layers) <= 24:
        ax.set_xticks(layers)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
