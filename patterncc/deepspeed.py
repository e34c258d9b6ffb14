"""Migration from DeepSpeed sparse attention: DeepSpeed sparsity configs as patterncc patterns.

``from_sparsity_config(kind, **params)`` takes the parameters of DeepSpeed's sparsity
config classes (``deepspeed.ops.sparse_attention.sparsity_config``), with the same names
and defaults, and returns the patterncc :class:`~patterncc.Pattern` describing the same
attention, so a model configured for DeepSpeed's (unmaintained) block-sparse kernels can
switch without rewriting its config:

    >>> import patterncc
    >>> from patterncc.deepspeed import from_sparsity_config
    >>> p = from_sparsity_config("bigbird", num_heads=8, block=16, num_random_blocks=1,
    ...                          num_sliding_window_blocks=3, num_global_blocks=1)
    >>> str(p)
    'block(16, width=1) | global(0..16) | random(16, seed=0)'
    >>> op = patterncc.compile(p, block_size=16)      # block_size = DeepSpeed's block: exact blocks

DeepSpeed describes a layout at the granularity of its ``block`` (B tokens): block row
``Q = q // B`` may attend block column ``K = k // B``. Each config maps to primitives that
are exact at that granularity, with the deviations listed below. Notation: n = window
blocks, w = n // 2, L = ``num_local_blocks``, G = ``num_global_blocks``.

==========================  ===============================================  =========================
kind (DeepSpeed class)      patterncc pattern                                deviation
==========================  ===============================================  =========================
``dense``                   ``dense``                                         none
``local_sliding_window``    ``block(B, width=w)``                             none
``bslongformer``            ``block(B, width=w) | global(<blocks>)``          none (see *global* below)
``bigbird``                 ``block(B, width=w) | global(0..G*B)              random: see *random*
                            | random(r*B, seed=seed)``
``fixed`` (needs seq_len)   ``block(L*B) | <columns>``: the global blocks      vertical-only columns: see
                            of every window, per head variant                 *columns*
``variable`` (seq_len)      windows as aligned ``block(w*B) & global(span)``  *columns*, *random*;
                            terms, ``random``, ``<columns>``                  unaligned windows cost terms
==========================  ===============================================  =========================

``attention='unidirectional'`` intersects the pattern with token-level ``causal``.
DeepSpeed's unidirectional layouts are block-level (a diagonal block is whole, so tokens
see later tokens of their own block); DeepSpeed models pass a causal ``attn_mask`` on top.
patterncc's pattern is that combination: the block layout AND causal.

Deviations:

* *random* -- DeepSpeed draws random blocks with Python's ``random`` module (unseeded,
  different every run); patterncc's ``random(r*B, seed=seed)`` draws ``r`` whole blocks
  per block row reproducibly from ``seed``, different per head even when
  ``different_layout_per_head=False``, and its blocks are the *layout's* blocks: compile
  with ``block_size=B`` (B a power of two, 16..256) for B-token random blocks. For
  unidirectional BigBird, DeepSpeed draws only among blocks at or before the row; here the
  draws are among all blocks and then cut by causality (rows keep fewer random blocks).
* *columns* -- Fixed and Variable without ``horizontal_global_attention`` make their global
  blocks *vertical only*: every query sees them, but they do not see every key. patterncc
  has no key-only primitive besides ``sink`` (every other primitive except ``causal`` is
  symmetric in q and k, so no combination yields a bidirectional key-only stripe). A
  global group starting at block 0 is exact (``sink(e*B)``); any other group becomes
  ``global`` (both directions): a superset, identical to DeepSpeed's
  ``horizontal_global_attention=True`` layout (for unidirectional: that layout, cut by
  causality; DeepSpeed rejects horizontal global attention there, so the global blocks'
  rows additionally see all earlier blocks). With ``horizontal_global_attention=True``
  the mapping is exact.
* *global* -- without ``seq_len``, global block indices past the end of a sequence raise
  a :class:`~patterncc.PatternError` when the layout is built (DeepSpeed skips them and
  clips ``global_block_end_indices``); pass ``seq_len`` to get DeepSpeed's behaviour.
* ``fixed`` and ``variable`` depend on the whole sequence length (Fixed's global blocks
  repeat in every window; Variable's last window size repeats to the end), so they need
  ``seq_len`` and the pattern is for that length. Variable windows whose start is not a
  multiple of their size are spelled as unions of aligned squares; a configuration
  needing more than 512 terms raises ``ValueError``.

Extra parameters (not DeepSpeed's): ``seq_len`` (tokens; a multiple of ``block``, as
DeepSpeed requires) and ``seed`` (for random blocks, default 0).
"""
from __future__ import annotations

