"""Hypothesis strategies for patterncc: random valid pattern sources, IR and layout cases.

Every strategy here generates *valid* input for the sizes it is given, so a test can
build a layout from what it draws without filtering:

* global indices lie in ``-max_index .. max_index - 1`` and global ranges inside
  ``0 .. max_index``, so a pattern is valid for every ``seq_len >= max_index``;
* ``heads=`` selections (on primitives and on ``dilate``) name heads below ``num_heads``;
* ``dilate(...)`` terms only appear in unions that contain a ``window(w)`` term.

Main entry points:

* :func:`pattern_sources` -- source text of one pattern expression (``str``);
* :func:`patterns` -- the parsed IR (``patterncc.Pattern``);
* :func:`layout_cases` -- ``(pattern, seq_len, num_heads, block_size)`` that fit together;
* :func:`program_sources` -- whole ``.attn`` programs (comments, options, ``let``,
  ``layers`` sections, newlines inside parentheses);
* :func:`token_soup` -- arbitrary sequences of the language's tokens (mostly invalid),
  for fuzzing the parser.

Example::

    from hypothesis import given
    from strategies import layout_cases

    @given(layout_cases(max_seq_len=200, max_heads=4))
    def test_something(case):
        pattern, seq_len, num_heads, block_size = case
        ...
"""
from __future__ import annotations

from hypothesis import strategies as st

import patterncc

#: Primitive names of the language (``dilate`` is a modifier, not a primitive).
PRIMITIVE_NAMES = ("window", "causal", "global", "sink", "strided", "block", "dense", "random")

#: Block sizes a layout accepts (powers of two, 16..256); tests mostly use the small ones.
BLOCK_SIZES = (16, 32, 64)


def _join(parts: list[str]) -> str:
    return ", ".join(p for p in parts if p)


@st.composite
def head_selections(draw, num_heads: int = 4) -> str:
    """The value of a ``heads=`` argument naming only heads ``< num_heads``.

    One of: a count ``2`` (heads 0 and 1), a list ``[1, 3]`` or a range ``1..3``.
    """
    kind = draw(st.sampled_from(("count", "list", "range")))
    if kind == "count":
        return str(draw(st.integers(1, num_heads)))
    if kind == "list":
        heads = draw(st.lists(st.integers(0, num_heads - 1), min_size=1, max_size=num_heads))
        return "[" + ", ".join(map(str, heads)) + "]"
    lo = draw(st.integers(0, num_heads - 1))
    hi = draw(st.integers(lo + 1, num_heads))
    return f"{lo}..{hi}"


def _heads_kwarg(draw, num_heads: int | None, probability: float = 0.25) -> str:
    if not num_heads or draw(st.floats(0, 1)) >= probability:
        return ""
    return "heads=" + draw(head_selections(num_heads))


