"""Code generation: Pattern IR -> a Triton module (the pattern's predicate + the kernels).

A generated module is the kernel templates of ``kernels/`` (forward, backward dK/dV over
the transposed index, backward dQ over the forward index) preceded by the one part that
depends on the pattern: ``token_mask`` (and its transpose ``token_mask_t``), the token
predicate that PARTIAL blocks evaluate, emitted from the IR by each node's ``triton()``.

What the predicate may read besides the token positions:

* ``head``: head-dependent patterns (``heads=`` selections, ``dilate(..., heads=)``) become
  one branch per group of heads with the same specialised pattern. Heads past the largest
  one the pattern names all behave alike, so the module does not depend on the head count;
* ``flags``: the entry's flag word. ``random(...)`` terms pick whole blocks: the lowering
  sets bit ``1 + i`` on every entry that random term ``i`` drew. A random term directly
  under the top-level union is dropped from the predicate (a block it draws is FULL, so
  inside a PARTIAL block it is always false);
* ``tables``: global index sets of more than ``TABLE_THRESHOLD`` items read an int8
  per-token membership table (built by the lowering per sequence length) instead of a
  long chain of comparisons.

Modules are cached: in memory per (pattern, interpreter flag), an LRU bounded by
``MAX_MODULES`` entries and ``MAX_MODULE_BYTES`` (source plus compiled kernel binaries,
``$PATTERNCC_KERNEL_CACHE_BYTES``), and on disk under ``$PATTERNCC_CACHE_DIR`` (default
``~/.cache/patterncc/kernels``), named by a hash of their source and written atomically
(temporary file + rename, so concurrent processes never see a half-written file); a file
whose text is not the expected source (corrupted, truncated) is rewritten. Triton's ``@jit`` needs real source files, hence the disk.
Everything about sequence length lives in runtime arguments, so a new length reuses the
module and Triton's compiled binaries; only a layout is built.

Example:
    >>> import patterncc
    >>> from patterncc import codegen
    >>> src = codegen.generated_source(patterncc.parse("window(16) & causal"))
    >>> src.splitlines()[1]
    '# pattern: causal & window(16)'
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import linecache
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from ._data import read_text
from pathlib import Path

from . import __version__, ir

CODEGEN_VERSION = 2
TABLE_THRESHOLD = 16  # a global(...) with more items than this reads a membership table
MAX_RANDOM_TERMS = 28  # flag bits 1..28 of an int32 word (bits 29, 30: see lowering)
# An intersection's diagonal bands (causal & window(w)) tested as one interval of q - k in
# token_mask (forward, dQ): a causal window's masked forward tile 234 -> 162 sm_90 SASS
# instructions (Triton 3.6). Not in token_mask_t: there the cheaper mask let the compiler
# flatten dK/dV's mask branch into predicated code that FULL tiles run too (559 -> 654).
# Off until measured on a GPU (bench A/B row `bands`; bench/RESULTS.md, fifteenth session).
MERGE_BANDS = False
# A walked tile's tokens in residue order as an affine function of its row (kernels/common.py
# _walked_tokens; the lowering pads classes to whole layout blocks, so a walked tile lies in
# one class), in kernels whose HEAD_PAD is at most this (0: never). sm_90 SASS (Triton 3.6,
# bf16): the dilated window's dK/dV FULL tile 443 -> 364 instructions at D=64 (tuned 32x64
# tiles); forward and dQ unchanged (their TMA loads need no tokens). Measured on an H100
# (eighteenth session): dilated dK/dV -9% at D=64, but +7% at D=128, where dK/dV already
# spills at 252 registers and the affine form spills more (47 -> 77 spill instructions);
# hence 64. A/B rows `affine` (off) and `affine128` (every head dim).
AFFINE_TOKENS_MAX_HEAD_PAD = 64
# dK/dV compiled per length class (Triton's specialisation of SEQ_LEN: a multiple of 16 or
# not) instead of once for every length. A multiple of 16 makes each head's rows 16-aligned
# and the walked tile's "token < SEQ_LEN" mask constant over 16 rows, so the LSE and Delta
# loads of every walked query tile (per step: the forward and dQ read theirs once per
# program) become vector loads instead of 16 scalar ones a thread. sm_90 SASS (Triton 3.6,
# bf16, token order): dK/dV's FULL tile 339 -> 280 instructions at D=64 (longformer; causal
# window 333 -> 274), 656 -> 520 at D=128; residue order (strided tokens) unchanged. The
# backend compiles the other class ahead (as the forward's tail variant), so a new length
# still launches without a compile. Measured on an H100 (twenty-fifth session, interleaved
# A/B): dK/dV -8% to -10%, forward+backward kernels -2% to -4% (token order); on. A/B row
# `seqlen16` turns it off.
SEQ_LEN_CLASSES = True
# In residue order, Delta and a copy of the LSE stored by kernel position rather than by
# token (kernels/attention_bwd.py _store_stats): the pass that computes Delta (dQ, or the
# preprocess pass) writes both, STATS_LEN positions a head. dK/dV reads both for every walked
# query tile; by token those are strided (tokens step by the residue factor), scalar loads
# with their addresses and masks, and the FULL tile's tokens are needed for nothing else.
# sm_90 SASS (Triton 3.6, bf16, the dilated window, tuned tiles): dK/dV's FULL tile
# 387 -> 309 instructions at D=64, 883 -> 594 at D=128. Measured on an H100 (twenty-seventh
# session, interleaved A/B): dK/dV -12% to -14% at D=64, -20% at D=128; forward+backward
# kernels -6% to -8%; on. A/B row `posstats` turns it off.
POSITION_STATS = True
# Delta and the LSE by kernel position in every launch, token order included, and stored as
# (LSE, Delta) pairs in one buffer ([B, H, STATS_LEN, 2] fp32): dK/dV then loads both with one
# unmasked vector load of pairs per walked tile instead of two masked ones (kernels/
# attention_bwd.py _store_stats). sm_90 SASS (Triton 3.6, bf16, D=64, the tuned 32x64 tile
# without TMA): longformer's dK/dV FULL walk 280 -> 264 instructions, its warp-level (HMMA)
# walk 278 -> 240; the dilated window's 300 -> 293; at D=128 (64x64, TMA) 520 -> 423 and
# 594 -> 452. Positions alone, as two buffers, gave longformer 280 -> 276 at D=64. Measured on
# an H100 (twenty-eighth session, interleaved A/B, 2-3 rounds): dK/dV -1.7% (longformer, 16K,
# D=64), -3.2% / -3.4% (longformer 16K / 64K, D=128), -1.7% (the dilated window, 16K, D=128):
# smaller than the SASS counts, the walk being bound by more than its instructions. Under the
# H100's register-capped D=64 dK/dV tile (tuning.TUNED) pairs off measured dK/dV -2% to -3%
# on longformer, the dilated window and BigBird but +7% on the causal window (bench/RESULTS.md,
# twenty-eighth session): on, from the padded head dim below. The A/B row `pairs` turns it off.
PAIRED_STATS = True
# Pairs only from this padded head dim up (0: every head dim); below it LSE and Delta are two
# buffers, by token in token order (with POSITION_STATS, by position in residue order).
# Measured on an H100 (twenty-ninth session, interleaved A/B at 16K, D=64, 3 rounds, against
# pairs at every head dim): forward+backward kernels -1.4% (longformer), -1.2% (the dilated
# window), -0.8% (BigBird), +2.5% (the causal window); dK/dV -2.1% to -3.9%, +4.9%. The four
# patterns' sum is level; 128 is kept for the margin it gives longformer's D=64 target, the
# causal window's cells staying over theirs. The A/B row `pairsall` puts pairs at every head dim (0).
PAIRED_STATS_MIN_HEAD_PAD = 128
# The forward's first thin-column step (kernels/attention_fwd.py: a 16-key tile of a thin global
# column, before the row's walk) outside the loop, which starts from the empty softmax state, and
# the rest of a row's thin-column steps in a loop that is not software-pipelined. Longformer's far
# rows have one such step each; in a loop Triton pipelines it (async copies, barriers) and rescales
# the zero accumulator. sm_90 SASS (Triton 3.9, bf16, longformer, TMA tiles): the step's code
# 336 -> 216 instructions at D=64 and 424 -> 280 at D=128, the main walk unchanged; about 3% of a
# row's instructions. Predicted: longformer's forward -2% to -3.5%; other patterns unchanged.
# Measured (H100, thirty-first session, interleaved A/B, 3 rounds each): longformer's forward in
# graph replay -0.7% to -1.4% a round at 16K and 64K D=64, -1.2% to -2.1% at 16K D=128 (faster in
# all nine rounds; the A/A's forward moved -0.2% to +0.8%); the backward's kernels are the same.
# On since that session; the A/B row `nopeel` turns it off.
PEEL_THIN_COLUMN = True
TEMPLATES = ("common.py", "attention_fwd.py", "attention_bwd.py")
MARKER = "# @template-begin"
KERNEL_NAMES = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")


@dataclass(frozen=True)
class PredicatePlan:
    """What the generated predicate reads; shared with the lowering, which fills it in.

    ``groups``: (heads, head-free predicate pattern) per branch; the last group has
    ``heads=None`` and covers every head not named before (the ``else`` branch).
    ``random_nodes``: head-free Random terms that need a flag bit (bit ``1 + index``).
    ``table_nodes``: Global terms read through a membership table (table ``index``).
    """

    pattern: ir.Pattern
    groups: tuple[tuple[tuple[int, ...] | None, ir.Pattern], ...]
    random_nodes: tuple[ir.Random, ...]
    table_nodes: tuple[ir.Global, ...]
    class_forms: tuple[ir.Pattern, ...] | None = None  # per group: the predicate class_mask tests
    class_gap: int = 0  # the class coordinates' gap between classes (0: no class_mask)

    def names(self, transposed: bool = False) -> ir.TritonNames:
        n = ir.TritonNames(random_bits=self.random_nodes, table_nodes=self.table_nodes,
                           merge_bands=MERGE_BANDS and not transposed)
        return n.transposed() if transposed else n

    def factor(self, head: int) -> int:
        """The residue factor of ``head``'s group (what class_mask assumes the head runs in)."""
        return next(ir.residue_factor(p) for heads, p in self.groups if heads is None or head in heads)


