"""Parser: pattern source text -> Pattern IR (via the lark grammar in ``grammar/``).

``parse`` reads one pattern expression, ``parse_program`` a whole ``.attn`` source
(options, ``let`` definitions, ``layers a..b:`` sections) and ``load`` a file. Every
problem in the source is reported as :class:`patterncc.PatternError`, with the line, the
column and a caret; nothing else escapes for any input string.

Example:
    >>> from patterncc import parse
    >>> str(parse("window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)"))
    'global([0]) | random(64, seed=1) | window(256) | dilate(2, heads=[0, 1])'
"""
from __future__ import annotations

import difflib
import re
import functools
from pathlib import Path
from typing import Iterator

import lark
from lark import Lark, Token, Tree

from . import ir
from ._data import read_text
from .errors import PatternError, Span

PRIMITIVES: dict[str, type[ir.Primitive]] = {
    cls.name: cls
    for cls in (ir.Window, ir.Causal, ir.Global, ir.Sink, ir.Strided, ir.Block, ir.Dense, ir.Random)
}
MODIFIERS = ("dilate",)
OPTIONS = {"block_size": "a power of two from 16 to 256, e.g. block_size = 64",
           "heads": "a positive integer, e.g. heads = 12",
           "causal": "true or false"}
MAX_INT = 2 ** 40
MAX_NESTING = 200  # brackets in the source
MAX_SOURCE = 64 * 1024  # characters; parsing stays well under a second up to this size
MAX_DEPTH = 64  # '|' / '&' / dilate levels of one pattern (bounds recursion in every later stage)
MAX_TERMS = 50_000  # IR nodes of one pattern, 'let' definitions expanded
MAX_WORK = 200_000  # IR nodes handled while building a whole program (bounds parse time)
MAX_HEADS = 65536
MAX_LAYERS = 65536
MAX_BLOCK = 256

_READABLE = {
    "NAME": "a name", "SIGNED_INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','",
    "VBAR": "'|'", "AMPERSAND": "'&'", "EQUAL": "'='", "COLON": "':'", "__ANON_0": "'..'",
    "_NL": "end of line", "$END": "end of input", "LET": "'let'", "LAYERS": "'layers'",
}


class _IgnoreNewlinesInBrackets:
    """Postlexer: a newline inside (...) or [...] is just whitespace."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    text = read_text("grammar", "patterncc.lark")
    return Lark(text, parser="lalr", propagate_positions=True, postlex=_IgnoreNewlinesInBrackets(),
                maybe_placeholders=False)


# ----------------------------------------------------------------------------------------
# public entry points


def parse(src: str, *, source: str = "<string>") -> ir.Pattern:
    """Parse one pattern expression into its normalised IR.

    Raises :class:`PatternError` (and nothing else) for any malformed string.

    >>> str(parse("window(1024) & causal"))
    'causal & window(1024)'
    """
    program = parse_program(src, source=source)
    if not program.single or any(v not in (None, False) for v in program.options().values()):
        raise PatternError(
            "this source holds options or layer sections; read it with "
            "patterncc.parse_program() or patterncc.load()", source=source)
    return program.sections[0].pattern


def parse_program(src: str, *, source: str = "<string>") -> ir.Program:
    """Parse a ``.attn`` source: options, ``let`` definitions and per-layer sections.

    >>> p = parse_program("let local = window(4)\\nlayers 0..2: local\\nlayers 2..4: local | dilate(2)")
    >>> p.num_layers
    4
    """
    if not isinstance(src, str):
        raise PatternError(f"a pattern source must be a str, not {type(src).__name__}", source=source)
    _check_size(src, source)
    tree = _syntax(src, source)
    try:
        return _Builder(src, source).program(tree)
    except RecursionError:  # a safety net: _check_size and the builder bound the nesting first
        raise PatternError(f"pattern nested too deeply (the limit is {MAX_NESTING} brackets and "
                           f"{MAX_DEPTH} levels of operators)", source=source) from None


def load(path: str | Path) -> ir.Program:
    """Read and parse a ``.attn`` file (errors name the file).

    >>> prog = load("examples/longformer.attn")
    >>> prog.num_layers, prog.heads, str(prog.pattern_for_layer(0))
    (12, 12, 'global([0]) | window(32)')
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PatternError(f"cannot read pattern file: {e}", source=str(path)) from None
    return parse_program(text, source=str(path))


