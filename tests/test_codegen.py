"""Code generation and lowering, without running a kernel.

The generated predicate is plain Python-syntax Triton code over ``offs_m`` / ``offs_n``;
these tests execute it with NumPy stand-ins for ``triton`` / ``tl`` and compare it, block
by block, against the IR's own token predicate (``allowed``) over generated patterns, with
the flag words and membership tables the lowering builds. Kernel numerics are in
test_triton_kernels.py.
"""
from __future__ import annotations

import ast
import collections
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterncc
from patterncc import codegen, ir, lowering
from patterncc.layout import get_layout
from strategies import layout_cases


# ----------------------------------------------------------------------------------------
# NumPy stand-ins, enough to run the generated predicate functions


class _Ptr:
    def __init__(self, data, offset=0):
        self.data, self.offset = data, offset

    def __add__(self, other):
        return _Ptr(self.data, self.offset + other)

    __radd__ = __add__


class _SeqLen(int):
    def to(self, dtype):
        return int(self)


def _fake_load(ptr, mask=None, other=0):
    idx = np.clip(ptr.offset, 0, ptr.data.size - 1)
    return np.where(mask, ptr.data[idx], other)


_fake_tl = types.SimpleNamespace(load=_fake_load, int64="int64", constexpr=object)
_fake_triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn if fn else (lambda f: f))


def predicate_functions(source: str, names: tuple[str, str] = ("token_mask", "token_mask_t")):
    """Two predicate functions of a generated module (token_mask and token_mask_t unless
    named), runnable on NumPy arrays."""
    start = source.index("@triton.jit\ndef token_mask(")
    end = source.index("# ---- kernels/")
    ns = {"triton": _fake_triton, "tl": _fake_tl}
    exec(compile(source[start:end], "<predicate>", "exec"), ns)
    return ns[names[0]], ns[names[1]]


def check_predicate(layout):
    """The generated predicate equals the pattern's on every PARTIAL block of the layout
    (FULL blocks are not asked: the kernels do not evaluate it there)."""
    pred = codegen.analyse(layout.pattern)
    mask_fn, mask_t_fn = predicate_functions(codegen.render(pred))
    flags = lowering.entry_flags(layout, pred)
    tables = _Ptr(lowering.membership_tables(layout, pred))
    masks = layout.partial_masks()
    bs, t = layout.block_size, layout.seq_len
    seq = _SeqLen(t)
    for e in np.flatnonzero(~layout.full):
        head, qb, kb = layout.entry_head[e], layout.entry_qblock[e], layout.kblock[e]
        offs_m = np.arange(qb * bs, qb * bs + bs)
        offs_n = np.arange(kb * bs, kb * bs + bs)
        got = np.broadcast_to(mask_fn(offs_m, offs_n, int(head), int(flags[e]), seq, tables), (bs, bs))
        got_t = np.broadcast_to(mask_t_fn(offs_m, offs_n, int(head), int(flags[e]), seq, tables), (bs, bs))
        valid = (offs_m < t)[:, None] & (offs_n < t)[None, :]
        assert ((got & valid) == masks[e]).all(), (str(layout.heads[head]), qb, kb)
        assert (got_t.T == got).all()