@dataclass(frozen=True)
class Generated:
    """A loaded generated module and what its kernels need from the lowering."""

    plan: PredicatePlan
    source: str
    path: Path
    module: object

    def kernel(self, name: str):
        return getattr(self.module, name)


# ----------------------------------------------------------------------------------------
# analysis: per-head predicate patterns, random bits, membership tables


def kernel_form(p: ir.Pattern) -> ir.Pattern:
    """The head-free pattern as the predicate sees it (input: a specialised pattern).

    Random terms lose their per-head stream (the flag bit carries the head's draw), and
    random terms directly under the top-level union are dropped: the blocks they draw are
    FULL, so inside a PARTIAL block they are false.
    """
    p = _strip_streams(p)
    if isinstance(p, ir.Random):
        return ir.Empty()
    if isinstance(p, ir.Union):
        return ir.union(t for t in p.terms if not isinstance(t, ir.Random))
    return p


def _strip_streams(p: ir.Pattern) -> ir.Pattern:
    if isinstance(p, ir.Random):
        return replace(p, stream=None, heads=None)
    if isinstance(p, ir.Union):
        return ir.union(_strip_streams(t) for t in p.terms)
    if isinstance(p, ir.Intersect):
        return ir.intersect(_strip_streams(t) for t in p.terms)
    return p


