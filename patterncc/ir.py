"""Pattern IR: small immutable nodes, one per primitive or operator.

Every node is a frozen dataclass with a canonical printed form (``str(node)`` re-parses to
an equal node). A primitive keeps its whole meaning in one place:

* ``allowed(ctx, q, k)`` -- the token predicate on broadcast integer arrays;
* ``candidates(ctx)`` -- an analytic superset of the key blocks it touches, as
  (query block, key block) pairs, never a T x T array;
* ``classify(ctx, qb, kb)`` -- exact per-block state: EMPTY, PARTIAL or FULL;
* ``estimate(ctx)`` -- an upper bound on its number of candidate blocks, so an
  intersection enumerates only its cheapest term;
* ``triton(names)`` -- the predicate as a Triton expression (used by codegen);
* ``residue(d, seq_len, align)`` -- the same pattern in *residue order* (tokens permuted
  by t mod d, classes padded to a multiple of ``align``, see :func:`residue_position`), or
  None when it has no such form; the lowering runs dilated windows in that order, where
  their blocks are FULL.

Head selection (``heads=``) and dilation are resolved by ``specialize(head)``, which
returns a head-free node: the layout and the kernels evaluate those, so primitives never
look at head numbers themselves.

Example:
    >>> import patterncc
    >>> p = patterncc.parse("global([0]) | window(256)")
    >>> str(p)
    'global([0]) | window(256)'
    >>> str(p.specialize(0))
    'global([0]) | window(256)'
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np

from .errors import PatternError, Span

EMPTY, PARTIAL, FULL = 0, 1, 2

INT, INDICES = "int", "indices"


@dataclass(frozen=True)
class Param:
    """One argument of a primitive as written in the language (also usable by keyword)."""

    name: str
    kind: str = INT
    minimum: int | None = None
    default: object = None
    required: bool = True
    meaning: str = ""


@dataclass(frozen=True)
class Ctx:
    """What a pattern needs to know to become concrete: sequence length and block size."""

    seq_len: int
    block: int

    @property
    def nblocks(self) -> int:
        return -(-self.seq_len // self.block)

    def bounds(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last token (inclusive) of each block in ``b``; the tail block is short."""
        lo = b * self.block
        hi = np.minimum(lo + self.block, self.seq_len) - 1
        return lo, hi


# ----------------------------------------------------------------------------------------
# helpers shared by the primitives' block footprints