@st.composite
def global_indices(draw, max_index: int = 64) -> str:
    """The argument of ``global(...)``: a list of indices / ranges, or a bare range.

    Indices are in ``-max_index .. max_index - 1`` (negative counts from the end) and
    ranges ``a..b`` satisfy ``0 <= a < b <= max_index``; valid for ``seq_len >= max_index``.
    """
    def a_range():
        return st.integers(0, max_index - 1).flatmap(
            lambda lo: st.integers(lo + 1, min(max_index, lo + 1 + max(1, max_index // 4))).map(
                lambda hi: f"{lo}..{hi}"))

    index = st.integers(-max_index, max_index - 1).map(str)
    if draw(st.integers(0, 5)) == 0:
        return draw(a_range())
    items = draw(st.lists(st.one_of(index, index, a_range()), min_size=1, max_size=4))
    return "[" + ", ".join(items) + "]"


@st.composite
def primitive_sources(draw, max_index: int = 64, num_heads: int | None = 4,
                      kinds: tuple[str, ...] = PRIMITIVE_NAMES) -> str:
    """Source of one primitive call with in-range arguments and, sometimes, ``heads=``.

    Sizes scale with ``max_index`` (window half-widths up to ``max_index``, strides,
    chunk lengths and sink sizes up to ``max_index``, random budgets up to
    ``2 * max_index``), so that patterns are interesting but not all dense for
    sequences of a few times ``max_index`` tokens. ``kinds`` picks the primitives.
    """
    name = draw(st.sampled_from(kinds))
    heads = _heads_kwarg(draw, num_heads)
    top = max(1, max_index)
    if name == "window":
        args = [str(draw(st.integers(0, top)))]
        if draw(st.integers(0, 6)) == 0:
            args.append(f"dilation={draw(st.integers(1, 4))}")
    elif name in ("causal", "dense"):
        if not heads:
            return name if draw(st.booleans()) else f"{name}()"
        args = []
    elif name == "global":
        args = [draw(global_indices(max_index))]
    elif name == "sink":
        args = [str(draw(st.integers(1, top)))]
    elif name == "strided":
        args = [str(draw(st.integers(1, top)))]
    elif name == "block":
        args = [str(draw(st.integers(1, top)))]
        if draw(st.booleans()):
            args.append(f"width={draw(st.integers(0, 2))}")
    elif name == "random":
        args = [str(draw(st.integers(1, 2 * top)))]
        if draw(st.integers(0, 3)):
            args.append(f"seed={draw(st.integers(0, 2 ** 16))}")
    else:  # pragma: no cover - guarded by kinds
        raise ValueError(f"unknown primitive {name!r}")
    return f"{name}({_join(args + [heads])})"


def _holds_window(src: str) -> bool:
    """Whether the normalised union still holds a window term (``dense | window(4)`` is
    just ``dense``, and the parser rejects a ``dilate`` with no window to act on)."""
    return any(isinstance(n, patterncc.ir.Window) for n in patterncc.parse(src).walk())


def _combine(draw, children, max_index, num_heads, allow_dilate):
    """Join children (source, kind, has_window, has_dilate) with '|' or '&'."""
    op = draw(st.sampled_from("|&"))
    parts = []
    for src, kind, _, top_dilate in children:
        wrap = (kind == "union" and op == "&") or top_dilate or draw(st.integers(0, 4)) == 0
        if wrap:
            nl = "\n" if draw(st.integers(0, 9)) == 0 else ""  # newlines inside parentheses
            src = f"({nl}{src}{nl})"
        parts.append(src)
    has_window = any(c[2] for c in children)
    top_dilate = False
    if (op == "|" and allow_dilate and has_window and draw(st.integers(0, 3)) == 0
            and _holds_window(f" {op} ".join(parts))):
        heads = _heads_kwarg(draw, num_heads, probability=0.6)
        parts.insert(draw(st.integers(0, len(parts))),
                     f"dilate({_join([str(draw(st.integers(1, 4))), heads])})")
        top_dilate = True
    return (f" {op} ".join(parts), "union" if op == "|" else "inter", has_window, top_dilate)


@st.composite
def pattern_sources(draw, max_index: int = 64, num_heads: int | None = 4, max_leaves: int = 6,
                    dilate: bool = True, kinds: tuple[str, ...] = PRIMITIVE_NAMES) -> str:
    """Source text of a random valid pattern expression.

    Up to ``max_leaves`` primitives (see :func:`primitive_sources`) combined with ``|``
    and ``&``, with parentheses where needed (and sometimes where not), sometimes a
    newline inside parentheses, and ``dilate(d, heads=...)`` terms in unions that hold a
    window (when ``dilate`` is true). With ``num_heads=None`` no ``heads=`` appears,
    so the pattern is valid for any head count. Valid for every ``seq_len >= max_index``.
    """
    def leaf():
        return primitive_sources(max_index, num_heads, kinds).map(
            lambda s: (s, "atom", s.startswith("window"), False))

    n = draw(st.integers(1, max_leaves))

    def build(count):
        if count == 1:
            return draw(leaf())
        k = draw(st.integers(2, min(count, 3)))
        sizes = [1] * k
        for _ in range(count - k):
            sizes[draw(st.integers(0, k - 1))] += 1
        return _combine(draw, [build(s) for s in sizes], max_index, num_heads, dilate)

    return build(n)[0]


def patterns(max_index: int = 64, num_heads: int | None = 4, max_leaves: int = 6,
             dilate: bool = True, kinds: tuple[str, ...] = PRIMITIVE_NAMES):
    """Parsed pattern IR (``patterncc.Pattern``) of :func:`pattern_sources`."""
    return pattern_sources(max_index, num_heads, max_leaves, dilate, kinds).map(patterncc.parse)


@st.composite
def layout_cases(draw, max_seq_len: int = 160, max_heads: int = 4, max_leaves: int = 5,
                 block_sizes: tuple[int, ...] = BLOCK_SIZES, min_seq_len: int = 1,
                 kinds: tuple[str, ...] = PRIMITIVE_NAMES):
    """``(pattern, seq_len, num_heads, block_size)`` that fit together.

    ``seq_len`` is drawn from ``min_seq_len .. max_seq_len`` (odd lengths and partial tail
    blocks included), the pattern's global indices are valid for it and its ``heads=``
    selections exist among ``num_heads``.
    """
    seq_len = draw(st.integers(min_seq_len, max_seq_len))
    num_heads = draw(st.integers(1, max_heads))
    block = draw(st.sampled_from(block_sizes))
    max_index = max(1, min(seq_len, draw(st.integers(1, max(1, seq_len)))))
    pattern = draw(patterns(max_index, num_heads, max_leaves, kinds=kinds))
    return pattern, seq_len, num_heads, block


@st.composite
def program_sources(draw, max_index: int = 64, num_heads: int = 4, max_layers: int = 6):
    """A whole valid ``.attn`` program and what it should mean.

    Returns ``(source, expected)`` where ``expected`` is a dict with ``block_size``,
    ``heads``, ``causal`` (the options, None/False when unset), ``layers`` (list of
    ``(start, stop, pattern_source)`` in order, empty for a single-pattern program) and
    ``single`` (the pattern source of a single-pattern program, else None). The source has
    comments, blank lines, ``let`` definitions used by name and, sometimes, sections in
    shuffled order.
    """
    lines = [draw(st.sampled_from(("", "# a generated program", "# layers below\n")))]
    block_size = draw(st.sampled_from((None, 16, 32, 64, 128)))
    heads = draw(st.sampled_from((None, num_heads)))
    causal = draw(st.sampled_from((None, False, True)))
    options = []
    if block_size is not None:
        options.append(f"block_size = {block_size}")
    if heads is not None:
        options.append(f"heads = {heads}")
    if causal is not None:
        options.append(f"causal = {'true' if causal else 'false'}")
    options = draw(st.permutations(options))
    for o in options:
        comment = draw(st.sampled_from(("", "  # option")))
        lines.append(o + comment)
    lets = {}
    for i in range(draw(st.integers(0, 2))):
        name = f"p{i}"
        lets[name] = draw(pattern_sources(max_index, num_heads, max_leaves=3))
        lines.append(f"let {name} = {lets[name]}")
        lines.append(draw(st.sampled_from(("", "# blank line above"))))

    def body():
        if lets and draw(st.booleans()):
            name = draw(st.sampled_from(sorted(lets)))
            if draw(st.booleans()):
                return name, f"({lets[name]})"
            extra = draw(primitive_sources(max_index, num_heads, kinds=("causal", "sink", "global")))
            return f"{name} | {extra}", f"({lets[name]}) | {extra}"
        src = draw(pattern_sources(max_index, num_heads, max_leaves=3))
        return src, src

    layers = []
    single = None
    if draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, max_layers - 1), max_size=3)))
        bounds = [0] + cuts + [max_layers]
        for a, b in zip(bounds, bounds[1:]):
            written, meaning = body()
            layers.append((a, b, written, meaning))
        for a, b, written, _ in draw(st.permutations(layers)):
            lines.append(f"layers {a}..{b}: {written}")
    else:
        written, single = body()
        lines.append(written)
    lines.append(draw(st.sampled_from(("", "# trailing comment"))))
    expected = {"block_size": block_size, "heads": heads, "causal": bool(causal),
                "layers": [(a, b, m) for a, b, _, m in layers], "single": single}
    return "\n".join(lines), expected


#: Tokens of the language, for :func:`token_soup`.
LANGUAGE_TOKENS = (
    *PRIMITIVE_NAMES, "dilate", "let", "layers", "heads", "seed", "width", "dilation",
    "block_size", "causal", "true", "false", "foo", "windw",
    "(", ")", "[", "]", ",", "=", ":", "..", "|", "&", "-", "+", "^", "*",
    "0", "1", "2", "-1", "64", "256", "99999999999999999999", "1.5", "'s'", '"t"',
    "\n", " ", "\t", "# comment\n", "\r\n",
)


def token_soup(max_tokens: int = 30):
    """Random sequences of the language's tokens (mostly malformed sources)."""
    return st.lists(st.sampled_from(LANGUAGE_TOKENS), max_size=max_tokens).map(
        lambda toks: "".join(t if t in "\n \t" else t + " " * (len(t) % 2) for t in toks))