def check_class_predicate(layout) -> int:
    """The generated class_mask on class coordinates (u = p + (p // seg) * gap, position p
    of the head's kernel order) equals the pattern on the tokens at those positions, for
    every pair of real tokens of every head that the kernels may mask: every pair of
    layout blocks except FULL entries (the predicate is not asked there), each with its
    entry's flag word (random bits) or 0 where no entry lists it; across classes as well as
    inside one. Returns the gap (0: the kernels keep testing tokens)."""
    pred = codegen.analyse(layout.pattern)
    klay = lowering.kernel_layout(layout, pred)
    gap = lowering.class_gap(klay, pred, enabled=True)
    if not gap:
        return 0
    mask_fn, _ = predicate_functions(codegen.render(pred), ("class_mask", "token_mask"))
    tables = _Ptr(lowering.membership_tables(layout, pred))
    t, bs = layout.seq_len, layout.block_size
    for h in range(layout.num_heads):
        d, seg = int(klay.dil[h]), int(klay.seg[h])
        pos = np.arange(d * seg if d > 1 else t)
        tok = ir.residue_token(pos, t, d, bs) if d > 1 else pos
        u = pos + (pos // seg) * gap
        listed = {(int(a), int(b)): int(f) for a, b, f in zip(*klay.head_entries(h))}
        blocks = [np.flatnonzero(tok[i:i + bs] < t) + i for i in range(0, pos.size, bs)]  # real tokens
        for qb, rows in enumerate(blocks):
            for kb, cols in enumerate(blocks):
                flags = listed.get((qb, kb), 0)
                if flags & 1 or not rows.size or not cols.size:
                    continue
                want = layout.heads[h].allowed(layout.ctx, tok[rows][:, None], tok[cols][None, :])
                got = mask_fn(u[rows], u[cols], h, flags, _SeqLen(t), tables)
                bad = np.argwhere(np.broadcast_to(got, (rows.size, cols.size))
                                  != np.broadcast_to(want, (rows.size, cols.size)))
                assert bad.size == 0, (str(layout.heads[h]), h, qb, kb,
                                       [(tok[rows[i]], tok[cols[j]]) for i, j in bad[:3]])
    return gap


# ----------------------------------------------------------------------------------------


def test_header_names_the_pattern_and_source_is_python():
    p = patterncc.parse("window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)")
    src = codegen.generated_source(p)
    lines = src.splitlines()
    assert lines[0].startswith("# Generated by patterncc")
    assert lines[1] == f"# pattern: {p}"
    assert "#   heads 0, 1: " in src and "#   other heads: " in src
    ast.parse(src)
    for name in codegen.KERNEL_NAMES + ("token_mask", "token_mask_t"):
        assert f"def {name}(" in src
    assert "# @template-begin" not in src
    assert patterncc.compile(p).kernel_source() == src


def test_head_groups_become_branches():
    src = codegen.generated_source(patterncc.parse("window(8) | strided(64, heads=[1]) | sink(2, heads=[4, 5, 6])"))
    body = src[src.index("def token_mask("):src.index("def token_mask_t(")]
    assert "if (head == 1):" in body
    assert "elif ((head >= 4) & (head <= 6)):" in body
    assert "else:" in body
    single = codegen.generated_source(patterncc.parse("window(8) & causal"))
    body = single[single.index("def token_mask("):single.index("def token_mask_t(")]
    assert "if " not in body  # head-free pattern: no branching


def test_random_terms_lower_to_flag_bits():
    plan = codegen.analyse(patterncc.parse("random(64, seed=1) | (random(32, seed=2) & causal) | window(4)"))
    # the top-level random term is FULL wherever it holds: not in the predicate at all
    assert plan.random_nodes == (ir.Random(32, seed=2),)
    src = codegen.render(plan)
    assert "(((flags >> 1) & 1) != 0)" in src and "flags >> 2" not in src
    assert "# flag bit 1: random(32, seed=2)" in src
    assert codegen.analyse(patterncc.parse("random(64)")).groups[0][1] == ir.Empty()
    with pytest.raises(NotImplementedError):
        ir.Random(64).triton(ir.TritonNames())


def test_large_global_sets_read_a_membership_table():
    many = "global([" + ", ".join(str(3 * i) for i in range(40)) + "])"
    plan = codegen.analyse(patterncc.parse(f"{many} | global([1, 2]) | window(2)"))
    assert [len(g.items) for g in plan.table_nodes] == [40]
    src = codegen.render(plan)
    assert "(tl.load(tables + offs_m, mask=offs_m < SEQ_LEN, other=0) != 0)[:, None]" in src
    assert "(offs_m[:, None] == 1)" in src
    assert "== 117" not in src  # no comparison chain for the large set
    lay = get_layout(plan.pattern, 200, 1, 16)
    tab = lowering.membership_tables(lay, plan)
    assert tab.dtype == np.int8 and tab.shape == (200,) and tab.sum() == 40 and tab[117] == 1


@pytest.mark.parametrize("src,t,h,bs", [
    ("window(5) | global([0, -1]) | strided(9) & causal", 100, 1, 16),
    ("(random(32, seed=3) & causal) | (random(16, seed=4) & window(20)) | sink(3)", 150, 3, 16),
    ("window(4) | dilate(3, heads=[1])", 90, 2, 16),
    ("block(20, width=1) & causal | global(5..9)", 120, 2, 32),
    ("global([" + ", ".join(str(-5 * i - 1) for i in range(30)) + "]) & window(30)", 200, 1, 32),
    ("window(2, heads=[0]) | dense(heads=[1])", 64, 3, 16),
])
def test_predicate_matches_the_ir(src, t, h, bs):
    check_predicate(get_layout(patterncc.parse(src), t, h, bs))


@settings(max_examples=40, deadline=None)
@given(layout_cases(max_seq_len=150, max_heads=3, max_leaves=4, block_sizes=(16, 32)))
def test_predicate_matches_the_ir_on_generated_patterns(case):
    pattern, t, h, bs = case
    check_predicate(get_layout(pattern, t, h, bs))


@pytest.mark.parametrize("src,t,h,bs", [
    ("window(10) & causal", 100, 1, 16),
    ("causal & window(3) & window(7)", 64, 1, 16),
    ("window(2) & window(5)", 50, 1, 16),
    ("(window(8) & causal) | global([0])", 90, 2, 16),
    ("window(4, heads=[1]) & causal & window(9)", 80, 2, 16),
    ("(window(6) & causal & strided(4)) | dilate(2, heads=[0])", 120, 2, 16),
    ("window(4, dilation=2) & causal & window(5)", 70, 1, 16),
])
def test_merged_bands_are_the_same_predicate(src, t, h, bs, monkeypatch):
    monkeypatch.setattr(codegen, "MERGE_BANDS", True)
    check_predicate(get_layout(patterncc.parse(src), t, h, bs))


@settings(max_examples=40, deadline=None)
@given(layout_cases(max_seq_len=150, max_heads=3, max_leaves=4, block_sizes=(16, 32)))
def test_merged_bands_match_the_ir_on_generated_patterns(case):
    pattern, t, h, bs = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codegen, "MERGE_BANDS", True)
        check_predicate(get_layout(pattern, t, h, bs))