import difflib

from . import ir
from .parser import parse

__all__ = ["from_sparsity_config", "KINDS"]

_ATTENTION = ("bidirectional", "unidirectional")
_COMMON = {"num_heads": None, "block": 16, "different_layout_per_head": False}
KINDS: dict[str, tuple[str, dict]] = {
    "dense": ("DenseSparsityConfig", dict(_COMMON)),
    "fixed": ("FixedSparsityConfig", {**_COMMON, "num_local_blocks": 4, "num_global_blocks": 1,
                                      "attention": "bidirectional", "horizontal_global_attention": False,
                                      "num_different_global_patterns": 1}),
    "variable": ("VariableSparsityConfig", {**_COMMON, "num_random_blocks": 0, "local_window_blocks": [4],
                                            "global_block_indices": [0], "global_block_end_indices": None,
                                            "attention": "bidirectional", "horizontal_global_attention": False}),
    "bigbird": ("BigBirdSparsityConfig", {**_COMMON, "num_random_blocks": 1, "num_sliding_window_blocks": 3,
                                          "num_global_blocks": 1, "attention": "bidirectional"}),
    "bslongformer": ("BSLongformerSparsityConfig", {**_COMMON, "num_sliding_window_blocks": 3,
                                                    "global_block_indices": [0], "global_block_end_indices": None,
                                                    "attention": "bidirectional"}),
    "local_sliding_window": ("LocalSlidingWindowSparsityConfig",
                             {"num_heads": None, "block": 16, "num_sliding_window_blocks": 3,
                              "attention": "unidirectional"}),
}
_EXTRA = {"seq_len": None, "seed": 0}
_NEEDS_SEQ_LEN = ("fixed", "variable")
MAX_TERMS = 512