def analyse(pattern: ir.Pattern) -> PredicatePlan:
    """Group heads by predicate and collect the random terms and large index sets."""
    last = pattern.max_head() + 1  # every head >= last behaves like head `last`
    by_pred: dict[ir.Pattern, list[int]] = {}
    for h in range(last + 1):
        by_pred.setdefault(kernel_form(pattern.specialize(h)), []).append(h)
    default = kernel_form(pattern.specialize(last))
    groups = [(tuple(hs), p) for p, hs in by_pred.items() if p != default]
    groups.append((None, default))
    randoms: dict[ir.Random, None] = {}
    tables: dict[ir.Global, None] = {}
    for _, p in groups:
        for node in p.walk():
            if isinstance(node, ir.Random):
                randoms.setdefault(node)
            elif isinstance(node, ir.Global) and len(node.items) > TABLE_THRESHOLD:
                tables.setdefault(node)
    if len(randoms) > MAX_RANDOM_TERMS:
        raise ValueError(f"a pattern may hold at most {MAX_RANDOM_TERMS} distinct random terms "
                         f"inside intersections, got {len(randoms)}")
    forms, gap = class_forms(tuple(p for _, p in groups))
    return PredicatePlan(pattern, tuple(groups), tuple(randoms), tuple(tables), forms, gap)