# ----------------------------------------------------------------------------------------
# syntax errors


def _check_size(src: str, source: str) -> None:
    if len(src) > MAX_SOURCE:
        raise PatternError(f"source is {len(src)} characters long; the limit is {MAX_SOURCE} "
                           f"(64 KiB; write long index lists as ranges, e.g. global(0..4096))", source=source)
    depth = 0
    code = _blank_comments_and_strings(src)
    for i, ch in enumerate(code):
        if ch in "([":
            depth += 1
            if depth > MAX_NESTING:
                raise PatternError(f"brackets nested more than {MAX_NESTING} deep",
                                   _span_at(src, source, i, i + 1))
        elif ch in ")]":
            depth = max(0, depth - 1)


def _blank_comments_and_strings(src: str) -> str:
    """The source with comments and string literals replaced by spaces (same length)."""
    return re.sub(r"#[^\n]*|\"[^\"\n]*\"|'[^'\n]*'", lambda m: " " * len(m.group()), src)


def _span_at(src: str, source: str, start: int, end: int) -> Span:
    line = src.count("\n", 0, start) + 1
    line_start = src.rfind("\n", 0, start) + 1
    line_end = src.find("\n", start)
    line_end = len(src) if line_end < 0 else line_end
    col = start - line_start + 1
    return Span(source, line, col, col + max(1, min(end, line_end) - start), src[line_start:line_end])


def _syntax(src: str, source: str) -> Tree:
    try:
        return _lark().parse(src)
    except lark.exceptions.UnexpectedCharacters as e:
        ch = src[e.pos_in_stream]
        span = _span_at(src, source, e.pos_in_stream, e.pos_in_stream + 1)
        if ch in "+-*/^~!<>%":
            raise PatternError(f"unknown operator '{ch}': patterns combine with '|' (union) "
                               f"and '&' (intersection)", span) from None
        raise PatternError(f"unexpected character {ch!r}", span) from None
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        expected = _expected(e.expected)
        if tok.type == "$END":
            span = _span_at(src, source, max(0, len(src.rstrip()) - 1), len(src.rstrip()))
            span = Span(span.source, span.line, span.end_column, span.end_column + 1, span.text)
            raise PatternError(f"unexpected end of input; expected {expected}", span) from None
        start = tok.start_pos if tok.start_pos is not None else 0
        if tok.type == "SIGNED_INT" and str(tok).startswith("-") and {"VBAR", "AMPERSAND"} & set(e.expected):
            raise PatternError("unknown operator '-': patterns combine with '|' (union) and '&' "
                               "(intersection)", _span_at(src, source, start, start + 1)) from None
        what = "end of line" if tok.type == "_NL" else repr(_short(str(tok)))
        span = _span_at(src, source, start, start + max(1, len(str(tok).rstrip("\r\n"))))
        if tok.type == "_NL":
            span = Span(span.source, span.line, span.column, span.column + 1, span.text)
        hint = ""
        if tok.type in ("NAME", "LPAR") and {"VBAR", "AMPERSAND"} & set(e.expected):
            hint = " (two patterns need an operator between them: '|' or '&')"
        raise PatternError(f"unexpected {what}; expected {expected}{hint}", span) from None
    except lark.exceptions.UnexpectedInput as e:  # pragma: no cover - other lark errors
        raise PatternError(f"syntax error: {e}", source=source) from None


def _distinct(terms) -> list:
    """Terms with repeated objects dropped (a 'let' name used many times is one object):
    the IR constructors hash and print every term, and a large definition written a
    thousand times over must not cost a thousand times its size."""
    seen: set[int] = set()
    return [t for t in terms if not (id(t) in seen or seen.add(id(t)))]