@pytest.mark.parametrize("src,t,h,bs,gap", [
    ("window(6) | dilate(2)", 100, 1, 16, 6),
    ("window(5) | dilate(3)", 101, 2, 16, 5),
    ("(window(8) & causal) | dilate(3)", 130, 2, 32, 8),
    ("window(4) | dilate(2, heads=[1])", 90, 2, 16, 4),               # head 0 tests tokens (u = t)
    ("window(3) | dilate(2, heads=[1]) | global([" + ", ".join(str(3 * i) for i in range(20)) + "], heads=[0])",
     120, 2, 16, 3),                                                  # a table read on head 0's tokens
    ("(window(6) & window(20, heads=[0])) | dilate(2)", 80, 2, 16, 6),  # one form for both groups
    ("window(4, dilation=2) | window(3, dilation=4)", 120, 1, 16, 6), # d = 2: window(4) | window(3, dilation=2)
    ("(window(3) & causal) | dilate(2)", 64, 1, 16, 3),               # no tail, no empty slot
    ("window(5) | global([0, 7]) | dilate(2)", 101, 2, 16, 0),        # a global moves with T: tokens
    ("window(4) | strided(3) | dilate(2)", 60, 1, 16, 0),             # unbounded form: tokens
    ("window(8)", 90, 2, 16, 0),                                      # token order
])
def test_class_predicate_matches_the_ir(src, t, h, bs, gap):
    assert check_class_predicate(get_layout(patterncc.parse(src), t, h, bs)) == gap


@st.composite
def class_form_cases(draw):
    """(source, T, heads, block) of patterns that run in residue order with class forms:
    unions of dilated windows, each maybe intersected with causal, another window or a
    stride of the factor, sometimes dilated further on head 1 (two factors side by side)."""
    d = draw(st.integers(2, 4))

    def term() -> str:
        src = f"window({draw(st.integers(1, 12))}, dilation={d * draw(st.integers(1, 2))})"
        extra = draw(st.sampled_from(["", "causal", "window", "strided"]))
        if extra == "window":
            extra = f"window({draw(st.integers(0, 40))}, dilation={d})"
        elif extra == "strided":
            extra = f"strided({d * draw(st.integers(1, 3))})"
        return f"({src} & {extra})" if extra else src
    src = " | ".join(term() for _ in range(draw(st.integers(1, 3))))
    heads = draw(st.integers(1, 3))
    if heads > 1 and draw(st.booleans()):
        src += f" | dilate({draw(st.integers(2, 3))}, heads=[1])"
    return src, draw(st.integers(2, 150)), heads, draw(st.sampled_from((16, 32)))