def from_sparsity_config(kind: str, **params) -> ir.Pattern:
    """The patterncc pattern of a DeepSpeed sparsity config.

    ``kind`` is one of ``fixed``, ``bigbird``, ``bslongformer``, ``variable``,
    ``local_sliding_window``, ``dense`` (or the DeepSpeed class name, e.g.
    ``"FixedSparsityConfig"``, or the ``mode`` of a DeepSpeed JSON ``sparse_attention``
    section). ``params`` are the class's constructor parameters (``num_heads`` is
    required, as in DeepSpeed) plus ``seq_len`` (required for ``fixed`` and ``variable``)
    and ``seed``. Unknown kinds or parameters and invalid values raise ``ValueError``
    naming the valid ones. See the module docstring for the mapping and its deviations.

    >>> str(from_sparsity_config("local_sliding_window", num_heads=4, block=32))
    'block(32, width=1) & causal'
    >>> str(from_sparsity_config("fixed", num_heads=4, block=16, num_local_blocks=2,
    ...                          horizontal_global_attention=True, seq_len=128))
    'block(32) | global([16..32, 48..64, 80..96, 112..128])'
    """
    key = _kind(kind)
    cls_name, defaults = KINDS[key]
    unknown = sorted(set(params) - set(defaults) - set(_EXTRA))
    if unknown:
        valid = list(defaults) + list(_EXTRA)
        hints = "".join(f" (did you mean {m[0]!r} for {u!r}?)" for u in unknown
                        for m in [difflib.get_close_matches(u, valid, 1)] if m)
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for {cls_name}{hints}; valid parameters: {', '.join(defaults)} "
                         f"(DeepSpeed's) and {', '.join(_EXTRA)} (patterncc's)")
    p = {**defaults, **_EXTRA, **params}
    _check_int(p, "num_heads", 1, cls_name)
    _check_int(p, "block", 1, cls_name)
    _check_int(p, "seed", 0, cls_name)
    if p["seq_len"] is not None:
        _check_int(p, "seq_len", 1, cls_name)
        if p["seq_len"] % p["block"]:
            raise ValueError(f"seq_len={p['seq_len']} must be a multiple of block={p['block']} "
                             f"(as DeepSpeed requires)")
    elif key in _NEEDS_SEQ_LEN:
        raise ValueError(f"{cls_name} depends on the whole sequence length (its layout repeats per window); "
                         f"pass seq_len=<tokens>, e.g. from_sparsity_config({key!r}, ..., seq_len=4096)")
    if "attention" in p and p["attention"] not in _ATTENTION:
        raise ValueError(f"attention must be 'bidirectional' or 'unidirectional', got {p['attention']!r}")
    ctx = _Ctx(p, cls_name)
    if "different_layout_per_head" in p:
        ctx.bool("different_layout_per_head")
    src = _BUILDERS[key](ctx)
    return parse(src, source=f"<{cls_name}>")


def _kind(kind) -> str:
    if isinstance(kind, str):
        k = kind.strip()
        low = k.lower()
        if low in KINDS:
            return low
        for name, (cls, _) in KINDS.items():
            if k == cls or low == cls.lower() or low.replace("_", "") == name.replace("_", ""):
                return name
    valid = ", ".join(KINDS)
    hint = ""
    if isinstance(kind, str):
        m = difflib.get_close_matches(kind.lower(), list(KINDS), 1)
        hint = f" (did you mean {m[0]!r}?)" if m else ""
    raise ValueError(f"unknown DeepSpeed sparsity config kind {kind!r}{hint}; valid kinds: {valid} "
                     f"(or the DeepSpeed class names, e.g. 'FixedSparsityConfig')")


def _check_int(p: dict, name: str, minimum: int, cls_name: str) -> None:
    v = p[name]
    if v is None:
        raise ValueError(f"{name} is required for {cls_name} (as in DeepSpeed)")
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