def class_forms(patterns: tuple[ir.Pattern, ...]) -> tuple[tuple[ir.Pattern, ...] | None, int]:
    """The class-coordinate predicate of each head group, and the gap between classes.

    In residue order d a head's positions are p = c * seg + i (class c, index i), and its
    PARTIAL tiles can be tested on the *class coordinate* u = p + c * gap instead of on
    tokens: one class's pairs differ in u as in i, so they take the pattern's class form,
    and pairs of two classes are more than ``gap`` apart, where a class form bounded by
    |i - j| <= gap allows none of them. A token-order group (d = 1) keeps its predicate
    (u is the token there). No class forms (None, 0) when a residue-order group has none
    that is bounded and independent of the length, or no group runs in residue order.

    >>> import patterncc
    >>> pat = patterncc.parse("window(256) | dilate(2)").specialize(0)
    >>> forms, gap = class_forms((pat,))
    >>> [str(f) for f in forms], gap
    (['window(256)'], 256)
    >>> class_forms((patterncc.parse("window(8) | dilate(2) | global([5])").specialize(0),))
    (None, 0)
    """
    factors = [ir.residue_factor(p) for p in patterns]
    if all(d == 1 for d in factors):
        return None, 0
    forms, gap = [], 1
    for d, p in zip(factors, patterns):
        form = p if d == 1 else (p.class_form(d) if p.keeps_classes(d) else None)
        reach = form.extent() if form is not None and d > 1 else 0
        if form is None or reach is None:
            return None, 0
        forms.append(form)
        gap = max(gap, reach)
    return tuple(forms), gap


# ----------------------------------------------------------------------------------------
# rendering


def _expr(p: ir.Pattern, n: ir.TritonNames, indent: str) -> str:
    """The predicate of ``p`` as one Triton expression of the tile's shape.

    Top-level terms go one per line; an expression that does not read both token axes
    (``sink``, ``dense``, a lone random flag) is widened so every branch has the tile's shape.
    """
    if isinstance(p, ir.Dense):
        return f"({n.q} >= 0) & ({n.k} >= 0)"
    if isinstance(p, ir.Empty):
        return f"({n.q} < 0) & ({n.k} < 0)"
    if isinstance(p, (ir.Union, ir.Intersect)):
        sym = "|" if isinstance(p, ir.Union) else "&"
        parts = p.triton_terms(n) if isinstance(p, ir.Intersect) else [t.triton(n) for t in p.terms]
        rest = "".join(f"\n{indent}{sym} {t}" for t in parts[1:])
        expr = f"(\n{indent}{parts[0]}{rest}\n{indent[4:]})"
        text = " ".join(parts)
    else:
        expr = text = p.triton(n)
    widen = [f"({x} >= 0)" for x in (n.q, n.k) if x not in text]
    if widen:
        expr = f"{expr} & " + " & ".join(widen)
    return expr