@settings(max_examples=60, deadline=None)
@given(class_form_cases(), st.booleans())
def test_class_predicate_matches_the_ir_on_generated_patterns(case, merge_bands):
    src, t, h, bs = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codegen, "MERGE_BANDS", merge_bands)
        assert check_class_predicate(get_layout(patterncc.parse(src), t, h, bs)) > 0, src


@settings(max_examples=30, deadline=None)
@given(layout_cases(max_seq_len=120, max_heads=3, max_leaves=4, block_sizes=(16, 32)))
def test_class_predicate_of_any_pattern_is_exact_or_not_used(case):
    pattern, t, h, bs = case
    check_class_predicate(get_layout(pattern, t, h, bs))


def test_class_forms_merge_equal_head_groups_and_alias_without_forms(monkeypatch, tmp_path):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    plan = codegen.analyse(patterncc.parse("window(8) | dilate(2, heads=[1])"))
    assert [plan.factor(h) for h in (0, 1, 2)] == [1, 2, 1]
    assert [str(f) for f in plan.class_forms] == ["window(8)", "window(8)"]
    body = codegen.render(plan)
    body = body[body.index("def class_mask("):body.index("# ---- kernels/")]
    assert "if " not in body  # both groups test window(8): no branch on the head
    plain = codegen.render(codegen.analyse(patterncc.parse("window(8) | global([0]) | dilate(2)")))
    assert "class_mask = token_mask" in plain and "def class_mask(" not in plain


def test_merged_bands_are_one_interval_in_the_forward_predicate_only(monkeypatch, tmp_path):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    p = patterncc.parse("window(1023) & causal")
    plain = codegen.render(codegen.analyse(p))
    monkeypatch.setattr(codegen, "MERGE_BANDS", True)
    merged = codegen.render(codegen.analyse(p))
    fwd, fwd_t = (merged[merged.index(f"def {a}("):merged.index(f"def {b}")]
                  for a, b in (("token_mask", "token_mask_t("), ("token_mask_t", "_mma(")))
    assert "(((offs_m[:, None] - offs_n[None, :]) >= 0) & ((offs_m[:, None] - offs_n[None, :]) <= 1023))" in fwd
    assert "<= offs_m" not in fwd and "-1023" not in fwd
    assert fwd_t == plain[plain.index("def token_mask_t("):plain.index("def _mma(")]  # dK/dV's as before
    merged_module = codegen.load(p)  # the in-memory module cache is keyed by the switch too
    monkeypatch.setattr(codegen, "MERGE_BANDS", False)
    assert codegen.render(codegen.analyse(p)) == plain
    assert codegen.load(p).source != merged_module.source


@pytest.mark.parametrize("switch,default_line,value,line", [
    ("AFFINE_TOKENS_MAX_HEAD_PAD", "AFFINE_MAX_HEAD_PAD = tl.constexpr(64)", 0, "AFFINE_MAX_HEAD_PAD = tl.constexpr(0)"),
    ("POSITION_STATS", "STATS_BY_POSITION = tl.constexpr(True)", False, "STATS_BY_POSITION = tl.constexpr(False)"),
    ("PAIRED_STATS", "STATS_PAIRED = tl.constexpr(True)", False, "STATS_PAIRED = tl.constexpr(False)"),
    ("PAIRED_STATS_MIN_HEAD_PAD", "STATS_PAIRED_MIN_HEAD_PAD = tl.constexpr(128)", 0,
     "STATS_PAIRED_MIN_HEAD_PAD = tl.constexpr(0)"),
    ("PEEL_THIN_COLUMN", "PEEL_THIN_COLUMN = tl.constexpr(True)", False, "PEEL_THIN_COLUMN = tl.constexpr(False)"),
])
def test_switch_changes_one_constexpr_and_the_module_key(switch, default_line, value, line, monkeypatch, tmp_path):
    """Codegen switches the kernels read as a constexpr of the generated header."""
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    p = patterncc.parse("window(6) | dilate(2)")
    default = codegen.load(p)
    assert default_line in default.source
    monkeypatch.setattr(codegen, switch, value)
    off = codegen.load(p)  # a new module: launches built under the other value are not reused
    assert off.source == default.source.replace(default_line, line)
    assert off.module is not default.module


