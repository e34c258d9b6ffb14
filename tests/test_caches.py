"""The caches: bounded in bytes (not only entries), safe under threads, and an on-disk
kernel cache that survives corrupted / half-written files and concurrent processes.

* ``Layout.nbytes()`` counts the layout's arrays plus what is memoised on it later (token
  masks, PyTorch plans, Triton kernel plans as device tensors); ``LayoutCache`` evicts the
  least recently used layouts until the total is under ``max_bytes`` (default
  ``$PATTERNCC_LAYOUT_CACHE_BYTES`` or 1 GiB), re-checking on every lookup since memoised
  data grows after a layout was cached;
* codegen's in-memory module cache is an LRU bounded in modules and bytes;
* 8 threads hammering ``get_layout``, ``codegen.load`` and op calls (through a tiny cache,
  so layouts are evicted and rebuilt under their feet) get the single-thread results;
* a garbage, truncated or non-UTF-8 generated module file, a garbage ``__pycache__`` entry
  and a stale temporary file are rebuilt or ignored; several processes generating the same
  new pattern at once into a fresh ``PATTERNCC_CACHE_DIR`` never see a partial file.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import patterncc
from patterncc import codegen, layout, lowering
from patterncc.backends import torch_backend
from patterncc.layout import LayoutCache, get_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A fresh PATTERNCC_CACHE_DIR and an empty in-memory module cache."""
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    codegen.clear_memory_cache()
    yield tmp_path / "kernels"
    codegen.clear_memory_cache()


def _arrays_nbytes(lay) -> int:
    return sum(a.nbytes for a in (lay.indptr, lay.kblock, lay.full, lay.t_indptr, lay.t_qblock, lay.t_entry))


# ----------------------------------------------------------------------------------------
# byte bounds


def test_layout_nbytes_counts_arrays_and_memoised_plans():
    lay = layout.build_layout(patterncc.parse("window(40) | global([0]) | random(64, seed=1)"), 2000, 2, 32)
    base = lay.nbytes()
    assert base >= _arrays_nbytes(lay)
    masks = lay.partial_masks()
    assert lay.nbytes() >= base + masks.nbytes
    before = lay.nbytes()
    plan = torch_backend.plan_for(lay, torch.device("cpu"))
    assert lay.nbytes() >= before + plan.entry_mask.nbytes  # torch tensors count too
    before = lay.nbytes()
    kplan = lowering.plan_for(lay, codegen.analyse(lay.pattern), "cpu", group=2)
    assert lay.nbytes() >= before + kplan.fwd.block.nbytes + kplan.fwd.flags.nbytes


def test_layout_cache_is_bounded_in_bytes():
    pats = [patterncc.parse(f"window({w}) | global([0])") for w in range(8, 40, 4)]
    one = layout.build_layout(pats[0], 3000, 2, 16).nbytes()
    cache = LayoutCache(max_entries=100, max_bytes=3 * one)
    got = [cache.get(p, 3000, 2, 16) for p in pats]
    assert 1 <= len(cache) < len(pats)
    assert cache.nbytes() <= 3 * one
    assert cache.get(pats[-1], 3000, 2, 16) is got[-1]  # the newest survived
    misses = cache.misses
    cache.get(pats[0], 3000, 2, 16)  # the oldest was evicted: rebuilt
    assert cache.misses == misses + 1


def test_memoised_growth_after_caching_is_enforced_on_the_next_lookup():
    p1, p2 = patterncc.parse("window(30) & causal"), patterncc.parse("window(31) & causal")
    a = layout.build_layout(p1, 4000, 2, 16)
    cache = LayoutCache(max_entries=10, max_bytes=3 * a.nbytes())
    first = cache.get(p1, 4000, 2, 16)
    second = cache.get(p2, 4000, 2, 16)
    assert len(cache) == 2
    second.partial_masks()  # grows far past the bound once cached (4000/16 rows x 3 blocks x 256 B)
    assert second.nbytes() > 3 * a.nbytes()
    assert cache.get(p2, 4000, 2, 16) is second  # the one asked for is kept ...
    assert len(cache) == 1  # ... and the others are evicted to make room
    assert cache.get(p1, 4000, 2, 16) is not first


def test_single_layout_over_the_bound_is_still_returned_and_cached():
    cache = LayoutCache(max_bytes=1)
    p = patterncc.parse("window(5)")
    a = cache.get(p, 500, 1, 16)
    assert cache.get(p, 500, 1, 16) is a and len(cache) == 1


@pytest.mark.parametrize("text,expected", [("", 1 << 30), ("123456", 123456), ("512M", 512 << 20),
                                           ("2g", 2 << 30), ("64K", 64 << 10), ("0", 0)])