def _heads_cond(heads: tuple[int, ...]) -> str:
    """``head == 1``-style condition, consecutive heads as ranges."""
    runs, start = [], heads[0]
    for a, b in zip(heads, heads[1:] + (None,)):
        if b != a + 1:
            runs.append((start, a))
            start = b
    parts = [f"(head == {a})" if a == b else f"((head >= {a}) & (head <= {b}))" for a, b in runs]
    return " | ".join(parts)


def _predicate_fn(plan: PredicatePlan, name: str, transposed: bool, forms: tuple | None = None) -> str:
    """A predicate function: the groups' token predicates, or with ``forms`` their class forms."""
    n = plan.names(transposed)
    shape = "[BLOCK_N, BLOCK_M]" if transposed else "[BLOCK_M, BLOCK_N]"
    what = "class coordinates" if forms else "tokens"
    groups = _same_form_merged([(heads, f) for (heads, _), f in zip(plan.groups, forms)]) if forms else plan.groups
    lines = [
        "@triton.jit",
        f"def {name}(offs_m, offs_n, head, flags, SEQ_LEN, tables):",
        f'    """{shape} bool: True where query offs_m may attend key offs_n ({what}; PARTIAL blocks)."""',
    ]
    if len(groups) == 1:
        p = groups[0][1]
        lines += [f"    # {p}", f"    mask = {_expr(p, n, ' ' * 8)}"]
    else:
        for i, (heads, p) in enumerate(groups):
            if heads is None:
                lines.append("    else:")
            else:
                lines.append(f"    {'if' if i == 0 else 'elif'} {_heads_cond(heads)}:")
            lines += [f"        # {p}", f"        mask = {_expr(p, n, ' ' * 12)}"]
    lines.append("    return mask")
    return "\n".join(lines)


def _same_form_merged(groups: list) -> list:
    """Head groups whose predicates are equal as one group (class forms of a dilated and an
    undilated window may be the same: then no branch on the head)."""
    default = groups[-1][1]
    heads_of: dict = {}
    for heads, form in groups[:-1]:
        if form != default:
            heads_of.setdefault(form, []).extend(heads)
    return [(tuple(sorted(hs)), form) for form, hs in heads_of.items()] + [(None, default)]


def _class_mask_fns(plan: PredicatePlan) -> list[str]:
    """class_mask: the predicate on class coordinates (see class_forms), which the forward and
    dQ kernels call instead of token_mask when launched with CLASS_GAP > 0."""
    if plan.class_forms is None:
        return ["# No class forms (see codegen.class_forms): the kernels test tokens (CLASS_GAP = 0).",
                "class_mask = token_mask"]
    return ["# class_mask: token_mask on class coordinates u = p + (p // seg) * CLASS_GAP",
            f"# (residue-order forward and dQ launches, CLASS_GAP = {plan.class_gap}; a token-order",
            "# head's u is its token).",
            "", "",
            _predicate_fn(plan, "class_mask", transposed=False, forms=plan.class_forms)]


def _template(name: str) -> str:
    text = read_text("kernels", name)
    head, sep, body = text.partition(MARKER)
    if not sep:
        raise RuntimeError(f"kernel template {name} lacks the '{MARKER}' line")
    return body.strip("\n")


def switches() -> tuple:
    """The switches that change the generated source (MERGE_BANDS, AFFINE_TOKENS_MAX_HEAD_PAD,
    SEQ_LEN_CLASSES, POSITION_STATS, PAIRED_STATS, PAIRED_STATS_MIN_HEAD_PAD, PEEL_THIN_COLUMN), as a
    key: load's module cache and the backend's launch constants carry it."""
    return (MERGE_BANDS, int(AFFINE_TOKENS_MAX_HEAD_PAD), bool(SEQ_LEN_CLASSES), bool(POSITION_STATS),
            bool(PAIRED_STATS), int(PAIRED_STATS_MIN_HEAD_PAD), bool(PEEL_THIN_COLUMN))


def dkdv_unspecialised() -> list[str]:
    """The dK/dV kernel's integer arguments Triton must not specialise (SEQ_LEN_CLASSES)."""
    return ["NR", "B", "H"] if SEQ_LEN_CLASSES else ["SEQ_LEN", "NR", "B", "H"]