@pytest.mark.parametrize("paired,min_pad,position,permuted,head_pad,want_pairs,want_by_position", [
    (True, 128, True, 0, 64, False, False),    # the default below its threshold, token order: by token
    (True, 128, True, 1, 64, False, True),     # ... residue order: by position, two buffers
    (True, 128, True, 0, 128, True, True),     # from the threshold up: pairs in every launch
    (True, 0, False, 0, 32, True, True),       # pairs at every head dim
    (False, 0, False, 1, 128, False, False),   # neither switch: by token even in residue order
    (False, 0, True, 2, 128, False, True),
])
def test_stats_layout_is_decided_by_the_module(paired, min_pad, position, permuted, head_pad, want_pairs,
                                               want_by_position, monkeypatch, tmp_path):
    """The generated module's stats_paired / stats_by_position, which the kernels evaluate at
    compile time and the backend asks to size the buffers, follow the codegen switches."""
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(codegen, "PAIRED_STATS", paired)
    monkeypatch.setattr(codegen, "PAIRED_STATS_MIN_HEAD_PAD", min_pad)
    monkeypatch.setattr(codegen, "POSITION_STATS", position)
    module = codegen.load(patterncc.parse("window(6) | dilate(2)")).module
    assert module.stats_paired(head_pad) is want_pairs
    assert module.stats_by_position(permuted, head_pad) is want_by_position


def test_modules_are_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = patterncc.parse("window(3) | sink(1) | global([2])")
    codegen.clear_memory_cache()
    writes = codegen.stats.writes
    gen = codegen.load(p)
    assert gen.path.parent == tmp_path / "kernels" and gen.path.read_text() == gen.source
    assert codegen.stats.writes == writes + 1
    hits = codegen.stats.hits
    assert codegen.load(p) is gen and codegen.stats.hits == hits + 1
    assert gen.kernel("_attn_fwd") is gen.module._attn_fwd
    codegen.clear_memory_cache()
    again = codegen.load(p)  # same file: not written again, module reused from sys.modules
    assert codegen.stats.writes == writes + 1 and again.module is gen.module
    assert [f.name for f in gen.path.parent.iterdir()] == [gen.path.name]  # no temp files left
    gen.path.write_text("corrupted")
    codegen.clear_memory_cache()
    codegen.load(p)
    assert gen.path.read_text() == gen.source


