"""Benchmark patterncc against dense SDPA and FlexAttention on the reference patterns.

One run times, per (T, pattern, head dim): dense scaled_dot_product_attention with the
flash backend and with the cuDNN backend, FlexAttention on the same pattern, and
patterncc's Triton op, forward and forward+backward (bf16, B=1, H=16), median of
triton.testing.do_bench. It writes ``bench/results/<date>-<device>.json`` (``$OUT`` instead
of bench/results, ``-$TAG`` before .json if set; rewritten after every row, so a run cut
short by a time limit keeps what it measured) and prints a Markdown table for
``bench/RESULTS.md``. Unknown PATTERNS or ABLATE names stop it before it starts.

    python bench/bench_attention.py                       # T = 4096, 16384, 65536; D = 64, 128
    TS=16384 DS=64 PATTERNS=longformer,dilated python bench/bench_attention.py
    ABLATE=residue,tokens,thin,stack,split,fold,rtma,thinrows,direct,scratch,delta,tailfree,bands,classmask python bench/bench_attention.py  # A/B rows

Each row also records what the kernels walked (blocks and FULL fraction in kernel order,
narrow thin-column tiles) and the launch configurations used. ABLATE adds rows for the
same pattern with ``residue`` (residue order of dilated heads), ``tokens`` (division-free
residue tokens, order mode 1) or ``thin`` (narrow tiles of thin global columns) turned
off, or ``stack`` (128-row tiles whatever their extra pairs and however K/V are loaded:
lowering.STACK_WASTE, TALL_ONLY_GATHERED) forced, or ``split`` (split rows' pieces launched
first: lowering.SPLIT_FIRST) or ``fold`` (the forward's scale folded into exp2's
FFMA: lowering.FOLD_SCALE) or ``rtma`` (residue-order tiles through strided TMA boxes:
lowering.RESIDUE_TMA) or ``thinrows`` (global query rows' far blocks walked with 16-row
tiles: lowering.THIN_ROWS) or ``direct`` (repeated launches straight into the compiled
kernels: triton_backend.DIRECT_LAUNCH, a host-time change) or ``pointers`` (direct launches
pass tensors' addresses: triton_backend.POINTER_ARGS, host time) turned off, or
``scratch`` (four times the split-row scratch budget, so shorter pieces:
lowering.SCRATCH_FRACTION) given, or ``tailfree`` (forward walks with masked entries and
no TAIL entries run a kernel compiled without the tail test: triton_backend.SKIP_TAIL_MASK)
or ``classmask`` (residue-order PARTIAL tiles tested on class coordinates:
lowering.CLASS_MASK; dilated patterns only) turned off, or ``bands`` (an intersection's
diagonal bands tested as one interval: codegen.MERGE_BANDS; causal window only) turned on,
timed in the same run (with the variant's host time per forward), each followed by the
default timed again: an ablation row compares the variant with
that re-timed default, since the pattern's own row is timed first and a freshly warmed GPU ran
2-4% fast then (fourteenth session); the row's first times are kept as ``first_*``.

eff = (dense flash time x pattern density) / time, as in DESIGN.md: 1.0 means as fast per
attended pair as dense FlashAttention. eff_cudnn uses the cuDNN dense time instead.

Each row also has the forward's GPU time alone (``pcc_fwd_graph_ms``, ``flex_fwd_graph_ms``:
replayed from a CUDA graph under no_grad) and patterncc's host time per call
(``pcc_host_fwd_ms``): at short sequences the eager op can wait on Python (bench/RESULTS.md,
third session), and these columns tell a kernel change from host noise. The forward+backward's
GPU time is ``pcc_fwdbwd_kernel_ms`` / ``flex_fwdbwd_kernel_ms``: its kernels' durations
summed (torch.profiler, gradients set to None before each step, L2 not flushed), so the gap
to the do_bench time is what the host adds. Before a pattern's timings, patterncc and Flex
each run their forward+backward untimed for 0.5 s (``settle``). Where a row's wall time went:
``flex_setup_s`` (Flex's block mask, compile and settle; ``flex_mask_s`` the block mask's
part) and ``row_s`` (the whole row, its A/B rows not counted), for planning device calls.
Flex's block mask is ``flex_block_mask``'s: the one ``create_block_mask`` builds (the same
blocks in the same order, tested), without the Inductor compile that cost 3-4 minutes of ptxas
per mask shape on the H100 machine (FLEX_MASK=slabs, the default); FLEX_MASK=compile builds it with
``create_block_mask(..., _compile=True)`` as before the thirty-first session.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patterncc  # noqa: E402
from patterncc import codegen, lowering  # noqa: E402
from patterncc.backends import triton_backend, tuning  # noqa: E402

# A/B variants: switches of patterncc.lowering and the values they take.
ABLATIONS = {"residue": {"RESIDUE_ORDER": False}, "thin": {"THIN_COLUMNS": False},
             "tokens": {"FAST_RESIDUE_TOKENS": False},
             "stack": {"STACK_WASTE": 1e9, "TALL_ONLY_GATHERED": False}, "split": {"SPLIT_FIRST": False},
             "fold": {"FOLD_SCALE": False}, "rtma": {"RESIDUE_TMA": False}, "thinrows": {"THIN_ROWS": False},
             "direct": {"DIRECT_LAUNCH": False}, "pointers": {"POINTER_ARGS": False},
             "scratch": {"SCRATCH_FRACTION": 0.2}, "delta": {"DELTA_IN_DQ": False},
             "tailfree": {"SKIP_TAIL_MASK": False}, "bands": {"MERGE_BANDS": True},
             "classmask": {"CLASS_MASK": False}, "affine": {"AFFINE_TOKENS_MAX_HEAD_PAD": 0},
             "affine128": {"AFFINE_TOKENS_MAX_HEAD_PAD": 256}, "spread": {"SPREAD_PIECES": 0.0},
             "spreadcap": {"SPREAD_SLOTS": 1}, "pairthin": {"PAIR_THIN": False}, "thinkeys": {"THIN_KEYS": False},
             "seqlen16": {"SEQ_LEN_CLASSES": False}, "posstats": {"POSITION_STATS": False},
             "pairs": {"PAIRED_STATS": False}, "pairsall": {"PAIRED_STATS_MIN_HEAD_PAD": 0},
             "nocap": {"CONFIGS": {("dkdv", 64): tuning.K(32, 64, 4, 3)}},
             "cap128": {"CONFIGS": {("dkdv", 64): tuning.K(32, 64, 4, 3, maxnreg=128)}},
             "cap128s2": {"CONFIGS": {("dkdv", 64): tuning.K(32, 64, 4, 2, maxnreg=128)}},
             "nopeel": {"PEEL_THIN_COLUMN": False}}
# What a row must have for its A/B switch to change anything (other switches: every row).
APPLIES = {"residue": lambda r: r["residue_heads"], "tokens": lambda r: r["residue_heads"],
           "rtma": lambda r: r["residue_heads"], "thin": lambda r: r["narrow_tiles_fwd"],
           "stack": lambda r: r["rows"]["fwd"] <= 64, "split": lambda r: r["split_rows_fwd"],
           "thinrows": lambda r: r["split_rows_fwd"], "scratch": lambda r: r["split_rows_fwd"],
           "spread": lambda r: r["split_rows_fwd"], "spreadcap": lambda r: r["split_rows_fwd"],
           "pairthin": lambda r: r["split_rows_fwd"], "thinkeys": lambda r: r["thin_key_items_kv"],
           "bands": lambda r: r["pattern"] == "causal_window", "classmask": lambda r: r["residue_heads"],
           "affine": lambda r: r["residue_heads"] and lowering.head_pad(r["D"]) <= codegen.AFFINE_TOKENS_MAX_HEAD_PAD,
           "affine128": lambda r: r["residue_heads"] and lowering.head_pad(r["D"]) > codegen.AFFINE_TOKENS_MAX_HEAD_PAD,
           "tailfree": lambda r: r["kernel_full_fraction"] < 1, "seqlen16": lambda r: r["T"] % 16 == 0,
           "posstats": lambda r: r["residue_heads"], "pairsall": lambda r: lowering.head_pad(r["D"]) < 128,
           "nocap": lambda r: r["D"] == 64, "cap128": lambda r: r["D"] == 64, "cap128s2": lambda r: r["D"] == 64,
           "nopeel": lambda r: r["narrow_tiles_fwd"]}
LABELS = {"residue": "residue order off", "thin": "thin columns off", "stack": "tall rows forced",
          "tokens": "general residue tokens", "split": "split rows first off",
          "fold": "scale fold off", "rtma": "residue TMA boxes off", "thinrows": "thin query rows off",
          "direct": "direct launches off", "pointers": "tensors, not addresses, to direct launches",
          "scratch": "4x split-row scratch", "delta": "Delta pass of its own",
          "tailfree": "tail-free forward kernel off", "bands": "merged diagonal bands on",
          "classmask": "class-coordinate masks off", "affine": "affine walked tokens off",
          "affine128": "affine walked tokens at every head dim", "spread": "thin-row pieces first, not spread",
          "spreadcap": "thin-row pieces spread over SPREAD_PIECES whatever the launch's length",
          "pairthin": "thin-row items one key tile a step",
          "thinkeys": "thin-key items off (dK/dV walks global keys' far blocks whole, not with 16-key tiles)",
          "seqlen16": "dK/dV compiled once for every length (no vector LSE and Delta loads for multiples of 16)",
          "posstats": "residue order's Delta and LSE by token, not by kernel position (strided dK/dV loads)",
          "pairs": "LSE and Delta in two buffers, by token in token order (two masked dK/dV loads), not as pairs",
          "pairsall": "LSE and Delta as pairs at every head dim (the default: from a padded head dim of 128)",
          "nocap": "dK/dV at D=64 not capped at 128 registers (32x64, 3 stages: three programs per SM, not four)",
          "cap128": "dK/dV at D=64 capped at 128 registers (32x64, 3 stages: the H100 table's tile, for other GPUs)",
          "cap128s2": "dK/dV at D=64 capped at 128 registers, 2 stages (four programs per SM)",
          "nopeel": "the forward's thin-column steps all in its pipelined loop (the first not peeled)"}

# The reference patterns of DESIGN.md, in the pattern language.
PATTERNS = {
    "longformer": "window(256) | global([0])",
    "bigbird": "block(64, width=1) | global(0..128) | random(192, seed=1)",
    "causal_window": "window(1023) & causal",
    "dilated": "window(256) | dilate(2)",
}


def flex_mask_mod(name: str, op, T: int, H: int, dev: str):
    """The same pattern as a FlexAttention mask_mod (random blocks taken from patterncc's layout)."""
    if name == "longformer":
        return lambda b, h, q, k: ((q - k).abs() <= 256) | (q == 0) | (k == 0)
    if name == "causal_window":
        return lambda b, h, q, k: (q >= k) & (q - k <= 1023)
    if name == "dilated":
        return lambda b, h, q, k: ((q - k).abs() <= 512) & ((q - k) % 2 == 0)
    if name == "bigbird":
        lay = op.layout(T, H)
        nb = lay.nblocks
        rnd = torch.zeros(H, nb, nb, dtype=torch.bool)
        for h in range(H):
            r = [n for n in lay.heads[h].walk() if isinstance(n, patterncc.ir.Random)][0]
            sel = torch.as_tensor(r.chosen(lay.ctx))
            rnd[h].scatter_(1, sel, True)
        rnd = rnd.to(dev)
        def bigbird(b, h, q, k):
            qb, kb = q // 64, k // 64
            return ((qb - kb).abs() <= 1) | (q < 128) | (k < 128) | rnd[h, qb, kb]
        return bigbird
    raise KeyError(name)


# FlexAttention's block size: create_block_mask's default, which the Flex rows have always used.
FLEX_BLOCK = 128
# Elements of the mask evaluated at once (heads x query rows x keys) by flex_block_mask.
FLEX_MASK_CHUNK = 1 << 26
# $FLEX_MASK: how the Flex rows' block mask is built.
FLEX_MASKS = {"slabs": "flex_block_mask (the default)", "compile": "create_block_mask(..., _compile=True)"}


def flex_block_mask(mask_mod, heads: int, T: int, dev: str, block: int = FLEX_BLOCK,
                    chunk: int = FLEX_MASK_CHUNK):
    """FlexAttention's BlockMask for ``mask_mod`` (B=1, ``heads`` mask heads, a T x T mask),
    the one ``create_block_mask`` gives, without its compile: the mask evaluated on the device
    by broadcasting, a slab of whole query blocks at a time (about ``chunk`` elements), each
    block classed FULL (every pair), partial (some) or empty by FlexAttention's own helpers.
    On the H100 machine ``create_block_mask(..., _compile=True)`` spent 3-4 minutes per mask
    shape in ptxas on Inductor's kernel that sorts each row's blocks (thirty-first session);
    this takes seconds, and Flex then runs the same block mask (tests/test_bench_tools.py
    checks it against ``create_block_mask``)."""
    from torch.nn.attention.flex_attention import (_convert_mask_to_block_mask,
                                                   _create_sparse_block_from_block_mask)
    rows = max(block, chunk // (heads * T) // block * block)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    h = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    k = torch.arange(T, device=dev).view(1, 1, 1, T)
    partial, full = [], []
    for q0 in range(0, T, rows):
        q = torch.arange(q0, min(q0 + rows, T), device=dev).view(1, 1, -1, 1)
        m = torch.as_tensor(mask_mod(b, h, q, k), device=dev).expand(1, heads, q.shape[2], T)
        p, f = _convert_mask_to_block_mask(m, block, block, separate_full_blocks=True)
        partial.append(p)
        full.append(f)
    return _create_sparse_block_from_block_mask((torch.cat(partial, 2), torch.cat(full, 2)), mask_mod,
                                                (T, T), block, block)


def _fresh_grads(fn, grads: list):
    """``fn`` with ``grads`` set to None before each call (as do_bench's grad_to_none: no
    accumulation kernels in what is measured)."""
    def step():
        for x in grads:
            x.grad = None
        fn()
    return step


def settle(fn, grads: list, seconds: float = 0.5) -> None:
    """Run ``fn`` (a forward+backward step) untimed for ``seconds`` before a pattern's first
    timing, gradients reset each time: its backward kernels compiled, and the first timed
    row no longer slower than the same call timed later (tenth session: BigBird's 16K
    forward 0.29-0.31 ms when timed first after its compile, 0.15-0.16 ms later in the
    same run)."""
    step = _fresh_grads(fn, grads)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
    torch.cuda.synchronize()
    for x in grads:
        x.grad = None


def bench(fn, grad_to_none=None):
    """do_bench's median, after a full garbage collection: a first call that compiled leaves
    many young objects, and a collection of them inside the timed calls is host time the
    op does not have in steady state (it showed as the first-measured row's host time)."""
    from triton.testing import do_bench
    gc.collect()
    return do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grad_to_none)


def bench_graph(fn, what: str):
    """Median GPU time of ``fn`` replayed from a CUDA graph, under no_grad: kernel time with
    no host time in it (None if it cannot be captured)."""
    from triton.testing import do_bench_cudagraph

    def run():
        with torch.no_grad():
            fn()
    gc.collect()
    try:
        return do_bench_cudagraph(run, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a capture failure only loses this column
        print(f"graph {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def kernel_ms(fn, grads: list, n: int = 10, by_name: dict | None = None):
    """The summed duration of the GPU kernels (and copies) of one ``fn()`` call, from
    torch.profiler over ``n`` calls: GPU busy time without the host's gaps, for steps a
    CUDA graph cannot easily hold (forward+backward). ``grads`` are set to None before
    each call (no accumulation kernels). None if the profiler gives no device events.
    ``by_name`` gets ms per call per kernel name (the name's first 48 characters)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    step = _fresh_grads(fn, grads)
    step()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        us = sum(e.time_range.elapsed_us() for e in events)
        if by_name is not None:
            for e in events:
                by_name[e.name[:48]] = by_name.get(e.name[:48], 0.0) + e.time_range.elapsed_us() / n / 1e3
    except Exception as e:  # noqa: BLE001 - a profiler failure only loses this column
        print(f"kernel_ms failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return us / n / 1e3 if us else None


def host_ms(fn, n: int = 50, ahead: bool = False) -> float:
    """Host time per call of ``fn`` issued back to back (no synchronisation between calls):
    a time near do_bench's means the call is host-bound. ``ahead``: a sleep kernel keeps the
    GPU busy meanwhile, so the host never waits on it or on a full launch queue (keep n
    calls of a few launches far below its ~1000 entries): what issuing a call costs."""
    fn()
    gc.collect()  # (as bench: no collection of a compile's garbage inside the timing)
    torch.cuda.synchronize()
    if ahead:
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


def tuned_as() -> str | None:
    """``TUNED_AS=<a key of tuning.TUNED>``: this GPU looks its launch configurations up in
    that GPU's table (a GPU the table lacks then runs, say, the H200's measured configs
    rather than DEFAULT under PATTERNCC_AUTOTUNE=0, or a first-use sweep). Recorded in the
    results' meta; call once, before the first op."""
    name = os.environ.get("TUNED_AS")
    if name:
        checked_names([name], tuning.TUNED, "TUNED_AS")
        tuning.TUNED = {torch.cuda.get_device_name(): tuning.TUNED[name], **tuning.TUNED}
    return name


def source_digest(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 (16 hex digits) of the package and kernel template sources as they run: which
    code a result measured, where the machine's copy has no reliable git metadata (the lent
    GPU's did not). Run on a checkout of a commit, it gives that commit's value."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted([*(root / "patterncc").rglob("*.py"), *(root / "kernels").glob("*.py")]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict:
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "patterncc": patterncc.__version__,
            "source": source_digest(),
            "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "tuned_as": os.environ.get("TUNED_AS")}


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 1000
    warnings.filterwarnings("ignore")
    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    B, H = 1, 16
    Ts = [int(x) for x in os.environ.get("TS", "4096,16384,65536").split(",")]
    Ds = [int(x) for x in os.environ.get("DS", "64,128").split(",")]
    names = checked_names(os.environ.get("PATTERNS", ",".join(PATTERNS)).split(","), PATTERNS, "PATTERNS")
    skip_flex = os.environ.get("SKIP_FLEX") == "1"
    mask_by, = checked_names([os.environ.get("FLEX_MASK") or "slabs"], FLEX_MASKS, "FLEX_MASK")
    ablate = checked_names([a for a in os.environ.get("ABLATE", "").split(",") if a], ABLATIONS, "ABLATE")
    tuned_as()
    meta = versions()
    path = results_path(meta)
    rows = []

    def record(row: dict) -> None:
        """Keep a row, print it, and rewrite the JSON file: a run cut short keeps what it measured."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps({"meta": meta, "setup": {"B": B, "H": H, "dtype": "bfloat16", "block_size": 64},
                                    "rows": rows}, indent=1))
    done, total = 0, len(Ds) * len(Ts) * len(names)
    for D in Ds:
        for T in Ts:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            dense = {}
            for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        f = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                        def fb():
                            F.scaled_dot_product_attention(q, k, v).backward(do)
                        dense[label] = (f, bench(fb, [q, k, v]))
                except Exception as e:  # cuDNN may be missing for a shape
                    print(f"dense {label} failed: {e}", file=sys.stderr)
                    dense[label] = (None, None)
            for name in names:
                done += 1
                _progress(done, total, f"D={D} T={T} {name}")
                row_t0 = time.perf_counter()
                op = patterncc.compile(PATTERNS[name], block_size=64, backend="triton")
                lay = op.layout(T, H)
                density = lay.density
                t0 = time.perf_counter()
                out = op(q, k, v)
                torch.cuda.synchronize()
                first_call = time.perf_counter() - t0
                def pfb():
                    op(q, k, v).backward(do)
                settle(pfb, [q, k, v])
                pf = bench(lambda: op(q, k, v))
                pf_graph = bench_graph(lambda: op(q, k, v), f"pcc {name}")
                pf_host = host_ms(lambda: op(q, k, v))
                pfb_ms = bench(pfb, [q, k, v])
                pfb_kernels: dict = {}
                pfb_kernel = kernel_ms(pfb, [q, k, v], by_name=pfb_kernels)
                flex_f = flex_fb = flex_graph = flex_fb_kernel = flex_setup = flex_mask = None
                if not skip_flex:
                    try:
                        flex_t0 = time.perf_counter()
                        mm = flex_mask_mod(name, op, T, H, dev)
                        mask_heads = H if name == "bigbird" else None  # (BigBird's random blocks differ by head)
                        if mask_by == "compile":
                            bm = create_block_mask(mm, None, mask_heads, T, T, device=dev, _compile=True)
                        else:
                            bm = flex_block_mask(mm, mask_heads or 1, T, dev)
                        torch.cuda.synchronize()
                        flex_mask = time.perf_counter() - flex_t0  # (its part of flex_setup_s)
                        def ffb():
                            flex(q, k, v, block_mask=bm).backward(do)
                        flex(q, k, v, block_mask=bm)
                        settle(ffb, [q, k, v])
                        flex_setup = time.perf_counter() - flex_t0
                        flex_f = bench(lambda: flex(q, k, v, block_mask=bm))
                        flex_graph = bench_graph(lambda: flex(q, k, v, block_mask=bm), f"flex {name}")
                        flex_fb = bench(ffb, [q, k, v])
                        flex_fb_kernel = kernel_ms(ffb, [q, k, v])
                    except Exception as e:
                        print(f"flex {name} T={T} failed: {type(e).__name__}: {e}", file=sys.stderr)
                df, dfb = dense["flash"]
                cf, cfb = dense["cudnn"]
                r = dict(T=T, pattern=name, D=D, density=round(density, 5), block_density=round(lay.block_density, 5),
                         full_fraction=round(lay.full_fraction, 4),
                         dense_fwd_ms=df, dense_fwdbwd_ms=dfb, cudnn_fwd_ms=cf, cudnn_fwdbwd_ms=cfb,
                         flex_fwd_ms=flex_f, flex_fwdbwd_ms=flex_fb, pcc_fwd_ms=pf, pcc_fwdbwd_ms=pfb_ms,
                         eff_fwd=df * density / pf if df else None,
                         eff_fwdbwd=dfb * density / pfb_ms if dfb else None,
                         eff_cudnn_fwd=cf * density / pf if cf else None,
                         eff_cudnn_fwdbwd=cfb * density / pfb_ms if cfb else None,
                         flex_eff_fwd=df * density / flex_f if (df and flex_f) else None,
                         flex_eff_fwdbwd=dfb * density / flex_fb if (dfb and flex_fb) else None,
                         speedup_vs_flex_fwd=flex_f / pf if flex_f else None,
                         speedup_vs_flex_fwdbwd=flex_fb / pfb_ms if flex_fb else None,
                         pcc_first_call_s=round(first_call, 3),
                         pcc_host_fwd_ms=pf_host, pcc_fwd_graph_ms=pf_graph, flex_fwd_graph_ms=flex_graph,
                         eff_fwd_graph=df * density / pf_graph if (df and pf_graph) else None,
                         speedup_vs_flex_fwd_graph=flex_graph / pf_graph if (flex_graph and pf_graph) else None,
                         pcc_fwdbwd_kernel_ms=pfb_kernel, flex_fwdbwd_kernel_ms=flex_fb_kernel,
                         pcc_fwdbwd_kernels={n: round(ms, 4) for n, ms in pfb_kernels.items()},
                         eff_fwdbwd_kernel=dfb * density / pfb_kernel if (dfb and pfb_kernel) else None,
                         speedup_vs_flex_fwdbwd_kernel=(flex_fb_kernel / pfb_kernel
                                                        if (flex_fb_kernel and pfb_kernel) else None),
                         flex_setup_s=None if flex_setup is None else round(flex_setup, 1),
                         flex_mask_s=None if flex_mask is None else round(flex_mask, 1),
                         flex_mask_by=None if skip_flex else mask_by,
                         row_s=round(time.perf_counter() - row_t0, 1))
                r.update(kernel_stats(lay, q))
                record(r)
                del out
                for a in ablate:
                    if not APPLIES.get(a, lambda r: True)(r):
                        continue  # that switch changes nothing for this pattern
                    record(ablation_row(a, name, op, lay, q, k, v, do, r))
    print(f"\nwrote {path}")
    print(markdown(meta, rows))


def checked_names(names: list, known: dict, what: str) -> list:
    """``names`` if each is a key of ``known``; else exit at once saying which are not and
    what there is (before minutes of compiling, not after)."""
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def results_path(meta: dict) -> Path:
    """Where a run's JSON goes: $OUT (else bench/results) / <date>-<device>[-$TAG].json."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = meta["device"].replace(" ", "-")
    tag = os.environ.get("TAG")
    return out_dir / f"{meta['date']}-{device}{'-' + tag if tag else ''}.json"


def kernel_stats(lay, q) -> dict:
    """What the kernels walked for this layout: kernel-order blocks, FULL fraction, narrow
    tiles, the dK/dV walk's thin-key items, and the launch configuration of each kernel."""
    pred = codegen.analyse(lay.pattern)
    klay = lowering.kernel_layout(lay, pred)
    run = triton_backend._Launch(q, q, lay, None)
    return {"kernel_blocks": klay.nnz, "kernel_full_fraction": round(klay.full_fraction, 4),
            "residue_heads": int((klay.dil > 1).sum()), "narrow_tiles_fwd": run.plan.fwd.n_narrow,
            "fwd_items": run.plan.fwd.items.n_items, "split_rows_fwd": run.plan.fwd.items.n_merge,
            "thin_key_items_kv": run.plan.kv.items.n_thin, "configs": {k: vars(c) for k, c in run.cfg.items()},
            "rows": run.rows}


@contextlib.contextmanager
def switched(switches: dict):
    """Module switches of patterncc.lowering, codegen, tuning or the Triton backend set to the given
    values for the ``with`` block, then put back as they were (an A/B variant, a model's variant)."""
    owner = {flag: next((m for m in (lowering, codegen, tuning) if hasattr(m, flag)), triton_backend)
             for flag in switches}
    saved = {flag: getattr(owner[flag], flag) for flag in switches}
    try:
        for flag, value in switches.items():
            setattr(owner[flag], flag, value)
        yield
    finally:
        for flag, value in saved.items():
            setattr(owner[flag], flag, value)


def op_timings(op, q, k, v, do, what: str) -> dict:
    """The forward (do_bench, host, CUDA-graph replay) and forward+backward (do_bench, kernel
    sum, and that sum per kernel) times of ``op`` as it is switched now."""
    op(q, k, v)
    def pfb():
        op(q, k, v).backward(do)
    per_kernel: dict = {}
    return {"fwd": bench(lambda: op(q, k, v)), "host": host_ms(lambda: op(q, k, v)),
            "graph": bench_graph(lambda: op(q, k, v), what),  # GPU time alone: 16K eager may be host-bound
            "fwdbwd": bench(pfb, [q, k, v]), "kernels": kernel_ms(pfb, [q, k, v], by_name=per_kernel),
            "per_kernel": {n: round(ms, 4) for n, ms in per_kernel.items()}}


def _ratio(a, b):
    return a / b if (a and b) else None


def ablation_row(what: str, name: str, op, lay, q, k, v, do, base: dict) -> dict:
    """The same pattern with one switch of lowering or the Triton backend changed (see
    ABLATIONS), timed now, and the default timed again right after it.

    The default compared against is the re-timed one, not the pattern's row: that row is timed
    first on a freshly warmed GPU, which ran 2-4% fast at 64K (bench/RESULTS.md, fourteenth
    session), so a variant timed after it looked slower than it is. The row's own times are
    kept as ``first_*`` to show that order effect."""
    with switched(ABLATIONS[what]):
        var = op_timings(op, q, k, v, do, f"{name} {what}")
    ref = op_timings(op, q, k, v, do, f"{name} default again")
    return {"T": base["T"], "pattern": name, "D": base["D"], "ablation": LABELS[what],
            "pcc_fwd_ms": var["fwd"], "pcc_fwdbwd_ms": var["fwdbwd"], "pcc_host_fwd_ms": var["host"],
            "pcc_fwd_graph_ms": var["graph"], "pcc_fwdbwd_kernel_ms": var["kernels"],
            "with_fwd_ms": ref["fwd"], "with_fwdbwd_ms": ref["fwdbwd"], "with_host_fwd_ms": ref["host"],
            "with_fwd_graph_ms": ref["graph"], "with_fwdbwd_kernel_ms": ref["kernels"],
            "pcc_fwdbwd_kernels": var["per_kernel"], "with_fwdbwd_kernels": ref["per_kernel"],
            "gain_fwd": _ratio(var["fwd"], ref["fwd"]), "gain_fwdbwd": _ratio(var["fwdbwd"], ref["fwdbwd"]),
            "gain_fwd_graph": _ratio(var["graph"], ref["graph"]),
            "gain_fwdbwd_kernel": _ratio(var["kernels"], ref["kernels"]),
            "first_fwd_ms": base["pcc_fwd_ms"], "first_fwdbwd_ms": base["pcc_fwdbwd_ms"],
            "first_fwd_graph_ms": base["pcc_fwd_graph_ms"], "first_fwdbwd_kernel_ms": base.get("pcc_fwdbwd_kernel_ms")}


def _progress(done: int, total: int, what: str) -> None:
    """A one-line progress bar on stderr (a new line per step when stderr is not a terminal)."""
    width = 30
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    end = "\r" if sys.stderr.isatty() else "\n"
    print(f"[{bar}] {done}/{total} {what}", end=end, file=sys.stderr, flush=True)


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _subtable(title: str, columns: list[str], rows: list[dict], cells) -> list[str]:
    """Markdown lines of a titled table (none without rows): each row's T, pattern and D,
    then ``cells(row)``."""
    if not rows:
        return []
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join([str(r["T"]), r["pattern"], str(r["D"]), *cells(r)]) + " |" for r in rows]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}",
             "", "| T | pattern | D | density | dense fwd | flex fwd | pcc fwd | eff fwd | flex eff fwd | vs flex fwd "
             "| dense f+b | flex f+b | pcc f+b | eff f+b | flex eff f+b | vs flex f+b | eff cuDNN fwd |",
             "|" + "---|" * 17]
    for r in rows:
        if "ablation" in r:
            continue
        lines.append(f"| {r['T']} | {r['pattern']} | {r['D']} | {r['density']:.4f} | {_f(r['dense_fwd_ms'])} | "
                     f"{_f(r['flex_fwd_ms'])} | {_f(r['pcc_fwd_ms'])} | {_f(r['eff_fwd'], 2)} | "
                     f"{_f(r['flex_eff_fwd'], 2)} | {_f(r['speedup_vs_flex_fwd'], 2)}x | {_f(r['dense_fwdbwd_ms'])} | "
                     f"{_f(r['flex_fwdbwd_ms'])} | {_f(r['pcc_fwdbwd_ms'])} | {_f(r['eff_fwdbwd'], 2)} | "
                     f"{_f(r['flex_eff_fwdbwd'], 2)} | {_f(r['speedup_vs_flex_fwdbwd'], 2)}x | {_f(r['eff_cudnn_fwd'], 2)} |")
    base = [r for r in rows if "ablation" not in r]
    lines += _subtable(
        "Forward GPU time alone (CUDA-graph replay, no_grad) and patterncc's host time per call:",
        ["T", "pattern", "D", "pcc host", "pcc fwd", "pcc graph", "flex graph", "eff graph", "vs flex graph"],
        [r for r in base if r.get("pcc_fwd_graph_ms")],
        lambda r: [_f(r["pcc_host_fwd_ms"]), _f(r["pcc_fwd_ms"]), _f(r["pcc_fwd_graph_ms"]),
                   _f(r["flex_fwd_graph_ms"]), _f(r["eff_fwd_graph"], 2), f"{_f(r['speedup_vs_flex_fwd_graph'], 2)}x"])
    lines += _subtable(
        "Forward+backward GPU time (kernel durations summed, torch.profiler) against do_bench's:",
        ["T", "pattern", "D", "pcc f+b", "pcc kernels", "flex f+b", "flex kernels", "eff kernels", "vs flex kernels"],
        [r for r in base if r.get("pcc_fwdbwd_kernel_ms")],
        lambda r: [_f(r["pcc_fwdbwd_ms"]), _f(r["pcc_fwdbwd_kernel_ms"]), _f(r["flex_fwdbwd_ms"]),
                   _f(r.get("flex_fwdbwd_kernel_ms")), _f(r["eff_fwdbwd_kernel"], 2),
                   f"{_f(r.get('speedup_vs_flex_fwdbwd_kernel'), 2)}x"])
    ablations = [r for r in rows if "ablation" in r]
    if ablations:
        lines += ["", "Ablations (default re-timed right after the variant):", "",
                  "| T | pattern | D | variant | fwd default / variant | fwd graph default / variant "
                  "| f+b default / variant | f+b kernels default / variant | host fwd default / variant |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ablations:
            lines.append(f"| {r['T']} | {r['pattern']} | {r['D']} | {r['ablation']} | {r['with_fwd_ms']:.3f} / "
                         f"{r['pcc_fwd_ms']:.3f} ({_f(r['gain_fwd'], 2)}x) | {_f(r.get('with_fwd_graph_ms'))} / "
                         f"{_f(r.get('pcc_fwd_graph_ms'))} ({_f(r.get('gain_fwd_graph'), 2)}x) | "
                         f"{r['with_fwdbwd_ms']:.3f} / {r['pcc_fwdbwd_ms']:.3f} ({_f(r['gain_fwdbwd'], 2)}x) | "
                         f"{_f(r.get('with_fwdbwd_kernel_ms'))} / {_f(r.get('pcc_fwdbwd_kernel_ms'))} "
                         f"({_f(r.get('gain_fwdbwd_kernel'), 2)}x) | "
                         f"{_f(r.get('with_host_fwd_ms'))} / {_f(r.get('pcc_host_fwd_ms'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