def render(plan: PredicatePlan) -> str:
    """The full source of the generated module for a predicate plan."""
    head = [
        f"# Generated by patterncc {__version__} (codegen v{CODEGEN_VERSION}). Do not edit: regenerate.",
        f"# pattern: {plan.pattern}",
    ]
    if len(plan.groups) > 1:
        for heads, p in plan.groups:
            who = "other heads" if heads is None else f"heads {', '.join(map(str, heads))}"
            head.append(f"#   {who}: {p}")
    for i, r in enumerate(plan.random_nodes):
        head.append(f"# flag bit {i + 1}: {r} (set per entry by the lowering)")
    for i, g in enumerate(plan.table_nodes):
        head.append(f"# membership table {i}: {g}")
    head += [
        "#",
        "# token_mask / token_mask_t: the pattern's token predicate, evaluated on PARTIAL blocks",
        "# only; FULL blocks run unmasked and untouched blocks are never loaded. The kernels",
        "# below come from patterncc/kernels/ (" + ", ".join(TEMPLATES) + ").",
        '"""Generated block-sparse attention kernels for: ' + str(plan.pattern).replace('"""', "'''").replace("\\", "\\\\") + '"""',
        "import triton",
        "import triton.language as tl",
        "",
        f"PATTERN = {str(plan.pattern)!r}",
        "# Walked tiles' tokens in residue order: affine in the row up to this HEAD_PAD",
        "# (codegen.AFFINE_TOKENS_MAX_HEAD_PAD; past it the affine form made dK/dV spill more).",
        f"AFFINE_MAX_HEAD_PAD = tl.constexpr({int(AFFINE_TOKENS_MAX_HEAD_PAD)})",
        "# dK/dV's integer arguments left unspecialised; without SEQ_LEN here, Triton compiles it",
        "# per length class (a multiple of 16 or not: codegen.SEQ_LEN_CLASSES).",
        f"DKDV_UNSPECIALISED = {dkdv_unspecialised()!r}",
        "# Residue order: Delta and an LSE copy by kernel position (codegen.POSITION_STATS).",
        f"STATS_BY_POSITION = tl.constexpr({bool(POSITION_STATS)})",
        "# Every launch: LSE and Delta by kernel position as (LSE, Delta) pairs (codegen.PAIRED_STATS).",
        f"STATS_PAIRED = tl.constexpr({bool(PAIRED_STATS)})",
        "# ... from this HEAD_PAD up (codegen.PAIRED_STATS_MIN_HEAD_PAD).",
        f"STATS_PAIRED_MIN_HEAD_PAD = tl.constexpr({int(PAIRED_STATS_MIN_HEAD_PAD)})",
        "# The forward's first thin-column step outside its loop (codegen.PEEL_THIN_COLUMN).",
        f"PEEL_THIN_COLUMN = tl.constexpr({bool(PEEL_THIN_COLUMN)})",
        "",
        "",
        _predicate_fn(plan, "token_mask", transposed=False),
        "",
        "",
        _predicate_fn(plan, "token_mask_t", transposed=True),
        "",
        "",
        *_class_mask_fns(plan),
    ]
    parts = ["\n".join(head)]
    for t in TEMPLATES:
        parts.append(f"# ---- kernels/{t} " + "-" * max(0, 70 - len(t)) + "\n\n" + _template(t))
    return "\n\n\n".join(parts) + "\n"


def generated_source(pattern: ir.Pattern) -> str:
    """The generated Triton module source for ``pattern`` (what ``compile --out`` writes)."""
    return render(analyse(pattern))


# ----------------------------------------------------------------------------------------
# loading and caching


class _Stats:
    """Counters of the module cache: ``hits`` (in memory), ``loads`` (imported from disk),
    ``writes`` (files written)."""

    def __init__(self):
        self.hits = self.loads = self.writes = 0

    def __repr__(self):
        return f"CacheStats(hits={self.hits}, loads={self.loads}, writes={self.writes})"