def _short(text: str, limit: int = 40) -> str:
    """``text`` cut to about ``limit`` characters for a message (the caret shows the spot)."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-8:]} ({len(text)} characters)"


def _expected(names) -> str:
    words = sorted({_READABLE.get(n, f"'{n.lower()}'") for n in names})
    if len(words) == 1:
        return words[0]
    return "one of " + ", ".join(words)


# ----------------------------------------------------------------------------------------
# tree -> IR


class _Builder:
    def __init__(self, src: str, source: str):
        self.lines = src.split("\n")  # lark counts lines by "\n" alone
        self.source = source
        self.scope: dict[str, ir.Pattern] = {}
        self.sizes: dict[int, tuple[ir.Pattern, int, int]] = {}  # id -> (node, tree size, depth)
        self.work = 0

    # -- spans
    def span(self, node) -> Span:
        if isinstance(node, Token):
            line, col, end_line, end_col = node.line, node.column, node.end_line, node.end_column
        else:
            m = node.meta
            line, col, end_line, end_col = m.line, m.column, m.end_line, m.end_column
        text = self.lines[line - 1] if line - 1 < len(self.lines) else ""
        if end_line != line:
            end_col = len(text) + 1
        return Span(self.source, line, col, max(end_col, col + 1), text)

    def error(self, msg: str, node) -> PatternError:
        return PatternError(msg, self.span(node))

    # -- size limits: IR nodes are shared (a 'let' name used twice is one object), but
    # every later stage (printing, hashing, specialising per head) walks them as a tree,
    # so the tree size and depth are what is bounded, measured without recursion.
    def measure(self, node: ir.Pattern) -> tuple[int, int]:
        memo = self.sizes
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if id(n) in memo:
                continue
            kids = n.children()
            if ready or not kids:
                size = 1 + sum(memo[id(c)][1] for c in kids)
                depth = 1 + max(memo[id(c)][2] for c in kids) if kids else 0
                memo[id(n)] = (n, size, depth)  # the node is kept, so its id stays unique
            else:
                stack.append((n, True))
                stack.extend((c, False) for c in kids if id(c) not in memo)
        return memo[id(node)][1:]

    def built(self, node: ir.Pattern, tree) -> ir.Pattern:
        """Check a newly combined pattern against MAX_DEPTH, MAX_TERMS and MAX_WORK."""
        size, depth = self.measure(node)
        self.work += size
        if depth > MAX_DEPTH:
            raise self.error(f"pattern nested too deeply: more than {MAX_DEPTH} levels of '|', '&' "
                             f"and dilate", tree)
        if size > MAX_TERMS:
            raise self.error(f"pattern too large: {size} terms once 'let' names are expanded "
                             f"(the limit is {MAX_TERMS})", tree)
        if self.work > MAX_WORK:
            raise self.error(f"program too large: its patterns hold more than {MAX_WORK} terms "
                             f"once 'let' names are expanded", tree)
        return node

    # -- program
    def program(self, tree: Tree) -> ir.Program:
        options: dict[str, object] = {}
        sections: list[tuple[Tree, ir.Section]] = []
        single: list[tuple[Tree, ir.Pattern]] = []
        for stmt in tree.children:
            kind = stmt.data
            if kind == "option":
                self.option(stmt, options)
            elif kind == "let_stmt":
                self.let(stmt)
            elif kind == "section":
                sections.append((stmt, self.section(stmt)))
            else:
                single.append((stmt, self.top(stmt.children[0])))
        if single and sections:
            raise self.error("a source holds either one pattern or 'layers a..b:' sections, not both",
                             single[0][0])
        if len(single) > 1:
            raise self.error("a second pattern: combine patterns with '|' or '&', or give each "
                             "its own 'layers a..b:' section", single[1][0])
        causal = bool(options.get("causal", False))
        if sections:
            secs = self.check_layers(sections)
        elif single:
            secs = (ir.Section(0, -1, single[0][1]),)
        else:
            raise PatternError("the source holds no pattern; expected a pattern such as "
                               "'window(256) | global([0])'", _span_at("", self.source, 0, 0))
        if causal:
            secs = tuple(ir.Section(s.start, s.stop, ir.intersect([s.pattern, ir.Causal()])) for s in secs)
        prog = ir.Program(secs, options.get("block_size"), options.get("heads"), causal, self.source)
        if prog.heads is not None:
            for s in prog.sections:
                s.pattern.check_heads(prog.heads)
        return prog

    def option(self, stmt: Tree, options: dict) -> None:
        name_tok, value = stmt.children
        name = str(name_tok)
        if name not in OPTIONS:
            raise self.error(f"unknown option '{_short(name)}'{self.suggest(name, OPTIONS)}; "
                             f"options are {', '.join(OPTIONS)}", name_tok)
        if name in options:
            raise self.error(f"option '{name}' is set twice", name_tok)
        if name == "causal":
            if not (isinstance(value, Tree) and value.data == "word" and str(value.children[0]) in ("true", "false")):
                raise self.error(f"option 'causal' expects {OPTIONS['causal']}", value)
            options[name] = str(value.children[0]) == "true"
            return
        v = self.integer(value, f"option '{name}'", minimum=1)
        if name == "block_size" and (v < 16 or v > MAX_BLOCK or v & (v - 1)):
            raise self.error(f"option 'block_size' must be a power of two from 16 to {MAX_BLOCK}, "
                             f"got {v}", value)
        if name == "heads" and v > MAX_HEADS:
            raise self.error(f"option 'heads' is {v}; the most supported is {MAX_HEADS}", value)
        options[name] = v

    def let(self, stmt: Tree) -> None:
        _, name_tok, expr = stmt.children
        name = str(name_tok)
        if name in PRIMITIVES or name in MODIFIERS or name in ("true", "false"):
            raise self.error(f"'{name}' is a primitive; choose another name for the definition", name_tok)
        if name in self.scope:
            raise self.error(f"'{_short(name)}' is already defined", name_tok)
        self.scope[name] = self.top(expr)

    def section(self, stmt: Tree) -> ir.Section:
        _, rng, expr = stmt.children
        start = self.integer(rng.children[0], "a layer number", minimum=0)
        stop = self.integer(rng.children[1], "a layer number", minimum=0)
        if stop > MAX_LAYERS:
            raise self.error(f"layer {stop} is past the supported maximum ({MAX_LAYERS} layers)", rng)
        if stop <= start:
            raise self.error(f"empty layer range {start}..{stop}: the end is exclusive and must be "
                             f"greater than the start", rng)
        return ir.Section(start, stop, self.top(expr))

    def check_layers(self, sections: list[tuple[Tree, ir.Section]]) -> tuple[ir.Section, ...]:
        ordered = sorted(sections, key=lambda p: p[1].start)
        expect = 0
        for stmt, s in ordered:
            if s.start > expect:
                raise self.error(f"layers {expect}..{s.start} are not covered by any section",
                                 stmt.children[1])
            if s.start < expect:
                raise self.error(f"layers {s.start}..{min(expect, s.stop)} are covered twice "
                                 f"(sections overlap)", stmt.children[1])
            expect = s.stop
        return tuple(s for _, s in ordered)

    # -- expressions
    def top(self, tree) -> ir.Pattern:
        node = self.expr(tree)
        if isinstance(node, _DilateTerm):
            raise self.error("dilate(...) needs a pattern to act on, e.g. 'window(256) | dilate(2)'", tree)
        # every section and definition counts its whole size, even a bare 'let' name:
        # later stages print, hash and walk each section's pattern
        return self.built(node, tree)

    def expr(self, tree) -> ir.Pattern:
        kind = tree.data
        if kind == "union":
            return self.union(tree)
        if kind == "intersect":
            terms = [self.expr(c) for c in tree.children]
            if len(terms) == 1:
                return terms[0]
            for c, t in zip(tree.children, terms):
                if isinstance(t, _DilateTerm):
                    raise self.error("dilate(...) modifies the union it is a term of; write "
                                     "'pattern | dilate(d)', not '&'", c)
            return self.built(ir.intersect(_distinct(terms)), tree)
        if kind == "ref":
            return self.ref(tree.children[0])
        if kind == "call":
            return self.call(tree)
        raise self.error(f"expected a pattern, found {kind}", tree)  # pragma: no cover

    def union(self, tree) -> ir.Pattern:
        terms, mods = [], []
        for c in tree.children:
            t = self.expr(c)
            (mods if isinstance(t, _DilateTerm) else terms).append((c, t))
        if len(terms) == 1 and not mods:
            return terms[0][1]
        if not terms:
            return mods[0][1]  # a lone dilate: reported by top() or by the enclosing union
        distinct = _distinct(t for _, t in terms)
        pattern = self.built(ir.union(distinct), tree)
        has_window = any(isinstance(n, ir.Window) for t in distinct for n in t.walk())
        for c, m in mods:
            if not has_window:
                raise self.error("dilate(...) has no window(w) term to act on in this union", c)
            pattern = self.built(ir.dilate(pattern, m.d, m.heads, m.span), c)
        return pattern

    def ref(self, tok: Token) -> ir.Pattern:
        name = str(tok)
        if name in self.scope:
            return self.scope[name]
        cls = PRIMITIVES.get(name)
        if cls is not None:
            if any(p.required for p in cls.params):
                raise self.error(f"{name} needs arguments: {self.usage(cls)}", tok)
            return cls(span=self.span(tok))
        if name in MODIFIERS:
            raise self.error("dilate needs arguments: dilate(d, heads=h)", tok)
        raise self.error(f"unknown name '{_short(name)}'{self.suggest(name, list(PRIMITIVES) + list(self.scope))}; "
                         f"expected a primitive ({', '.join(PRIMITIVES)}) or a name defined with 'let'", tok)

    def call(self, tree: Tree) -> ir.Pattern:
        name_tok, *args = tree.children
        name = str(name_tok)
        if name == "dilate":
            return self.dilate_term(tree, args)
        cls = PRIMITIVES.get(name)
        if cls is None:
            if name in self.scope:
                raise self.error(f"'{_short(name)}' is a pattern defined with 'let', not a function; "
                                 f"use it without parentheses", name_tok)
            raise self.error(f"unknown primitive '{_short(name)}'{self.suggest(name, list(PRIMITIVES) + ['dilate'])}; "
                             f"primitives are {', '.join(PRIMITIVES)} and dilate", name_tok)
        values, heads = self.bind(cls.params, args, tree, name, allow_heads=True)
        return cls(**values, heads=heads, span=self.span(tree))

    def dilate_term(self, tree: Tree, args) -> "_DilateTerm":
        params = (ir.Param("d", minimum=1, meaning="dilation factor"),)
        values, heads = self.bind(params, args, tree, "dilate", allow_heads=True)
        return _DilateTerm(values["d"], heads, self.span(tree))

    def bind(self, params, args, tree, name, allow_heads):
        values: dict[str, object] = {}
        heads = None
        positional = [a for a in args if not (isinstance(a, Tree) and a.data == "kwarg")]
        keywords = [a for a in args if isinstance(a, Tree) and a.data == "kwarg"]
        if len(positional) > len(params):
            extra = positional[len(params)]
            raise self.error(f"{name} takes {len(params)} positional argument"
                             f"{'s' if len(params) != 1 else ''}, got {len(positional)}; "
                             f"usage: {self.usage_of(name, params)}", extra)
        for p, a in zip(params, positional):
            values[p.name] = self.value(p, a, name)
        for kw in keywords:
            key_tok, a = kw.children
            key = str(key_tok)
            if key == "heads" and allow_heads:
                heads = self.heads(a)
                continue
            p = next((p for p in params if p.name == key), None)
            if p is None:
                names = [p.name for p in params] + ["heads"]
                raise self.error(f"{name} has no argument '{_short(key)}'{self.suggest(key, names)}; "
                                 f"usage: {self.usage_of(name, params)}", key_tok)
            if key in values:
                raise self.error(f"{name} got '{key}' twice", key_tok)
            values[key] = self.value(p, a, name)
        for p in params:
            if p.name not in values:
                if p.required:
                    raise self.error(f"{name} is missing its argument '{p.name}' ({p.meaning}); "
                                     f"usage: {self.usage_of(name, params)}", tree)
                values[p.name] = p.default
        return values, heads

    def value(self, p: ir.Param, a, name: str):
        if p.kind == ir.INDICES:
            return self.indices(a, name)
        return self.integer(a, f"{name}'s argument '{p.name}' ({p.meaning})", p.minimum)

    def integer(self, a, what: str, minimum: int | None = None) -> int:
        if not (isinstance(a, Tree) and a.data == "int"):
            raise self.error(f"{what} must be an integer, got {self.describe(a)}", a)
        text = str(a.children[0])
        if len(text.lstrip("-")) > 13 or abs(int(text)) > MAX_INT:
            raise self.error(f"{what} is too large: {_short(text, 30)} (the limit is 2**40)", a)
        v = int(text)
        if minimum is not None and v < minimum:
            need = "positive" if minimum == 1 else f">= {minimum}"
            raise self.error(f"{what} must be {need}, got {v}", a)
        return v

    def indices(self, a, name: str) -> tuple:
        items = a.children if isinstance(a, Tree) and a.data == "list" else [a]
        if not items:
            raise self.error(f"{name} needs at least one index", a)
        out: list = []
        for it in items:
            if isinstance(it, Tree) and it.data == "range":
                lo = self.integer(it.children[0], f"the start of range in {name}", 0)
                hi = self.integer(it.children[1], f"the end of range in {name}", 0)
                if hi <= lo:
                    raise self.error(f"empty range {lo}..{hi} in {name}: the end is exclusive "
                                     f"and must be greater than the start", it)
                out.append(ir.IndexRange(lo, hi))
            else:
                out.append(self.integer(it, f"an index of {name}"))
        unique = sorted(set(out), key=lambda x: (1, x.start, x.stop) if isinstance(x, ir.IndexRange) else (0, x, 0))
        return tuple(unique)

    def heads(self, a) -> tuple[int, ...]:
        if isinstance(a, Tree) and a.data == "int":
            h = self.integer(a, "heads", 1)
            if h > MAX_HEADS:
                raise self.error(f"heads={h} is more heads than supported ({MAX_HEADS})", a)
            return tuple(range(h))
        if isinstance(a, Tree) and a.data in ("list", "range"):
            items = a.children if a.data == "list" else [a]
            out = set()
            for it in items:
                if isinstance(it, Tree) and it.data == "range":
                    lo = self.integer(it.children[0], "a head number", 0)
                    hi = self.integer(it.children[1], "a head number", 0)
                    if hi <= lo or hi > 65536:
                        raise self.error(f"bad head range {lo}..{hi}", it)
                    out.update(range(lo, hi))
                else:
                    h = self.integer(it, "a head number", 0)
                    if h >= 65536:
                        raise self.error(f"head {h} is past the supported maximum (65535)", it)
                    out.add(h)
            if not out:
                raise self.error("heads=[] selects no head", a)
            return tuple(sorted(out))
        raise self.error(f"heads= expects a count (heads=2 means heads 0 and 1) or a list "
                         f"such as heads=[1, 3], got {self.describe(a)}", a)

    # -- messages
    def describe(self, a) -> str:
        if isinstance(a, Tree):
            text = self.span(a).text[self.span(a).column - 1:self.span(a).end_column - 1]
            kinds = {"float": "a number with a fraction", "string": "a string", "word": "a name",
                     "list": "a list", "range": "a range", "int": "an integer"}
            return f"{kinds.get(a.data, a.data)} '{_short(text)}'"
        return repr(str(a))

    @staticmethod
    def suggest(name: str, choices) -> str:
        if len(name) > 64:
            return ""
        close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else ""

    def usage(self, cls) -> str:
        return self.usage_of(cls.name, cls.params)

    @staticmethod
    def usage_of(name, params) -> str:
        parts = [p.name if p.required else f"{p.name}={p.default}" for p in params]
        return f"{name}({', '.join(parts + ['heads=...'])})"


class _DilateTerm(ir.Pattern):
    """A ``dilate(d, heads=...)`` term while its union is being built (never in final IR)."""

    def __init__(self, d: int, heads, span: Span):
        self.d, self.heads, self.span = d, heads, span