class _Ctx:
    """Validated parameters and token-level helpers for one config."""

    def __init__(self, p: dict, cls_name: str):
        self.p, self.cls = p, cls_name
        self.b = p["block"]
        self.nb = None if p["seq_len"] is None else p["seq_len"] // self.b

    def int(self, name: str, minimum: int = 0) -> int:
        _check_int(self.p, name, minimum, self.cls)
        return self.p[name]

    def bool(self, name: str) -> bool:
        v = self.p[name]
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
        return v

    def int_list(self, name: str, minimum: int = 0, allow_none: bool = False) -> list[int] | None:
        v = self.p[name]
        if v is None and allow_none:
            return None
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError(f"{name} must be a list of integers, got {v!r}")
        if any(x < minimum for x in v):
            raise ValueError(f"{name} entries must be >= {minimum}, got {list(v)}")
        return list(v)

    @property
    def unidirectional(self) -> bool:
        return self.p["attention"] == "unidirectional"

    def check_fits(self, what: str, blocks: int) -> None:
        """DeepSpeed's check that a row holds enough blocks (only when seq_len is known)."""
        if self.nb is not None and self.nb < blocks:
            raise ValueError(f"{what}, {blocks}, must be smaller than overall number of blocks in a row, "
                             f"{self.nb} (seq_len={self.p['seq_len']}, block={self.b})")

    # -- source snippets, in tokens
    def window(self, n: int) -> str:
        w = n // 2
        return f"block({self.b}, width={w})" if w else f"block({self.b})"

    def span(self, s: int, e: int) -> str:
        return f"{s * self.b}..{e * self.b}"

    def finish(self, terms: list[str]) -> str:
        if len(terms) > MAX_TERMS:
            raise ValueError(f"this {self.cls} needs {len(terms)} pattern terms at seq_len={self.p['seq_len']} "
                             f"(over {MAX_TERMS}); use local windows whose starts are multiples of their sizes")
        src = " | ".join(f"({t})" for t in terms) if len(terms) > 1 else terms[0]
        return f"({src}) & causal" if self.unidirectional else src

    def random(self, r: int) -> list[str]:
        return [f"random({r * self.b}, seed={self.p['seed']})"] if r else []

    def global_groups(self, starts: list[int], ends: list[int] | None) -> list[tuple[int, int]]:
        """(start, end) block ranges of global groups, skipped/clipped like DeepSpeed when seq_len is known."""
        if ends is not None:
            if len(starts) != len(ends):
                raise ValueError(f"Global block start indices length, {len(starts)}, must be same as global "
                                 f"block end indices length, {len(ends)}!")
            for s, e in zip(starts, ends):
                if s >= e:
                    raise ValueError(f"Global block start index, {s}, must be smaller than global block end "
                                     f"index, {e}!")
        groups = [(s, s + 1) for s in starts] if ends is None else list(zip(starts, ends))
        if self.nb is not None:
            groups = [(s, min(e, self.nb)) for s, e in groups if s < self.nb]
        return groups

    def columns(self, groups: list[tuple[int, int]], horizontal: bool, heads: list[int] | None = None) -> list[str]:
        """Global groups: both directions with horizontal attention, else vertical-only
        (exact for a group starting at block 0 via ``sink``; ``global`` otherwise)."""
        h = "" if heads is None else f", heads=[{', '.join(map(str, heads))}]"
        out, rest = [], []
        for s, e in groups:
            if not horizontal and s == 0:
                out.append(f"sink({e * self.b}{h})")
            else:
                rest.append(self.span(s, e))
        if rest:
            out.append(f"global([{', '.join(rest)}]{h})")
        return out

    def squares(self, windows: list[tuple[int, int, int]]) -> list[str]:
        """Block-local windows (start, end, size) in blocks, ``end`` clipped to the sequence,
        as exact terms: a run of consecutive windows of one size whose starts are multiples
        of it is ``block(size*B) & global(run)``; any other window is a union of aligned
        squares (``block & global``) and rectangle pairs (``global(A) & global(B)``)."""
        terms: list[str] = []
        i = 0
        while i < len(windows):
            s, e, size = windows[i]
            if s % size == 0:
                j = i
                while j + 1 < len(windows) and windows[j + 1][2] == size and windows[j + 1][0] % size == 0:
                    j += 1
                rs, re_ = s, windows[j][1]
                blk = f"block({size * self.b})"
                terms.append(blk if (rs == 0 and re_ == self.nb) else f"{blk} & global({self.span(rs, re_)})")
                i = j + 1
                continue
            pieces = _aligned_pieces(s, e)
            for a, z in pieces:
                terms.append(f"block({(z - a) * self.b}) & global({self.span(a, z)})")
            for x in range(len(pieces)):
                for y in range(x + 1, len(pieces)):
                    terms.append(f"global({self.span(*pieces[x])}) & global({self.span(*pieces[y])})")
            i += 1
        return terms


def _aligned_pieces(s: int, e: int) -> list[tuple[int, int]]:
    """[s, e) as disjoint intervals [a, a + p) with a a multiple of p."""
    out = []
    a = s
    while a < e:
        p = 1
        while (a % (2 * p) == 0) and a + 2 * p <= e:
            p *= 2
        out.append((a, a + p))
        a += p
    return out