def test_layout_cache_bytes_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv("PATTERNCC_LAYOUT_CACHE_BYTES", text)
    assert LayoutCache().max_bytes == expected


@pytest.mark.parametrize("text", ["lots", "-5", "1.5G", "12Q"])
def test_malformed_cache_bytes_warn_and_use_the_default(monkeypatch, text):
    monkeypatch.setenv("PATTERNCC_LAYOUT_CACHE_BYTES", text)
    with pytest.warns(UserWarning, match="PATTERNCC_LAYOUT_CACHE_BYTES"):
        assert LayoutCache().max_bytes == layout.DEFAULT_CACHE_BYTES


def test_global_cache_defaults_to_one_gib():
    assert layout.DEFAULT_CACHE_BYTES == 1 << 30
    assert layout.CACHE.max_bytes > 0


def test_module_cache_is_bounded_in_modules_and_bytes(kernel_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(codegen, "MAX_MODULES", 3)
    pats = [patterncc.parse(f"window({w}) & causal") for w in range(100, 106)]
    gens = [codegen.load(p) for p in pats]
    assert len(codegen._modules) == 3
    evicted = gens[0].module.__name__
    assert evicted not in sys.modules  # forgotten entirely, so its memory can go
    assert gens[-1].module.__name__ in sys.modules
    assert gens[0].kernel("_attn_fwd") is not None  # a holder keeps using what it has
    loads = codegen.stats.loads
    again = codegen.load(pats[0])  # re-imported from the file on disk, not regenerated
    assert again.module is not gens[0].module and codegen.stats.loads == loads + 1
    assert again.source == gens[0].source

    monkeypatch.setattr(codegen, "MAX_MODULES", 100)
    monkeypatch.setattr(codegen, "MAX_MODULE_BYTES", int(1.5 * len(gens[0].source)))
    codegen.load(pats[1])
    assert len(codegen._modules) == 1  # over the byte bound: only the newest is kept
    assert codegen.module_bytes(codegen.load(pats[1])) >= len(gens[1].source)


# ----------------------------------------------------------------------------------------
# threads


@pytest.fixture
def one_intra_op_thread():
    """torch's CPU matmuls and reductions may round differently with a different number of
    intra-op threads (which busy Python threads can change); one thread keeps the bitwise
    comparison below about patterncc's caches, not about torch's thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_eight_threads_hammering_layouts_modules_and_ops(kernel_dir, monkeypatch, one_intra_op_thread):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    sources = ["window(6) | global([0])", "(window(9) | dilate(2, heads=[1])) & causal",
               "random(32, seed=4) | sink(2)", "block(16, width=1) | strided(11)"]
    pats = [patterncc.parse(s) for s in sources]
    shapes = [(70, 2), (101, 2), (64, 4)]
    ops = [patterncc.compile(p, block_size=16, backend="torch") for p in pats]
    g = torch.Generator().manual_seed(0)
    qkv = {t: [torch.randn(1, 4, t, 8, generator=g) for _ in range(3)] for t, _ in shapes}

    # single-thread answers, through a normal cache
    expect_layout = {(i, t, h): get_layout(p, t, h, 16) for i, p in enumerate(pats) for t, h in shapes}
    expect_out = {(i, t): op(*qkv[t]) for i, op in enumerate(ops) for t, _ in shapes}
    expect_src = {i: codegen.generated_source(p) for i, p in enumerate(pats)}

    # a tiny cache: layouts are evicted and rebuilt while other threads use them
    monkeypatch.setattr(layout, "CACHE", LayoutCache(max_entries=3, max_bytes=200_000))
    codegen.clear_memory_cache()
    monkeypatch.setattr(codegen, "MAX_MODULES", 2)
    errors, done = [], []
    start = threading.Barrier(8)

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(25):
                i = int(rng.integers(len(pats)))
                t, h = shapes[int(rng.integers(len(shapes)))]
                kind = rng.integers(3)
                if kind == 0:
                    lay = get_layout(pats[i], t, h, 16)
                    ref = expect_layout[(i, t, h)]
                    assert np.array_equal(lay.indptr, ref.indptr) and np.array_equal(lay.kblock, ref.kblock)
                    assert np.array_equal(lay.full, ref.full) and np.array_equal(lay.t_entry, ref.t_entry)
                    assert np.array_equal(lay.partial_masks(), ref.partial_masks())
                elif kind == 1:
                    gen = codegen.load(pats[i])
                    assert gen.source == expect_src[i] and gen.kernel("_attn_fwd") is not None
                else:
                    out, want = ops[i](*qkv[t]), expect_out[(i, t)]
                    assert torch.equal(out, want), f"{sources[i]!r} at T={t}: max |diff| {(out - want).abs().max():.3g}"
            done.append(seed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[0]
    assert sorted(done) == list(range(8))
    assert len(layout.CACHE) <= 3


def test_concurrent_misses_of_one_key_build_once():
    cache = LayoutCache()
    p = patterncc.parse("window(50) | global([0, -1]) | random(64, seed=9)")
    got, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        got.append(cache.get(p, 20_000, 4, 16))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(got) == 8 and all(x is got[0] for x in got)
    assert cache.misses == 1 and cache.hits == 7


def test_concurrent_loads_of_a_new_module_import_it_once(kernel_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = patterncc.parse(f"window({uuid.uuid4().int % 10_000 + 7}) | sink(3)")
    got, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        got.append(codegen.load(p))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert [f.name for f in kernel_dir.iterdir()] == [got[0].path.name]


# ----------------------------------------------------------------------------------------
# the on-disk kernel cache


@pytest.mark.parametrize("garbage", [b"garbage = (", b"\xff\xfe\x00not utf-8\x80", b"", "truncated"])
def test_corrupted_module_file_is_regenerated(kernel_dir, monkeypatch, garbage):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = patterncc.parse("window(7) | global([1, -2])")
    gen = codegen.load(p)
    data = gen.source.encode()[:len(gen.source) // 2] if garbage == "truncated" else garbage
    gen.path.write_bytes(data)
    codegen.clear_memory_cache()
    writes = codegen.stats.writes
    again = codegen.load(p)
    assert again.path == gen.path and gen.path.read_text(encoding="utf-8") == gen.source
    assert codegen.stats.writes == writes + 1


def test_unwritable_cache_directory_falls_back_to_a_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(blocker))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    codegen.clear_memory_cache()
    gen = codegen.load(patterncc.parse(f"window({uuid.uuid4().int % 10_000 + 11}) & causal"))
    assert gen.path.read_text() == gen.source and blocker.read_text().startswith("a file")
    codegen.clear_memory_cache()


_CHILD = textwrap.dedent("""
    import os, sys, time, hashlib
    from pathlib import Path
    os.environ["TRITON_INTERPRET"] = "1"
    import patterncc
    from patterncc import codegen
    src, go, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    pattern = patterncc.parse(src)
    source = codegen.generated_source(pattern)
    path = codegen.cache_dir() / ("pcc_" + hashlib.sha256(source.encode()).hexdigest()[:20] + ".py")
    deadline = time.time() + 60
    while not go.exists() and time.time() < deadline:  # start together
        time.sleep(0.005)
    partial = 0
    for i in range(rounds):  # race writers against readers: a reader sees all or nothing
        if i % 3 == 0:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        codegen._write_once(path, source)
        try:
            if path.read_bytes() != source.encode():
                partial += 1
        except FileNotFoundError:
            pass
    gen = codegen.load(pattern)
    assert gen.source == source and gen.path == path, gen.path
    assert callable(getattr(gen.module, "token_mask", None))
    print("OK", partial, gen.path.name)
""")


def test_processes_generating_one_new_pattern_at_once(tmp_path):
    env = dict(os.environ, PATTERNCC_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    src = f"window({uuid.uuid4().int % 100_000 + 13}) | global([0, -1]) | random(32, seed=5)"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, src, str(go), "300"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(0.5)
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    lines = [out.split() for out, _ in results]
    assert all(line[0] == "OK" and line[1] == "0" for line in lines), lines  # never a partial file
    assert len({line[2] for line in lines}) == 1
    files = sorted(f.name for f in (tmp_path / "cache" / "kernels").iterdir())
    assert files == [lines[0][2]], files  # one module, no temporary files left behind


def test_fresh_process_survives_garbage_module_and_pycache(tmp_path):
    """A new process finds a garbage module file and a garbage byte-code cache entry."""
    env = dict(os.environ, PATTERNCC_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    src = "window(5) | sink(2) | strided(9)"
    script = ("import patterncc; from patterncc import codegen; g = codegen.load(patterncc.parse(%r)); "
              "assert g.path.read_text() == g.source; print(g.path)" % src)
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    path = Path(first.stdout.split()[-1])
    pycache = path.parent / "__pycache__"
    pycache.mkdir(exist_ok=True)
    tag = sys.implementation.cache_tag
    (pycache / f"{path.stem}.{tag}.pyc").write_bytes(b"\x00" * 16 + b"garbage" * 50)
    path.write_bytes(b"\x00\x01 half-written")
    (path.parent / f"{path.stem}.abc123.tmp").write_bytes(b"left by a crashed writer")
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert path.read_bytes().startswith(b"# Generated by patterncc")