def aot_compile(gen, dtype: str, head_dim: int, block: int, rows: int, permuted: int,
                num_warps: int = 4, num_stages: int = 2, tile: int = 64, tma: bool = False,
                maxnreg: int | None = None, fold_scale: bool = True, thin_rows: bool = False,
                delta_from_o: bool = True, tail: bool = True, class_gap: int = 0, pair_thin: bool = False,
                thin_keys: bool = False, seq_len_16: bool = False) -> dict:
    """Compile every kernel of a generated module for sm_90 without a GPU (Triton's AOT
    path): {kernel name: compiled kernel}, whose n_regs / n_spills / metadata.shared tell
    registers, spills and shared memory. ``seq_len_16``: SEQ_LEN specialised as a multiple
    of 16, as Triton's JIT does for such a length where the kernel leaves it specialised
    (dK/dV with codegen.SEQ_LEN_CLASSES)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pad = lowering.head_pad(head_dim)
    walked = min(block, tile)
    consts = dict(HEAD_DIM=head_dim, HEAD_PAD=pad, LAYOUT_BLOCK=block, ROW_BLOCK=rows, PERMUTED=permuted,
                  NARROW=16, USE_TMA=tma, PRECISION="tf32", UPCAST=False, FOLD_SCALE=fold_scale,
                  THIN_ROWS=thin_rows, DELTA_FROM_O=delta_from_o, TAIL=tail, CLASS_GAP=class_gap,
                  PAIR_THIN=pair_thin, THIN_KEYS=thin_keys, THIN_M=min(block, 64))
    tiles = {"_attn_fwd": (rows, walked), "_attn_bwd_dq": (rows, walked), "_attn_bwd_dkdv": (walked, rows),
             "_attn_bwd_preprocess": (64, 64)}
    data = {"Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ"}
    index = {"item_row", "item_start", "item_end", "item_slot", "item_merge", "merge_start", "merge_end",
             "item_nstart", "item_nend", "kblock", "entry_flags", "nblock", "nflags", "qblock", "qhead",
             "head_dil", "head_seg", "item_thin", "Count"}

    def arg_type(name, box):
        if name in ("Kd", "Vd", "Qd", "dOd"):  # tensor descriptors with TMA, else the tensors again
            if not tma:
                return "*" + dtype
            return f"tensordesc<{dtype}[1, {box}, 1, {pad}]>" if permuted else f"tensordesc<{dtype}[1, {box}, {pad}]>"
        if name in data:
            return "*" + dtype
        if name in index:
            return "*i32"
        if name == "tables":
            return "*i8"
        if name in ("qk_scale", "sm_scale"):
            return "fp32"
        if name[0].isupper() and name not in ("SEQ_LEN", "NR", "B", "H", "GROUP", "M_BLOCKS", "STATS_LEN"):
            return "*fp32"  # Lse, Delta, scratch buffers
        return "i32"

    out = {}
    for name in codegen.KERNEL_NAMES:
        fn = gen.kernel(name)
        bm, bn = tiles[name]
        const = {a: v for a, v in {**consts, "BLOCK_M": bm, "BLOCK_N": bn}.items() if a in fn.arg_names}
        box = bm if name == "_attn_bwd_dkdv" else bn  # the walked tile
        sig = {a: "constexpr" if a in const else arg_type(a, box) for a in fn.arg_names}
        # Pointers 16-byte aligned, as Triton's JIT specialises every torch allocation: without
        # it the compiler cannot vectorise loads and the code is not what a GPU runs.
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                   if sig[a].startswith("*") or (seq_len_16 and a == "SEQ_LEN")}
        out[name] = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": num_warps, "num_stages": num_stages,
                                            **({"maxnreg": maxnreg} if maxnreg else {})})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype,head_dim,block,paired,peel", [("bf16", 80, 64, True, True),
                                                              ("fp16", 64, 128, True, True),
                                                              ("bf16", 64, 64, False, False)])
def test_kernels_compile_for_sm90_without_a_gpu(monkeypatch, tmp_path, dtype, head_dim, block, paired, peel):
    """Compile every generated kernel ahead of time for an H100 (sm_90): the CPU test run
    uses Triton's interpreter, which would not catch what only the compiler rejects.
    ``paired``: codegen.PAIRED_STATS (on by default) on, every variant (pairs from a padded head
    dim of 128: head dim 80 compiles them, 64 the two buffers); or off, the variants of the
    two-buffer LSE and Delta path. ``peel``: codegen.PEEL_THIN_COLUMN (on by default) on, or off."""
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        # Triton fixed interpreter mode for its own helpers when it was imported
        # (tests/conftest.py turns it on for the CPU run): compile in a fresh process.
        env = dict(os.environ, TRITON_INTERPRET="0")
        node = f"{__file__}::test_kernels_compile_for_sm90_without_a_gpu[{dtype}-{head_dim}-{block}-{paired}-{peel}]"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert " passed" in r.stdout
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(codegen, "PAIRED_STATS", paired)
    monkeypatch.setattr(codegen, "PEEL_THIN_COLUMN", peel)
    many = "global([" + ", ".join(str(7 * i) for i in range(20)) + "])"
    src = f"(window(8) | {many} | (random(64, seed=1) & causal) | strided(9, heads=[2])) | dilate(2, heads=[1])"
    gen = codegen.load(patterncc.parse(src))
    # token order (the forward's scale folded into exp2, and not: a scale <= 0); residue order
    # (both order modes) with stacked rows; token order with TMA descriptors, and residue
    # order with strided (4-D) ones; 128-row tiles at 8 warps under a register cap (the
    # capped candidates), and 4 warps under it by pointers (the H100's D=64 dK/dV tile)
    variants = ((0, block, False, 4, None, True), (0, block, False, 4, None, False),
                (1, 2 * block, False, 4, None, True), (2, 2 * block, False, 4, None, True),
                (0, block, True, 4, None, True), (1, block, True, 4, None, True),
                (0, max(block, 128), True, 8, 128, True), (0, block, False, 4, 128, True))
    # and thin items (lowering.THIN_ROWS: 16-row tiles in the forward and dQ; THIN_KEYS:
    # 16-key tiles in dK/dV), token order with TMA and residue order by pointers
    variants = [(*v, False) for v in variants] + [(0, block, True, 4, None, True, True),
                                                  (1, block, False, 4, None, True, True)]
    # and dQ reading Delta from its own pass (DELTA_IN_DQ off, or dK/dV alone: the others compute it)
    variants = [(*v, True) for v in variants] + [(0, block, True, 4, None, True, False, False)]
    # and the forward without the tail test (triton_backend.SKIP_TAIL_MASK, a walk with no
    # TAIL entry), token order with TMA and residue order with thin rows
    variants = [(*v, True) for v in variants] + [(0, block, True, 4, None, True, False, True, False),
                                                  (1, block, False, 4, None, True, True, True, False)]
    if not paired:  # LSE and Delta in two buffers: their writers (dQ, the Delta pass) and readers,
        # token and residue order, TMA
        variants = [(0, block, False, 4, None, True, True, True, True),
                    (1, block, False, 4, None, True, True, False, True),
                    (0, block, True, 4, None, True, False, False, True)]
    for permuted, rows, tma, warps, cap, fold, thin, delta, tail in variants:
        compiled_kernels = aot_compile(gen, dtype, head_dim, block, rows, permuted, warps, tma=tma, maxnreg=cap,
                                       fold_scale=fold, thin_rows=thin, delta_from_o=delta, tail=tail,
                                       thin_keys=thin)
        for name, compiled in compiled_kernels.items():
            assert compiled.asm.get("cubin"), name
            if tma and name != "_attn_bwd_preprocess":
                assert "cp.async.bulk.tensor" in compiled.asm["ptx"], f"{name}: no TMA copies"
            if cap:
                assert f".maxnreg {cap}" in compiled.asm["ptx"], f"{name}: register cap not applied"
            assert_exp2_once_per_tile(name, compiled.asm["ttgir"])
    # and dK/dV specialised on a length that is a multiple of 16 (codegen.SEQ_LEN_CLASSES),
    # token order with thin keys, by pointers and with TMA
    for tma in (False, True):
        dkdv = aot_compile(gen, dtype, head_dim, block, block, 0, tma=tma, thin_rows=True, thin_keys=True,
                           seq_len_16=True)["_attn_bwd_dkdv"]
        assert dkdv.asm.get("cubin")
        assert_exp2_once_per_tile("_attn_bwd_dkdv", dkdv.asm["ttgir"])
    # and residue order with class-coordinate masks (lowering.CLASS_MASK): by pointers with
    # the tail test, and through strided boxes without it
    gen = codegen.load(patterncc.parse("(window(8) & causal) | dilate(2)"))
    for tma, tail in ((False, True), (True, False)):
        compiled_kernels = aot_compile(gen, dtype, head_dim, block, block, 1, tma=tma, tail=tail,
                                       class_gap=gen.plan.class_gap)
        for name, compiled in compiled_kernels.items():
            assert compiled.asm.get("cubin"), name
            assert_exp2_once_per_tile(name, compiled.asm["ttgir"])


@pytest.mark.parametrize("on", [False, True])
def test_dkdv_leaves_seq_len_to_triton_only_with_length_classes(on, monkeypatch):
    """codegen.SEQ_LEN_CLASSES (on by default): the generated module's dK/dV kernel leaves
    SEQ_LEN out of do_not_specialize (Triton then compiles it per length class) only when on;
    the switch is part of the module's key."""
    pattern = patterncc.parse("window(4) | global([0])")
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", not on)
    other = codegen.load(pattern)
    monkeypatch.setattr(codegen, "SEQ_LEN_CLASSES", on)
    gen = codegen.load(pattern)
    line = next(x for x in gen.source.splitlines() if x.startswith("DKDV_UNSPECIALISED = "))
    assert ("'SEQ_LEN'" in line) == (not on) and "'NR', 'B', 'H'" in line
    assert "@triton.jit(do_not_specialize=DKDV_UNSPECIALISED)\ndef _attn_bwd_dkdv(" in gen.source
    assert gen is not other and gen.source != other.source


def assert_exp2_once_per_tile(name: str, ttgir: str) -> None:
    """Each loop's probability tile is exponentiated once: Triton can rematerialise the
    softmax in the layout of the second product and compute exp2 twice per element (it did
    for an if/else that both rewrote the scores; bench/RESULTS.md, 2026-12-01 run 4). With
    codegen.PEEL_THIN_COLUMN the forward's thin-column step (its 16-key tiles) has two copies,
    one before its loop and one in it."""
    shapes = collections.Counter(m.group(1) for line in ttgir.splitlines() if "math.exp2" in line
                                 for m in [re.search(r"tensor<(\d+x\d+)xf32", line)] if m)
    peeled = name == "_attn_fwd" and codegen.PEEL_THIN_COLUMN
    allowed = {shape: 2 if peeled and shape.endswith(f"x{lowering.NARROW}") else 1 for shape in shapes}
    assert shapes == allowed, f"{name}: exp2 tiles {dict(shapes)}"