def _dense(c: _Ctx) -> str:
    return "dense"


def _local_sliding_window(c: _Ctx) -> str:
    n = c.int("num_sliding_window_blocks", 1)
    c.check_fits("Number of sliding window blocks", n)
    return c.finish([c.window(n)])


def _bslongformer(c: _Ctx) -> str:
    n = c.int("num_sliding_window_blocks", 1)
    c.check_fits("Number of sliding window blocks", n)
    groups = c.global_groups(c.int_list("global_block_indices"), c.int_list("global_block_end_indices", 0, True))
    return c.finish([c.window(n)] + c.columns(groups, horizontal=True))


def _bigbird(c: _Ctx) -> str:
    r = c.int("num_random_blocks")
    n = c.int("num_sliding_window_blocks", 1)
    g = c.int("num_global_blocks")
    c.check_fits("Number of random blocks", r)
    c.check_fits("Number of sliding window blocks", n)
    c.check_fits("Number of global blocks", g)
    terms = c.random(r) + [c.window(n)] + ([f"global({c.span(0, g)})"] if g else [])
    return c.finish(terms)


def _fixed(c: _Ctx) -> str:
    L = c.int("num_local_blocks", 1)
    G = c.int("num_global_blocks", 1)
    P = c.int("num_different_global_patterns", 1)
    per_head = c.bool("different_layout_per_head")
    horizontal = c.bool("horizontal_global_attention")
    if L % G:
        raise ValueError(f"Number of blocks in a local window, {L}, must be dividable by number of global "
                         f"blocks, {G}!")
    if c.unidirectional and horizontal:
        raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
    if P > 1 and not per_head:
        raise ValueError("Number of different layouts cannot be more than one when you have set a single layout "
                         "for all heads! Set different_layout_per_head to True.")
    if P > L // G:
        raise ValueError(f"Number of layout versions (num_different_global_patterns), {P}, cannot be larger than "
                         f"number of local window blocks divided by number of global blocks, {L} / {G} = {L // G}!")
    nb = c.nb
    if nb < G:
        raise ValueError(f"seq_len={c.p['seq_len']} holds {nb} blocks, fewer than num_global_blocks={G}")
    heads = c.p["num_heads"]
    terms = [f"block({L * c.b})"]
    end = nb - nb % L
    for j in range(P):
        first = L - (1 + j) * G
        groups = [(i, i + G) for i in range(first, end, L)]
        if end < nb:
            start = min(end + first, nb - G)
            groups.append((start, start + G))
        sel = None if P == 1 else [h for h in range(heads) if h % P == j]
        if sel == []:
            continue
        terms += c.columns(sorted(set(groups)), horizontal, sel)
    return c.finish(terms)


def _variable(c: _Ctx) -> str:
    r = c.int("num_random_blocks")
    sizes = c.int_list("local_window_blocks", 1)
    if not sizes:
        raise ValueError("local_window_blocks must hold at least one window size")
    horizontal = c.bool("horizontal_global_attention")
    c.bool("different_layout_per_head")
    if c.unidirectional and horizontal:
        raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
    nb = c.nb
    if nb < r:
        raise ValueError(f"Number of random blocks, {r}, must be smaller than overall number of blocks in a row, {nb}!")
    windows, s = [], 0
    for w in sizes:
        if s < nb:
            windows.append((s, min(s + w, nb), w))
        s += w
    for i in range(s, nb, sizes[-1]):
        windows.append((i, min(i + sizes[-1], nb), sizes[-1]))
    groups = c.global_groups(c.int_list("global_block_indices"), c.int_list("global_block_end_indices", 0, True))
    terms = c.random(r) + c.squares(windows) + c.columns(groups, horizontal)
    return c.finish(terms)


_BUILDERS = {"dense": _dense, "fixed": _fixed, "variable": _variable, "bigbird": _bigbird,
             "bslongformer": _bslongformer, "local_sliding_window": _local_sliding_window}