def _diagonals(ctx: Ctx, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (qb, kb) with qb - kb in ``deltas`` inside the nb x nb block grid."""
    nb = ctx.nblocks
    deltas = np.unique(deltas[(deltas > -nb) & (deltas < nb)]).astype(np.int64)
    if deltas.size == 0:
        return _no_blocks()
    start = np.maximum(deltas, 0)
    lengths = nb - np.abs(deltas)
    qb = _ranges(start, lengths)
    kb = qb - np.repeat(deltas, lengths)
    return qb, kb


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts.astype(np.int64), lengths) + (np.arange(total, dtype=np.int64) - offsets)


def _rows_of_ranges(ctx: Ctx, k_first: np.ndarray, k_last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every query block i, key blocks k_first[i]..k_last[i] (inclusive)."""
    nb = ctx.nblocks
    k_first = np.clip(k_first, 0, nb - 1)
    k_last = np.clip(k_last, -1, nb - 1)
    lengths = np.maximum(k_last - k_first + 1, 0)
    qb = np.repeat(np.arange(nb, dtype=np.int64), lengths)
    return qb, _ranges(k_first, lengths)


def _no_blocks() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def _has_multiple(lo: np.ndarray, hi: np.ndarray, d: int) -> np.ndarray:
    """Whether the integer interval [lo, hi] holds a multiple of d (empty if lo > hi)."""
    return (lo <= hi) & ((hi // d) * d >= lo)


def _state(touched: np.ndarray, full: np.ndarray) -> np.ndarray:
    return np.where(full & touched, FULL, np.where(touched, PARTIAL, EMPTY)).astype(np.int8)


def _heads_str(heads: tuple[int, ...] | None) -> str:
    return "" if heads is None else f", heads=[{', '.join(map(str, heads))}]"


def _heads_arg(heads: tuple[int, ...] | None) -> str:
    return "" if heads is None else f"heads=[{', '.join(map(str, heads))}]"


def _within_classes(node: "Pattern", d: int, seq_len: int, align: int = 1) -> "Pattern | None":
    """Residue form of a node that keeps classes apart: same class (block(L) in residue
    order) and its within-class form; None if it does not keep classes apart."""
    if not node.keeps_classes(d):
        return None
    return intersect([Block(residue_length(seq_len, d, align)), node.residue_within(d, seq_len, align)])


def residue_length(seq_len: int, d: int, align: int = 1) -> int:
    """Positions per residue class in residue order: L = ceil(T / d), rounded up to a
    multiple of ``align`` (the lowering aligns classes to the layout block, so that no
    block holds two classes and a tile is one strided box whatever T is).

    >>> residue_length(16448, 2), residue_length(16448, 2, align=64)
    (8224, 8256)
    """
    length = -(-seq_len // d)
    return -(-length // align) * align


def residue_factor(pattern: "Pattern") -> int:
    """The residue order a head's pattern runs in: gcd of its window dilations (1: none).

    >>> import patterncc
    >>> residue_factor(patterncc.parse("window(256) | dilate(2)").specialize(0))
    2
    >>> residue_factor(patterncc.parse("window(8) | global([0])"))
    1
    """
    dilations = [n.dilation for n in pattern.walk() if isinstance(n, Window)]
    return int(np.gcd.reduce(dilations)) if dilations else 1


def residue_position(t: np.ndarray, seq_len: int, d: int, align: int = 1) -> np.ndarray:
    """Position of token ``t`` in residue order: class ``t mod d`` first, then ``t // d``.

    Class c occupies positions c*L .. c*L + L - 1 (L = :func:`residue_length`); a class
    with fewer than L tokens leaves its last positions empty. Inverse: :func:`residue_token`.

    >>> residue_position(np.arange(5), 5, 2).tolist()   # 0 2 4 | 1 3 (+ one empty slot)
    [0, 3, 1, 4, 2]
    >>> residue_position(np.arange(5), 5, 2, align=4).tolist()   # 0 2 4 . | 1 3 . .
    [0, 4, 1, 5, 2]
    """
    return (t % d) * residue_length(seq_len, d, align) + t // d


def residue_token(p: np.ndarray, seq_len: int, d: int, align: int = 1) -> np.ndarray:
    """Token at residue-order position ``p`` (T, i.e. none, for the empty slots)."""
    length = residue_length(seq_len, d, align)
    t = (p % length) * d + p // length
    return np.where((p < d * length) & (t < seq_len), t, seq_len)


# ----------------------------------------------------------------------------------------
# base classes


class Pattern:
    """Base of every IR node. Combine with ``|`` and ``&`` like in the language."""

    def __or__(self, other: "Pattern") -> "Pattern":
        return union([self, other])

    def __and__(self, other: "Pattern") -> "Pattern":
        return intersect([self, other])

    # -- analysis hooks, overridden by each node
    def specialize(self, head: int) -> "Pattern":
        raise NotImplementedError

    def allowed(self, ctx: Ctx, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def candidates(self, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def classify(self, ctx: Ctx, qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def estimate(self, ctx: Ctx) -> int:
        raise NotImplementedError

    def triton(self, names: "TritonNames") -> str:
        raise NotImplementedError

    # -- residue order (tokens permuted by t mod d; see residue_position)
    def residue(self, d: int, seq_len: int, align: int = 1) -> "Pattern | None":
        """This pattern on residue-order positions: ``p.residue(d, T, align).allowed(a, b)``
        equals ``p.allowed(token(a), token(b))`` for every pair of real tokens, evaluated on
        a sequence of d * residue_length(T, d, align) positions. None when no node expresses it."""
        return None

    def residue_within(self, d: int, seq_len: int, align: int = 1) -> "Pattern | None":
        """Like :meth:`residue`, but only exact for pairs of one residue class (enough
        inside an intersection with a term that keeps classes apart)."""
        return self.residue(d, seq_len, align)

    def keeps_classes(self, d: int) -> bool:
        """Whether every pair this pattern allows has q = k (mod d)."""
        return False

    def class_form(self, d: int) -> "Pattern | None":
        """This pattern on the class indices of residue order d, whatever the length: for
        tokens a = c + d*i and b = c + d*j of one class c, ``class_form(d).allowed(i, j)``
        equals ``allowed(a, b)``, and it depends on i - j alone (so it holds for i and j
        shifted alike). None when no such form exists or it depends on the sequence length
        (a global index moves with it). The kernels test PARTIAL tiles of a residue-order
        head in these coordinates (codegen's class_mask).

        >>> from patterncc import parse
        >>> str(parse("window(8, dilation=2) & causal").class_form(2))
        'causal & window(8)'
        >>> parse("window(8, dilation=2) | global([0])").class_form(2) is None
        True
        """
        return None

    def extent(self) -> int | None:
        """A bound on |q - k| over the pairs this pattern allows (none is farther apart),
        or None when there is none.

        >>> from patterncc import parse
        >>> parse("window(8, dilation=2) & causal").extent(), parse("causal").extent()
        (16, None)
        """
        return None

    def band(self) -> tuple[int | None, int | None] | None:
        """(lo, hi) when this pattern allows exactly the pairs lo <= q - k <= hi (a bound may
        be None: open), else None."""
        return None

    # -- structure
    def children(self) -> tuple["Pattern", ...]:
        return ()

    def walk(self) -> Iterable["Pattern"]:
        yield self
        for c in self.children():
            yield from c.walk()

    def max_head(self) -> int:
        """Largest head number named anywhere in the pattern (-1 if none)."""
        m = -1
        for node in self.walk():
            heads = getattr(node, "heads", None)
            if heads:
                m = max(m, max(heads))
        return m

    def check_heads(self, num_heads: int) -> None:
        """Raise PatternError if a ``heads=`` selection names a head >= num_heads."""
        for node in self.walk():
            heads = getattr(node, "heads", None)
            if heads and max(heads) >= num_heads:
                raise PatternError(
                    f"head {max(heads)} selected by '{node}' does not exist: "
                    f"the attention has {num_heads} heads (0..{num_heads - 1})",
                    getattr(node, "span", None),
                )

    def head_dependent(self) -> bool:
        return any(getattr(n, "heads", None) is not None or isinstance(n, Random) for n in self.walk())


@dataclass(frozen=True)
class TritonNames:
    """What a generated predicate may read, as Triton expressions and names.

    ``q`` and ``k`` are the query / key token positions already broadcast to the tile
    (``offs_m[:, None]`` and ``offs_n[None, :]`` give a [BLOCK_M, BLOCK_N] predicate; the
    backward dK/dV kernel swaps the axes). ``flags`` is the entry's int32 flag word:
    bit ``1 + i`` says the block was drawn by ``random_bits[i]`` (a head-free Random node,
    ``stream=None``). ``tables`` points at int8 per-token membership tables, one row of
    ``seq_len`` per node of ``table_nodes`` (global index sets too large to spell out).
    """

    q: str = "offs_m[:, None]"
    k: str = "offs_n[None, :]"
    head: str = "head"
    seq_len: str = "SEQ_LEN"
    block: str = "LAYOUT_BLOCK"
    flags: str = "flags"
    tables: str = "tables"
    random_bits: tuple = ()
    table_nodes: tuple = ()
    merge_bands: bool = False  # one interval test for an intersection's diagonal bands

    def as_vector(self, x: str) -> tuple[str, str]:
        """(1-D token vector, broadcast suffix) of ``q`` or ``k``: "offs_m[:, None]" gives
        ("offs_m", "[:, None]"), so a per-token value can be computed on the vector first."""
        vec, bracket, axes = x.partition("[")
        return vec, bracket + axes

    def transposed(self) -> "TritonNames":
        """The same names with the tile axes swapped ([BLOCK_N, BLOCK_M] predicates)."""
        return replace(self, q="offs_m[None, :]", k="offs_n[:, None]")


@dataclass(frozen=True)
class Primitive(Pattern):
    """A leaf of the IR. Subclasses declare ``name`` and their fields."""

    name = "?"

    def _args(self) -> list[str]:
        return []

    def __str__(self) -> str:
        args = self._args()
        heads = _heads_arg(getattr(self, "heads", None))
        if heads:
            args.append(heads)
        if not args and self.name in NULLARY:
            return self.name
        return f"{self.name}({', '.join(args)})"

    def specialize(self, head: int) -> Pattern:
        heads = getattr(self, "heads", None)
        if heads is None:
            return self
        if head not in heads:
            return Empty()
        return replace(self, heads=None)

    def map_windows(self, dilation: int) -> Pattern:
        return self


NULLARY = {"causal", "dense", "empty"}


# ----------------------------------------------------------------------------------------
# primitives


@dataclass(frozen=True)
class Window(Primitive):
    """``window(w)``: |q - k| <= w. With dilation d: |q - k| <= w*d and (q - k) mod d == 0."""

    w: int
    dilation: int = 1
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "window"
    params = (Param("w", minimum=0, meaning="half-width in tokens"),
              Param("dilation", minimum=1, default=1, required=False, meaning="dilation factor"))

    def _args(self):
        a = [str(self.w)]
        if self.dilation != 1:
            a.append(f"dilation={self.dilation}")
        return a

    def map_windows(self, dilation: int) -> Pattern:
        return replace(self, dilation=self.dilation * dilation)

    @property
    def reach(self) -> int:
        return self.w * self.dilation

    def allowed(self, ctx, q, k):
        d = q - k
        ok = np.abs(d) <= self.reach
        return ok & (d % self.dilation == 0) if self.dilation > 1 else ok

    def candidates(self, ctx):
        r = -(-self.reach // ctx.block) + 1
        return _diagonals(ctx, np.arange(-r, r + 1))

    def classify(self, ctx, qb, kb):
        q0, q1 = ctx.bounds(qb)
        k0, k1 = ctx.bounds(kb)
        lo, hi = q0 - k1, q1 - k0
        a, b = np.maximum(lo, -self.reach), np.minimum(hi, self.reach)
        touched = _has_multiple(a, b, self.dilation)
        inside = (lo >= -self.reach) & (hi <= self.reach)
        full = inside & ((self.dilation == 1) | ((lo == hi) & (lo % self.dilation == 0)))
        return _state(touched, full)

    def estimate(self, ctx):
        return ctx.nblocks * (2 * (-(-self.reach // ctx.block)) + 3)

    def band(self) -> tuple[int | None, int | None] | None:
        """(lo, hi) with lo <= q - k <= hi exactly this window's pairs (undilated only)."""
        return (-self.reach, self.reach) if self.dilation == 1 else None

    def triton(self, n):
        d = f"({n.q} - {n.k})"
        expr = f"(({d} <= {self.reach}) & ({d} >= -{self.reach}))"
        if self.dilation > 1:
            expr = f"({expr} & ({d} % {self.dilation} == 0))"
        return expr

    def keeps_classes(self, d):
        return self.dilation % d == 0

    def residue(self, d, seq_len, align=1):
        return _within_classes(self, d, seq_len, align)

    def residue_within(self, d, seq_len, align=1):
        return self.class_form(d)

    def class_form(self, d):
        # Same class: q - k = d * delta. Allowed iff |delta| <= reach // d and d * delta is
        # a multiple of the dilation, i.e. delta a multiple of dilation / gcd(d, dilation).
        step = int(self.dilation // np.gcd(d, self.dilation))
        return Window((self.reach // d) // step, step)

    def extent(self):
        return self.reach


@dataclass(frozen=True)
class Causal(Primitive):
    """``causal``: k <= q."""

    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "causal"
    params = ()

    def allowed(self, ctx, q, k):
        return k <= q

    def candidates(self, ctx):
        nb = ctx.nblocks
        return _rows_of_ranges(ctx, np.zeros(nb, np.int64), np.arange(nb, dtype=np.int64))

    def classify(self, ctx, qb, kb):
        q0, q1 = ctx.bounds(qb)
        k0, k1 = ctx.bounds(kb)
        return _state(k0 <= q1, k1 <= q0)

    def estimate(self, ctx):
        nb = ctx.nblocks
        return nb * (nb + 1) // 2

    def band(self) -> tuple[int | None, int | None]:
        """(lo, hi) with lo <= q - k <= hi exactly the allowed pairs: q - k >= 0."""
        return (0, None)

    def triton(self, n):
        return f"({n.k} <= {n.q})"

    def residue_within(self, d, seq_len, align=1):
        return self.class_form(d)

    def class_form(self, d):
        return Causal()  # inside one class, index order is token order

    def residue(self, d, seq_len, align=1):
        return None


@dataclass(frozen=True)
class Dense(Primitive):
    """``dense``: every pair."""

    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "dense"
    params = ()

    def allowed(self, ctx, q, k):
        return np.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), bool)

    def candidates(self, ctx):
        nb = ctx.nblocks
        return _rows_of_ranges(ctx, np.zeros(nb, np.int64), np.full(nb, nb - 1, np.int64))

    def classify(self, ctx, qb, kb):
        return np.full(np.shape(qb), FULL, np.int8)

    def estimate(self, ctx):
        return ctx.nblocks ** 2

    def triton(self, n):
        return "True"

    def residue(self, d, seq_len, align=1):
        return Dense()

    def class_form(self, d):
        return Dense()


@dataclass(frozen=True)
class Empty(Primitive):
    """No pair at all. Only appears after ``specialize`` removes a term from a head."""

    name = "empty"
    params = ()

    def allowed(self, ctx, q, k):
        return np.zeros(np.broadcast_shapes(np.shape(q), np.shape(k)), bool)

    def candidates(self, ctx):
        return _no_blocks()

    def classify(self, ctx, qb, kb):
        return np.zeros(np.shape(qb), np.int8)

    def estimate(self, ctx):
        return 0

    def triton(self, n):
        return "False"

    def residue(self, d, seq_len, align=1):
        return Empty()

    def class_form(self, d):
        return Empty()

    def keeps_classes(self, d):
        return True

    def extent(self):
        return 0


@dataclass(frozen=True)
class IndexRange:
    """``a..b`` inside a global index list: a <= i < b."""

    start: int
    stop: int

    def __str__(self):
        return f"{self.start}..{self.stop}"


@dataclass(frozen=True)
class Global(Primitive):
    """``global(idx)``: q in idx or k in idx. Negative indices count from the end."""

    items: tuple[int | IndexRange, ...]
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "global"
    params = (Param("items", INDICES, meaning="token indices: a list, a range a..b, or both"),)

    def _args(self):
        if len(self.items) == 1 and isinstance(self.items[0], IndexRange):
            return [str(self.items[0])]
        return [f"[{', '.join(map(str, self.items))}]"]

    def indices(self, seq_len: int) -> np.ndarray:
        """The sorted distinct token positions for a sequence of ``seq_len`` tokens."""
        return _global_indices(self, seq_len)

    def _member(self, ctx) -> np.ndarray:
        return _global_member(self, ctx.seq_len)

    def allowed(self, ctx, q, k):
        m = self._member(ctx)
        return m[q] | m[k]

    def _rows(self, ctx) -> np.ndarray:
        return np.unique(self.indices(ctx.seq_len) // ctx.block)

    def candidates(self, ctx):
        nb = ctx.nblocks
        rows = self._rows(ctx)
        all_b = np.arange(nb, dtype=np.int64)
        qb = np.concatenate([np.repeat(rows, nb), np.tile(all_b, rows.size)])
        kb = np.concatenate([np.tile(all_b, rows.size), np.repeat(rows, nb)])
        return qb, kb

    def classify(self, ctx, qb, kb):
        count = np.bincount(self.indices(ctx.seq_len) // ctx.block, minlength=ctx.nblocks)
        lo, hi = ctx.bounds(np.arange(ctx.nblocks))
        whole = count == (hi - lo + 1)
        touched = (count[qb] > 0) | (count[kb] > 0)
        return _state(touched, whole[qb] | whole[kb])

    def estimate(self, ctx):
        return 2 * ctx.nblocks * min(ctx.nblocks, self.size_bound(ctx.seq_len))

    def size_bound(self, seq_len: int) -> int:
        return sum(1 if isinstance(i, int) else max(0, i.stop - i.start) for i in self.items)

    def triton(self, n):
        return f"({self._member_expr(n, n.q)} | {self._member_expr(n, n.k)})"

    def _member_expr(self, n, x):
        if self in n.table_nodes:
            # Many indices: one int8 load from this node's per-token membership table.
            i = n.table_nodes.index(self)
            base = n.tables if i == 0 else f"({n.tables} + {n.seq_len}.to(tl.int64) * {i})"
            # Loaded as a vector and then broadcast: a [BLOCK_M, 1] pointer load would give
            # Triton a one-row-per-thread layout to build the softmax around (exp2 computed
            # twice per element in 128-row, 4-warp tiles; tests/test_codegen.py).
            vec, axes = n.as_vector(x)
            return f"(tl.load({base} + {vec}, mask={vec} < {n.seq_len}, other=0) != 0){axes}"
        terms = []
        for i in self.items:
            if isinstance(i, IndexRange):
                terms.append(f"(({x} >= {i.start}) & ({x} < {i.stop}))")
            elif i < 0:
                terms.append(f"({x} == {n.seq_len} - {-i})")
            else:
                terms.append(f"({x} == {i})")
        return "(" + " | ".join(terms) + ")"

    def residue(self, d, seq_len, align=1):
        moved = np.sort(residue_position(self.indices(seq_len), seq_len, d, align))
        return Global(_as_items(moved))


def _as_items(idx: np.ndarray) -> tuple[int | IndexRange, ...]:
    """Sorted distinct indices as a global() item list, runs of consecutive ones as ranges."""
    if idx.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [idx.size]])
    return tuple(int(idx[a]) if b - a == 1 else IndexRange(int(idx[a]), int(idx[b - 1]) + 1)
                 for a, b in zip(starts, stops))


@functools.lru_cache(maxsize=256)
def _global_indices(node: Global, seq_len: int) -> np.ndarray:
    parts = []
    for item in node.items:
        if isinstance(item, IndexRange):
            if item.stop > seq_len:
                raise PatternError(
                    f"global range {item} reaches past the end of the sequence "
                    f"(seq_len={seq_len}, valid positions 0..{seq_len - 1})",
                    node.span,
                )
            parts.append(np.arange(item.start, item.stop, dtype=np.int64))
        else:
            i = item + seq_len if item < 0 else item
            if not 0 <= i < seq_len:
                raise PatternError(
                    f"global index {item} is outside the sequence "
                    f"(seq_len={seq_len}: valid indices are {-seq_len}..{seq_len - 1})",
                    node.span,
                )
            parts.append(np.array([i], np.int64))
    out = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _global_member(node: Global, seq_len: int) -> np.ndarray:
    m = np.zeros(seq_len, bool)
    m[_global_indices(node, seq_len)] = True
    m.flags.writeable = False
    return m


@dataclass(frozen=True)
class Sink(Primitive):
    """``sink(n)``: k < n (the first n tokens are visible to every query)."""

    n: int
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "sink"
    params = (Param("n", minimum=1, meaning="number of sink tokens"),)

    def _args(self):
        return [str(self.n)]

    def allowed(self, ctx, q, k):
        return np.broadcast_to(k < self.n, np.broadcast_shapes(np.shape(q), np.shape(k)))

    def candidates(self, ctx):
        nb = ctx.nblocks
        last = min(nb, -(-self.n // ctx.block)) - 1
        return _rows_of_ranges(ctx, np.zeros(nb, np.int64), np.full(nb, last, np.int64))

    def classify(self, ctx, qb, kb):
        k0, k1 = ctx.bounds(kb)
        return _state(k0 < self.n, k1 < self.n)

    def estimate(self, ctx):
        return ctx.nblocks * min(ctx.nblocks, -(-self.n // ctx.block))

    def triton(self, n):
        return f"({n.k} < {self.n})"


@dataclass(frozen=True)
class Strided(Primitive):
    """``strided(s)``: (q - k) mod s == 0."""

    s: int
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "strided"
    params = (Param("s", minimum=1, meaning="stride in tokens"),)

    def _args(self):
        return [str(self.s)]

    def allowed(self, ctx, q, k):
        return (q - k) % self.s == 0

    def candidates(self, ctx):
        t = ctx.seq_len
        multiples = np.arange(-((t - 1) // self.s), (t - 1) // self.s + 1, dtype=np.int64) * self.s
        deltas = np.concatenate([multiples // ctx.block, -((-multiples) // ctx.block)])
        return _diagonals(ctx, deltas)

    def classify(self, ctx, qb, kb):
        q0, q1 = ctx.bounds(qb)
        k0, k1 = ctx.bounds(kb)
        lo, hi = q0 - k1, q1 - k0
        full = (self.s == 1) | ((lo == hi) & (lo % self.s == 0))
        return _state(_has_multiple(lo, hi, self.s), full)

    def estimate(self, ctx):
        nb = ctx.nblocks
        return nb * min(nb, 2 * (-(-ctx.seq_len // self.s)) + 2)

    def triton(self, n):
        return f"((({n.q} - {n.k}) % {self.s}) == 0)"

    def keeps_classes(self, d):
        return self.s % d == 0

    def residue(self, d, seq_len, align=1):
        return _within_classes(self, d, seq_len, align)

    def residue_within(self, d, seq_len, align=1):
        return self.class_form(d)

    def class_form(self, d):
        return Strided(int(self.s // np.gcd(self.s, d)))  # q - k = d * delta


@dataclass(frozen=True)
class Block(Primitive):
    """``block(b)``: floor(q / b) == floor(k / b) (block-local attention).

    ``block(b, width=n)`` also lets each chunk see its n neighbouring chunks on either
    side, |floor(q / b) - floor(k / b)| <= n: BigBird's block-level sliding window.
    """

    b: int
    width: int = 0
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "block"
    params = (Param("b", minimum=1, meaning="block length in tokens"),
              Param("width", minimum=0, default=0, required=False, meaning="neighbouring blocks on each side"))

    def _args(self):
        return [str(self.b)] + ([f"width={self.width}"] if self.width else [])

    def allowed(self, ctx, q, k):
        return np.abs(q // self.b - k // self.b) <= self.width

    def candidates(self, ctx):
        q0, q1 = ctx.bounds(np.arange(ctx.nblocks, dtype=np.int64))
        first_key = np.maximum(q0 // self.b - self.width, 0) * self.b
        last_key = np.minimum((q1 // self.b + self.width + 1) * self.b, ctx.seq_len) - 1
        return _rows_of_ranges(ctx, first_key // ctx.block, last_key // ctx.block)

    def classify(self, ctx, qb, kb):
        q0, q1 = ctx.bounds(qb)
        k0, k1 = ctx.bounds(kb)
        a0, a1, b0, b1 = q0 // self.b, q1 // self.b, k0 // self.b, k1 // self.b
        gap = np.maximum(a0, b0) - np.minimum(a1, b1)  # distance between the chunk ranges
        farthest = np.maximum(a1 - b0, b1 - a0)
        return _state(gap <= self.width, farthest <= self.width)

    def estimate(self, ctx):
        return ctx.nblocks * ((2 * self.width + 1) * -(-self.b // ctx.block) + 2)

    def triton(self, n):
        d = f"(({n.q} // {self.b}) - ({n.k} // {self.b}))"
        if self.width == 0:
            return f"({d} == 0)"
        return f"(({d} <= {self.width}) & ({d} >= -{self.width}))"


@dataclass(frozen=True)
class Random(Primitive):
    """``random(r, seed=s)``: BigBird block-random attention.

    Each query block attends ceil(r / block) distinct whole key blocks, drawn from the
    seed and, after ``specialize``, the head number, so heads differ but every process
    and device draws the same blocks.
    """

    r: int
    seed: int = 0
    heads: tuple[int, ...] | None = None
    stream: int | None = None  # the head it was specialised for; None in parsed IR
    span: Span | None = field(default=None, compare=False, repr=False)
    name = "random"
    params = (Param("r", minimum=1, meaning="random keys per query block, in tokens"),
              Param("seed", minimum=0, default=0, required=False, meaning="random seed"))

    def _args(self):
        a = [str(self.r), f"seed={self.seed}"]
        if self.stream is not None:
            a.append(f"stream={self.stream}")
        return a

    def specialize(self, head):
        if self.heads is not None and head not in self.heads:
            return Empty()
        return replace(self, heads=None, stream=head)

    def chosen(self, ctx: Ctx) -> np.ndarray:
        """[nblocks, per_row] key blocks drawn for each query block."""
        return _random_blocks(self.r, self.seed, self.stream or 0, ctx.block, ctx.nblocks)

    def allowed(self, ctx, q, k):
        sel = self.chosen(ctx)[q // ctx.block]
        return (sel == (k // ctx.block)[..., None]).any(-1)

    def candidates(self, ctx):
        sel = self.chosen(ctx)
        qb = np.repeat(np.arange(ctx.nblocks, dtype=np.int64), sel.shape[1])
        return qb, sel.reshape(-1)

    def classify(self, ctx, qb, kb):
        sel = self.chosen(ctx)
        hit = (sel[qb] == kb[:, None]).any(-1)
        return _state(hit, hit)

    def estimate(self, ctx):
        return ctx.nblocks * min(ctx.nblocks, -(-self.r // ctx.block))

    def triton(self, n):
        # Random blocks are whole blocks: the layout marks them FULL. Inside a PARTIAL
        # block (random intersected with something) the kernel reads the entry's flag bit,
        # set at lowering time from classify(); the bit is a scalar, true for the whole tile.
        key = replace(self, heads=None, stream=None)
        if key not in n.random_bits:
            raise NotImplementedError(f"{self} has no flag bit: lower it through the codegen, "
                                      "which assigns one bit per random term")
        return f"((({n.flags} >> {1 + n.random_bits.index(key)}) & 1) != 0)"


@functools.lru_cache(maxsize=512)
def _random_blocks(r: int, seed: int, stream: int, block: int, nb: int) -> np.ndarray:
    per_row = min(nb, -(-r // block))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))
    chosen = np.empty((nb, per_row), np.int64)
    # Floyd's sampling, vectorised over query blocks: per_row distinct draws per row.
    for i, j in enumerate(range(nb - per_row, nb)):
        t = rng.integers(0, j + 1, size=nb)
        dup = (chosen[:, :i] == t[:, None]).any(1)
        chosen[:, i] = np.where(dup, j, t)
    chosen.sort(axis=1)
    chosen.flags.writeable = False
    return chosen


# ----------------------------------------------------------------------------------------
# operators


def _paren(node: Pattern, inside: type) -> str:
    s = str(node)
    if isinstance(node, (Union, Dilate)) or (isinstance(node, Intersect) and inside is Intersect):
        return f"({s})"
    return s


@dataclass(frozen=True)
class Union(Pattern):
    """``a | b | ...``: a pair is allowed if any term allows it."""

    terms: tuple[Pattern, ...]

    def children(self):
        return self.terms

    def __str__(self):
        return " | ".join(_paren(t, Union) if isinstance(t, Dilate) else str(t) for t in self.terms)

    def specialize(self, head):
        return union(t.specialize(head) for t in self.terms)

    def map_windows(self, dilation):
        return union(t.map_windows(dilation) for t in self.terms)

    def allowed(self, ctx, q, k):
        out = self.terms[0].allowed(ctx, q, k)
        for t in self.terms[1:]:
            out = out | t.allowed(ctx, q, k)
        return out

    def candidates(self, ctx):
        parts = [t.candidates(ctx) for t in self.terms]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def classify(self, ctx, qb, kb):
        # Exact about emptiness; a block covered only by the union of PARTIAL terms stays
        # PARTIAL (the predicate is then evaluated, which is correct if not the fastest).
        out = self.terms[0].classify(ctx, qb, kb)
        for t in self.terms[1:]:
            out = np.maximum(out, t.classify(ctx, qb, kb))
        return out

    def estimate(self, ctx):
        return sum(t.estimate(ctx) for t in self.terms)

    def triton(self, n):
        return "(" + " | ".join(t.triton(n) for t in self.terms) + ")"

    def keeps_classes(self, d):
        return all(t.keeps_classes(d) for t in self.terms)

    def residue(self, d, seq_len, align=1):
        return _combine(union, [t.residue(d, seq_len, align) for t in self.terms])

    def residue_within(self, d, seq_len, align=1):
        return _combine(union, [t.residue_within(d, seq_len, align) for t in self.terms])

    def class_form(self, d):
        return _combine(union, [t.class_form(d) for t in self.terms])

    def extent(self):
        reach = [t.extent() for t in self.terms]
        return None if None in reach else max(reach)


def _combine(op, parts: list) -> Pattern | None:
    return None if any(p is None for p in parts) else op(parts)


@dataclass(frozen=True)
class Intersect(Pattern):
    """``a & b & ...``: a pair is allowed if every term allows it."""

    terms: tuple[Pattern, ...]

    def children(self):
        return self.terms

    def __str__(self):
        return " & ".join(_paren(t, Intersect) for t in self.terms)

    def specialize(self, head):
        return intersect(t.specialize(head) for t in self.terms)

    def map_windows(self, dilation):
        return intersect(t.map_windows(dilation) for t in self.terms)

    def allowed(self, ctx, q, k):
        out = self.terms[0].allowed(ctx, q, k)
        for t in self.terms[1:]:
            out = out & t.allowed(ctx, q, k)
        return out

    def candidates(self, ctx):
        # Enumerate only the cheapest term; classify() filters by the others.
        return min(self.terms, key=lambda t: t.estimate(ctx)).candidates(ctx)

    def classify(self, ctx, qb, kb):
        states = np.stack([t.classify(ctx, qb, kb) for t in self.terms])
        out = states.min(0)
        # Two PARTIAL terms may not overlap inside a block: settle those at token level
        # so that no listed block is empty. Rare in practice (e.g. a dilated window's
        # diagonal block intersected with causal), and bounded by touched blocks.
        unsure = np.flatnonzero((out == PARTIAL) & ((states == PARTIAL).sum(0) >= 2))
        if unsure.size:
            out[unsure] = np.where(_blocks_any(self, ctx, qb[unsure], kb[unsure]), PARTIAL, EMPTY)
        return out

    def estimate(self, ctx):
        return min(t.estimate(ctx) for t in self.terms)

    def triton_terms(self, n: "TritonNames") -> list[str]:
        """The Triton tests of the terms, whose conjunction is this pattern's predicate.

        With ``n.merge_bands``, diagonal bands (causal, undilated windows) meet in one
        interval of q - k: one range test per pair, which the compiler turns into a single
        unsigned compare, instead of one test per term (the mask is a large part of a
        PARTIAL tile's instructions)."""
        bands = [b for b in (t.band() for t in self.terms) if b is not None]
        if not n.merge_bands or len(bands) < 2:
            return [t.triton(n) for t in self.terms]
        los = [lo for lo, _ in bands if lo is not None]
        his = [hi for _, hi in bands if hi is not None]
        merged = _band_triton(n, max(los) if los else None, min(his) if his else None)
        return [merged] + [t.triton(n) for t in self.terms if t.band() is None]

    def triton(self, n):
        return "(" + " & ".join(self.triton_terms(n)) + ")"

    def keeps_classes(self, d):
        return any(t.keeps_classes(d) for t in self.terms)

    def residue(self, d, seq_len, align=1):
        if self.keeps_classes(d):
            # One term keeps classes apart: the others need only be exact inside a class.
            within = [t.residue_within(d, seq_len, align) for t in self.terms]
            return _combine(intersect, [Block(residue_length(seq_len, d, align))] + within)
        return _combine(intersect, [t.residue(d, seq_len, align) for t in self.terms])

    def residue_within(self, d, seq_len, align=1):
        return _combine(intersect, [t.residue_within(d, seq_len, align) for t in self.terms])

    def class_form(self, d):
        return _combine(intersect, [t.class_form(d) for t in self.terms])

    def extent(self):
        reach = [r for r in (t.extent() for t in self.terms) if r is not None]
        return min(reach) if reach else None


def _band_triton(n: "TritonNames", lo: int | None, hi: int | None) -> str:
    """Triton test of lo <= q - k <= hi (either bound may be absent; an empty interval is False)."""
    d = f"({n.q} - {n.k})"
    if lo is not None and hi is not None and lo > hi:
        return f"({d} != {d})"
    tests = ([f"({d} >= {lo})"] if lo is not None else []) + ([f"({d} <= {hi})"] if hi is not None else [])
    return "(" + " & ".join(tests) + ")" if tests else f"({d} == {d})"


def _blocks_any(node: Pattern, ctx: Ctx, qb: np.ndarray, kb: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Whether each listed block holds at least one allowed pair (token-level check)."""
    out = np.zeros(qb.size, bool)
    offs = np.arange(ctx.block, dtype=np.int64)
    for s in range(0, qb.size, chunk):
        q = qb[s:s + chunk, None, None] * ctx.block + offs[None, :, None]
        k = kb[s:s + chunk, None, None] * ctx.block + offs[None, None, :]
        valid = (q < ctx.seq_len) & (k < ctx.seq_len)
        qc, kc = np.minimum(q, ctx.seq_len - 1), np.minimum(k, ctx.seq_len - 1)
        out[s:s + chunk] = (node.allowed(ctx, qc, kc) & valid).any(axis=(1, 2))
    return out


@dataclass(frozen=True)
class Dilate(Pattern):
    """``pattern | dilate(d, heads=h)``: on the selected heads every window(w) term of
    ``pattern`` becomes |q - k| <= w*d and (q - k) mod d == 0 (Longformer dilation)."""

    inner: Pattern
    d: int
    heads: tuple[int, ...] | None = None
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.inner,)

    def __str__(self):
        inner = f"({self.inner})" if isinstance(self.inner, Dilate) else str(self.inner)
        heads = _heads_str(self.heads)
        return f"{inner} | dilate({self.d}{heads})"

    def specialize(self, head):
        inner = self.inner.specialize(head)
        if self.heads is None or head in self.heads:
            inner = inner.map_windows(self.d)
        return inner

    def map_windows(self, dilation):
        return Dilate(self.inner.map_windows(dilation), self.d, self.heads, self.span)

    def _unspecialized(self):
        raise TypeError("evaluate a Dilate node through specialize(head) first")

    allowed = candidates = classify = estimate = triton = lambda self, *a: self._unspecialized()


# ----------------------------------------------------------------------------------------
# smart constructors: the only way composite nodes are built, so the IR stays normalised


def _order(terms: Iterable[Pattern]) -> tuple[Pattern, ...]:
    unique = {}
    for t in terms:
        unique.setdefault(t, t)
    return tuple(sorted(unique.values(), key=lambda t: (type(t).__name__ != "Dilate", str(t))))


def union(terms: Iterable[Pattern]) -> Pattern:
    """Flattened, de-duplicated, canonically ordered union (Empty dropped).

    >>> str(union([Causal(), Window(4), Causal()]))
    'causal | window(4)'
    """
    flat: list[Pattern] = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, Union) else [t])
    flat = [t for t in flat if not isinstance(t, Empty)]
    if any(isinstance(t, Dense) and t.heads is None for t in flat):
        return next(t for t in flat if isinstance(t, Dense) and t.heads is None)
    out = _order(flat)
    if not out:
        return Empty()
    return out[0] if len(out) == 1 else Union(out)


def intersect(terms: Iterable[Pattern]) -> Pattern:
    """Flattened, de-duplicated, canonically ordered intersection (Dense dropped).

    >>> str(intersect([Window(4), Dense(), Causal()]))
    'causal & window(4)'
    """
    flat: list[Pattern] = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, Intersect) else [t])
    if any(isinstance(t, Empty) for t in flat):
        return Empty()
    kept = [t for t in flat if not (isinstance(t, Dense) and t.heads is None)]
    out = _order(kept)
    if not out:
        return Dense()
    return out[0] if len(out) == 1 else Intersect(out)


def dilate(inner: Pattern, d: int, heads: tuple[int, ...] | None = None, span: Span | None = None) -> Pattern:
    """``inner | dilate(d, heads=...)``; a no-op when there is no window left to dilate.

    >>> str(dilate(Window(4), 2, (0,)).specialize(0)), str(dilate(Causal(), 2))
    ('window(4, dilation=2)', 'causal')
    """
    if d == 1 or not any(isinstance(n, Window) for n in inner.walk()):
        return inner  # nothing left to dilate (e.g. a window absorbed by dense)
    return Dilate(inner, d, heads, span)


# ----------------------------------------------------------------------------------------
# programs: per-layer patterns from a .attn file


@dataclass(frozen=True)
class Section:
    """``layers start..stop: pattern`` (stop exclusive)."""

    start: int
    stop: int
    pattern: Pattern

    def __str__(self):
        return f"layers {self.start}..{self.stop}: {self.pattern}"


@dataclass(frozen=True)
class Program:
    """A whole ``.attn`` source: options and one pattern per range of layers.

    A source with a single pattern and no ``layers`` sections has one section covering
    every layer (``num_layers`` is None then).
    """

    sections: tuple[Section, ...]
    block_size: int | None = None
    heads: int | None = None
    causal: bool = False
    source: str = field(default="<string>", compare=False)

    @property
    def num_layers(self) -> int | None:
        return None if self.single else self.sections[-1].stop

    @property
    def single(self) -> bool:
        return len(self.sections) == 1 and self.sections[0].stop < 0

    def pattern_for_layer(self, layer: int) -> Pattern:
        if self.single:
            return self.sections[0].pattern
        for s in self.sections:
            if s.start <= layer < s.stop:
                return s.pattern
        raise IndexError(f"layer {layer} is outside this program's layers 0..{self.num_layers - 1}")

    def options(self) -> dict:
        return {"block_size": self.block_size, "heads": self.heads, "causal": self.causal}

    def __str__(self):
        lines = []
        if self.block_size is not None:
            lines.append(f"block_size = {self.block_size}")
        if self.heads is not None:
            lines.append(f"heads = {self.heads}")
        if self.causal:
            lines.append("causal = true")
        if self.single:
            lines.append(str(self.sections[0].pattern))
        else:
            lines.extend(str(s) for s in self.sections)
        return "\n".join(lines)