stats = _Stats()
_modules: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
MAX_MODULES = 64


def _max_module_bytes() -> int:
    try:
        return int(os.environ.get("PATTERNCC_KERNEL_CACHE_BYTES", 256 << 20))
    except ValueError:
        return 256 << 20


MAX_MODULE_BYTES = _max_module_bytes()


def module_bytes(gen: "Generated") -> int:
    """Approximate bytes of a loaded module: its source plus the binaries Triton compiled
    for its kernels so far (best effort; Triton's cache layout is internal)."""
    total = len(gen.source)
    for name in KERNEL_NAMES:
        caches = getattr(getattr(gen.module, name, None), "device_caches", None)
        try:
            for entry in list(caches.values()) if caches else ():
                for kernel in list(entry[0].values()):
                    total += sum(len(a) for a in getattr(kernel, "asm", {}).values())
        except Exception:  # pragma: no cover - another Triton version
            pass
    return total


def _shrink(keep) -> None:
    """Evict least recently used modules (never ``keep``) past MAX_MODULES / MAX_MODULE_BYTES.
    Callers holding a module keep using it; a later load imports it again from disk."""
    while len(_modules) > max(1, MAX_MODULES):
        _forget(*_modules.popitem(last=False))
    total = sum(module_bytes(g) for g in _modules.values())
    for key in list(_modules):
        if total <= MAX_MODULE_BYTES:
            break
        if key != keep:
            gen = _modules.pop(key)
            total -= module_bytes(gen)
            _forget(key, gen)


def _forget(key, gen: "Generated") -> None:
    name = getattr(gen.module, "__name__", None)
    if name and sys.modules.get(name) is gen.module:
        del sys.modules[name]


def cache_dir() -> Path:
    env = os.environ.get("PATTERNCC_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patterncc"
    return base / "kernels"


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (TRITON_INTERPRET), read as Triton does."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load(pattern: ir.Pattern) -> Generated:
    """The generated module of ``pattern``, generated and imported once per process.

    Keyed also by TRITON_INTERPRET, which Triton reads when ``@jit`` decorates a function,
    and by the switches that change the generated source (:func:`switches`).
    """
    key = (pattern, interpreting(), switches())
    with _lock:
        got = _modules.get(key)
        if got is not None:
            _modules.move_to_end(key)
            stats.hits += 1
            return got
        plan = analyse(pattern)
        source = render(plan)
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        path = cache_dir() / f"pcc_{digest}.py"
        try:
            _write_once(path, source)
        except OSError:  # unwritable cache directory: fall back to a private temp dir
            path = Path(tempfile.gettempdir()) / f"patterncc-{os.getuid()}" / "kernels" / path.name
            _write_once(path, source)
        name = f"patterncc_generated_{digest}{'_interp' if key[1] else ''}"
        module = sys.modules.get(name)
        if module is None:
            module = _import(name, path, source)
            stats.loads += 1
        got = Generated(plan, source, path, module)
        _modules[key] = got
        _shrink(key)
        return got


def _import(name: str, path: Path, source: str):
    """Import ``source`` as module ``name`` whose file is ``path``.

    The code is compiled from the source in memory, not read back through the import
    system, so a stale or corrupted ``__pycache__`` entry (or a file another process is
    replacing) cannot break it. Triton's ``@jit`` reads function sources through
    ``inspect``/``linecache``; the lines are primed there from the same source.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    linecache.cache[str(path)] = (len(source), None, source.splitlines(True), str(path))
    code = compile(source, str(path), "exec", dont_inherit=True)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _write_once(path: Path, source: str) -> None:
    """Write ``source`` to ``path`` unless an identical file is there (temp file + replace)."""
    data = source.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:  # missing or unreadable; anything else there (garbage, a truncated file) is replaced
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    stats.writes += 1


def clear_memory_cache() -> None:
    """Forget loaded modules (the files on disk stay); for tests."""
    with _lock:
        _modules.clear()
