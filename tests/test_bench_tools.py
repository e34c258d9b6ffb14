"""The host-side models behind bench/RESULTS.md's predictions (bench/schedule_model.py,
bench/sass_loops.py's parsing, bench/kernel_rates.py) and the benchmark's checks that need no GPU
(bench/bench_attention.py, bench/ab_interleaved.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ab_interleaved  # noqa: E402
import ab_summary  # noqa: E402
import bench_attention  # noqa: E402
import kernel_rates  # noqa: E402
import sass_loops  # noqa: E402
import schedule_model  # noqa: E402


def test_makespan_of_an_even_load_is_the_even_share():
    cost = np.full(2 * 4 * 3, 5.0)  # 2 SMs x 4 slots, three rounds of equal items
    assert schedule_model.makespan(cost, sms=2, per_sm=4, saturate=4) == pytest.approx(cost.sum() / 2)


def test_a_lone_program_runs_at_its_share_of_an_sm():
    assert schedule_model.makespan(np.array([6.0]), sms=1, per_sm=4, saturate=3) == pytest.approx(18.0)
    assert schedule_model.makespan(np.array([6.0]), sms=1, per_sm=4, saturate=1) == pytest.approx(6.0)


def test_a_long_item_last_in_the_grid_is_a_tail_and_first_it_is_not():
    short, long_ = [1.0] * 64, [16.0]
    late = schedule_model.makespan(np.array(short + long_), sms=2, per_sm=2, saturate=2)
    early = schedule_model.makespan(np.array(long_ + short), sms=2, per_sm=2, saturate=2)
    assert early < late
    assert early == pytest.approx(80 / 2, rel=0.25)  # close to an even spread


def test_the_split_first_order_shortens_bigbirds_modelled_tail(monkeypatch):
    import patterncc
    from patterncc import lowering
    lay = patterncc.compile("block(64, width=1) | global(0..128) | random(192, seed=1)").layout(16384, 16)
    monkeypatch.setattr(lowering, "SPLIT_FIRST", False)
    rows = schedule_model.model(lay)
    monkeypatch.setattr(lowering, "SPLIT_FIRST", True)
    first = schedule_model.model(lay)
    assert first["items"] == rows["items"] and first["tail"] < rows["tail"]


def test_the_benchmark_refuses_unknown_pattern_and_ablation_names_before_it_starts():
    known = bench_attention.checked_names(["causal_window", "bigbird"], bench_attention.PATTERNS, "PATTERNS")
    assert known == ["causal_window", "bigbird"]
    with pytest.raises(SystemExit, match="PATTERNS: unknown causal; choose from longformer, bigbird"):
        bench_attention.checked_names(["causal", "bigbird"], bench_attention.PATTERNS, "PATTERNS")
    with pytest.raises(SystemExit, match="ABLATE: unknown splitt"):
        bench_attention.checked_names(["split", "splitt"], bench_attention.ABLATIONS, "ABLATE")
    with pytest.raises(SystemExit, match="FLEX_MASK: unknown compiled; choose from slabs, compile"):
        bench_attention.checked_names(["compiled"], bench_attention.FLEX_MASKS, "FLEX_MASK")


def test_the_interleaved_ab_refuses_unknown_names_and_defaults_to_the_delta_switch(monkeypatch):
    monkeypatch.delenv("PATTERN", raising=False)
    monkeypatch.delenv("ABLATE", raising=False)
    assert ab_interleaved.chosen() == ("causal_window", "delta")
    monkeypatch.setenv("ABLATE", "deltaa")
    with pytest.raises(SystemExit, match="ABLATE: unknown deltaa"):
        ab_interleaved.chosen()
    monkeypatch.setenv("PATTERN", "dilate")
    with pytest.raises(SystemExit, match="PATTERN: unknown dilate"):
        ab_interleaved.chosen()


@pytest.mark.parametrize("text,seconds", [(None, 5.0), ("0", 0.0), ("12.5", 12.5), ("-1", None), ("nan", None),
                                          ("5s", None)])
def test_the_interleaved_abs_heat_up_is_seconds_from_heat_s(text, seconds, monkeypatch):
    if text is None:
        monkeypatch.delenv("HEAT_S", raising=False)
    else:
        monkeypatch.setenv("HEAT_S", text)
    if seconds is None:
        with pytest.raises(SystemExit, match=f"HEAT_S='{text}': give a number of seconds >= 0"):
            ab_interleaved.heat_seconds()
    else:
        assert ab_interleaved.heat_seconds() == seconds


def test_the_benchmark_writes_its_json_under_out_with_the_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("TAG", "16k")
    path = bench_attention.results_path({"date": "2026-12-02", "device": "NVIDIA H200"})
    assert path == tmp_path / "out" / "2026-12-02-NVIDIA-H200-16k.json" and path.parent.is_dir()


@pytest.mark.parametrize("forced", [None, (128, 64, 8, 2)])
@pytest.mark.parametrize("name", list(bench_attention.PATTERNS))
def test_the_work_models_chosen_rows_are_the_backends(name, forced, monkeypatch):
    """The table's configs (64-row tiles) and a forced 128-row forward config, which the
    dilated window (tall class) takes and the others cap at 64 rows."""
    import torch
    import patterncc
    import work_model
    from patterncc.backends import triton_backend, tuning
    monkeypatch.setattr(triton_backend, "device_name", lambda x: next(iter(tuning.TUNED)))
    if forced:
        monkeypatch.setitem(tuning.CONFIGS, ("fwd", tuning.width_class(64)), tuning.KernelConfig(*forced))
    lay = patterncc.compile(bench_attention.PATTERNS[name]).layout(2048, 2)
    q = torch.zeros(1, 2, 2048, 64, dtype=torch.bfloat16)
    run = triton_backend._Launch(q, q, lay, None)
    factor = work_model.chosen_factor(lay)
    assert factor == run.rows["fwd"] // lay.block_size
    assert factor == (2 if forced and name == "dilated" else 1)


@pytest.mark.parametrize("thin_keys", [True, False])
@pytest.mark.parametrize("name", list(bench_attention.PATTERNS))
def test_an_ablation_applies_where_its_switch_has_work_to_change(name, thin_keys, monkeypatch):
    """APPLIES reads kernel_stats: thin-key items only where dK/dV has them (none with the
    switch already off) and thin columns where the forward walks narrow tiles (longformer's
    global key; bigbird's global keys sit in blocks its rows attend whole)."""
    import torch
    import patterncc
    from patterncc import lowering
    from patterncc.backends import triton_backend, tuning
    monkeypatch.setattr(triton_backend, "device_name", lambda x: next(iter(tuning.TUNED)))
    monkeypatch.setattr(lowering, "THIN_KEYS", thin_keys)
    lay = patterncc.compile(bench_attention.PATTERNS[name]).layout(2048, 2)
    stats = bench_attention.kernel_stats(lay, torch.zeros(1, 2, 2048, 64, dtype=torch.bfloat16))
    applies = {a: bool(bench_attention.APPLIES[a](stats)) for a in ("thinkeys", "thin")}
    assert applies == {"thinkeys": name == "longformer" and thin_keys, "thin": name == "longformer"}


def test_switched_sets_lowering_and_backend_switches_and_puts_back_what_they_were(monkeypatch):
    from patterncc import lowering
    from patterncc.backends import triton_backend, tuning
    monkeypatch.setattr(lowering, "THIN_ROWS", False)  # not the default: it must come back as it was
    direct, forced, key = triton_backend.DIRECT_LAUNCH, tuning.CONFIGS, tuning.fingerprint()
    nocap = bench_attention.ABLATIONS["nocap"]["CONFIGS"]
    with pytest.raises(RuntimeError):
        with bench_attention.switched({"THIN_ROWS": True, "DIRECT_LAUNCH": not direct, "CONFIGS": nocap}):
            assert lowering.THIN_ROWS is True and triton_backend.DIRECT_LAUNCH is (not direct)
            # a forced launch configuration: what config_for answers, and a new key for launches
            assert tuning.config_for("dkdv", 64, device_name="NVIDIA H100 80GB HBM3") == nocap[("dkdv", 64)]
            assert tuning.fingerprint() != key
            raise RuntimeError  # put back on the way out of a failing block too
    assert lowering.THIN_ROWS is False and triton_backend.DIRECT_LAUNCH is direct
    assert tuning.CONFIGS is forced and tuning.fingerprint() == key


def test_the_markdown_has_the_forward_backward_kernel_time_table_only_when_measured():
    keys = ("density dense_fwd_ms flex_fwd_ms pcc_fwd_ms eff_fwd flex_eff_fwd speedup_vs_flex_fwd dense_fwdbwd_ms "
            "flex_fwdbwd_ms pcc_fwdbwd_ms eff_fwdbwd flex_eff_fwdbwd speedup_vs_flex_fwdbwd eff_cudnn_fwd").split()
    row = dict(dict.fromkeys(keys, 1.0), T=16384, pattern="causal_window", D=64, pcc_fwdbwd_ms=1.2)
    meta = {"device": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "date": "d"}
    assert "kernel durations" not in bench_attention.markdown(meta, [row])
    row.update(pcc_fwdbwd_kernel_ms=0.8, flex_fwdbwd_kernel_ms=1.0, eff_fwdbwd_kernel=0.9,
               speedup_vs_flex_fwdbwd_kernel=1.25)
    table = bench_attention.markdown(meta, [row])
    assert "| 16384 | causal_window | 64 | 1.200 | 0.800 | 1.000 | 1.000 | 0.90 | 1.25x |" in table


def test_settle_runs_the_step_untimed_for_its_time_and_leaves_no_gradients(monkeypatch):
    import itertools
    import torch
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    clock = itertools.count()  # each reading a second later: a deterministic number of steps
    monkeypatch.setattr(bench_attention.time, "perf_counter", lambda: next(clock))
    x = torch.ones(3, requires_grad=True)
    calls = []

    def step():
        assert x.grad is None  # reset before each step: no accumulation
        calls.append(1)
        (x * 2).sum().backward()
    bench_attention.settle(step, [x], seconds=3.5)
    assert len(calls) == 3 and x.grad is None  # readings 1, 2, 3 run a step; 4 ends it


def test_an_ablation_row_compares_the_variant_with_the_default_timed_right_after_it(monkeypatch):
    # Stand-in timers that read the switch: the variant (thin rows off) takes 2.0, the
    # default 1.0, and the pattern's own row, timed first, says 0.9 (a fast first timing).
    import torch
    from patterncc import lowering
    monkeypatch.setattr(lowering, "THIN_ROWS", True)
    order = []

    def timer(fn, *args, **kwargs):
        order.append("variant" if not lowering.THIN_ROWS else "default")
        return 2.0 if not lowering.THIN_ROWS else 1.0
    for name in ("bench", "bench_graph", "kernel_ms", "host_ms"):
        monkeypatch.setattr(bench_attention, name, timer)
    op = lambda q, k, v: q * 1.0  # noqa: E731  (a differentiable stand-in for the op)
    q = torch.ones(2, requires_grad=True)
    base = dict(T=16384, pattern="longformer", D=64, pcc_fwd_ms=0.9, pcc_fwdbwd_ms=0.9, pcc_host_fwd_ms=0.9,
                pcc_fwd_graph_ms=0.9, pcc_fwdbwd_kernel_ms=0.9)
    row = bench_attention.ablation_row("thinrows", "longformer", op, None, q, q, q, torch.ones(2), base)
    assert order == ["variant"] * 5 + ["default"] * 5
    assert lowering.THIN_ROWS is True  # put back
    for key in ("gain_fwd", "gain_fwdbwd", "gain_fwd_graph", "gain_fwdbwd_kernel"):
        assert row[key] == pytest.approx(2.0), key  # against the re-timed 1.0, not the first 0.9
    assert row["with_fwd_ms"] == 1.0 and row["first_fwd_ms"] == 0.9 and row["pcc_fwd_ms"] == 2.0
    table = bench_attention.markdown({"device": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "date": "d"}, [row])
    assert "default re-timed right after the variant" in table
    assert "| 16384 | longformer | 64 | thin query rows off | 1.000 / 2.000 (2.00x) |" in table


def test_tuned_as_looks_this_gpu_up_in_another_gpus_table_and_refuses_unknown_names(monkeypatch):
    from patterncc.backends import tuning
    monkeypatch.setattr(bench_attention.torch.cuda, "get_device_name", lambda *a: "NVIDIA B200")
    monkeypatch.setattr(tuning, "TUNED", dict(tuning.TUNED))
    monkeypatch.delenv("TUNED_AS", raising=False)
    assert bench_attention.tuned_as() is None
    assert tuning.table_config("fwd", 64, bench_attention.torch.bfloat16, "NVIDIA B200") is None
    monkeypatch.setenv("TUNED_AS", "NVIDIA H200")
    assert bench_attention.tuned_as() == "NVIDIA H200"
    h200 = tuning.TUNED["NVIDIA H200"][("fwd", 64, False)]
    assert tuning.table_config("fwd", 64, bench_attention.torch.bfloat16, "NVIDIA B200") == h200
    monkeypatch.setenv("TUNED_AS", "NVIDIA GB300")
    with pytest.raises(SystemExit, match="TUNED_AS: unknown NVIDIA GB300"):
        bench_attention.tuned_as()


def test_the_source_digest_names_the_package_and_kernel_sources_that_ran(tmp_path):
    import shutil
    root = Path(bench_attention.__file__).resolve().parents[1]
    for d in ("patterncc", "kernels"):
        shutil.copytree(root / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    digest = bench_attention.source_digest(tmp_path)
    assert digest == bench_attention.source_digest(root) and len(digest) == 16
    (tmp_path / "kernels" / "common.py").write_text((root / "kernels" / "common.py").read_text() + "\n# edited\n")
    assert bench_attention.source_digest(tmp_path) != digest


@pytest.mark.parametrize("regs,shared,warps,expect", [
    (128, 40996, 4, 4),    # the H100 table's D=64 forward: four by registers, five by shared memory
    (220, 114760, 4, 2),   # its D=128 forward: two by either
    (180, 73780, 4, 2),    # a 64x128 pair tile at D=64 (nineteenth session): registers bind
    (239, 213080, 4, 1),   # and at D=128: shared memory binds
    (137, 122952, 8, 1),   # an 8-warp 64x64 tile at D=128, 3 stages: one by either
])
def test_programs_per_sm_take_the_tighter_of_registers_and_shared_memory(regs, shared, warps, expect):
    assert sass_loops.programs_per_sm(regs, shared, warps) == expect


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/              @P0 BRA `(.L_x_2) ;
        /*0040*/                   FSEL R3, R3, -INF, P1 ;
        /*0050*/                   FSEL R4, R4, -INF, P1 ;
.L_x_2:
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R40, R8, gdesc[UR12], R40 ;
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R40, R12, gdesc[UR16], R40 ;
        /*0088*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/              @P2 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
"""


def test_sass_main_loops_split_the_full_path_from_what_a_branch_skips():
    (loop,) = sass_loops.main_loops(SASS)
    assert loop["products"] == ["64x64"]
    assert loop["instructions"] == 10 and loop["skipped"] == [2] and loop["full_path"] == 8
    assert loop["product_waits"] == 1


def test_the_gluon_prototypes_schedule_gives_each_program_its_rows_tiles_in_order():
    """bench/gluon_fwd.py: item i goes to program i % programs; each program's tiles list its
    items' key blocks in order, the first and last tile of each item marked in the row code,
    with each tile's entry flags and its item's per-item values (scratch slot, merge)."""
    gluon_fwd = pytest.importorskip("gluon_fwd")
    starts, ends = np.array([0, 2, 3, 6]), np.array([2, 3, 6, 7])
    kblock = np.arange(100, 107)
    prog_start, tiles, codes, flags, slots = gluon_fwd.schedule(np.arange(4), starts, ends, kblock, 3, kblock - 100,
                                                                (np.array([-1, 5, -1, 7]),))
    assert slots.tolist() == [-1, -1, 7, 5, -1, -1, -1]  # each item's value on each of its tiles
    assert prog_start.tolist() == [0, 3, 4, 7]
    assert tiles.tolist() == [100, 101, 106, 102, 103, 104, 105]  # program 0: rows 0 and 3
    assert codes.tolist() == [0 * 4 + 1, 0 * 4 + 2, 3 * 4 + 3, 1 * 4 + 3, 2 * 4 + 1, 2 * 4, 2 * 4 + 2]
    assert flags.tolist() == (tiles - 100).tolist()  # each tile carries its own entry's flags


def test_the_paired_schedule_walks_the_union_of_two_rows_blocks_once():
    """bench/gluon_fwd.py's paired forward: rows 2r and 2r + 1 of a head share one list of
    tiles, the union of their key blocks in ascending order, each tile carrying each row's
    entry flags or -1 where the block is not that row's; an odd last row has no partner."""
    gluon_fwd = pytest.importorskip("gluon_fwd")
    # one head of 3 rows: row 0 -> blocks 0, 1; row 1 -> 1, 2; row 2 -> 2
    kblock = np.array([0, 1, 1, 2, 2])
    flags = np.array([10, 11, 21, 22, 32])
    prog_start, tiles, codes, fa, fb = gluon_fwd.schedule_pairs(np.arange(3), np.array([0, 2, 4]),
                                                                np.array([2, 4, 5]), kblock, flags, 3, 2)
    assert prog_start.tolist() == [0, 3, 4]
    assert tiles.tolist() == [0, 1, 2, 2]
    assert codes.tolist() == [0 * 8 + 1 + 4, 0 * 8 + 4, 0 * 8 + 2 + 4, 2 * 8 + 3]
    assert fa.tolist() == [10, 11, -1, 32] and fb.tolist() == [-1, 21, 22, -1]


def test_the_gluon_prototypes_predicate_is_the_generated_one_under_gluon(tmp_path, monkeypatch):
    """bench/gluon_fwd.py takes the pattern's generated token predicate as it is, under
    gluon.jit; patterns with membership tables are refused, not silently mis-masked."""
    gluon_fwd = pytest.importorskip("gluon_fwd")
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    fn = gluon_fwd.gluon_predicate("window(256)")
    assert type(fn).__module__.startswith("triton.experimental.gluon")
    assert "<= 256" in fn.src and "@triton.jit" not in fn.src
    many = "global([" + ", ".join(str(5 * i) for i in range(20)) + "]) & causal"
    with pytest.raises(ValueError, match="membership tables"):
        gluon_fwd.gluon_predicate(many)


def test_the_timeline_instruments_only_the_forward_kernel(tmp_path, monkeypatch):
    """bench/timeline.py: `_attn_fwd` reads the clock on entry and records on exit (after
    both of its branches), nothing else in the generated module changes."""
    timeline = pytest.importorskip("timeline")
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    import patterncc
    from patterncc import codegen
    gen = codegen.load(patterncc.parse("window(256) | global([0])"))
    src = timeline.instrumented_source(gen.source)
    body = src[src.index("def _attn_fwd("):src.index("def _merge_if_last")]
    assert body.count("_clock()") == 1 and body.rstrip().endswith("@triton.jit")
    assert "\n    _record(tables, _t0)\n" in body and body.index("_t0 = _clock()") < body.index("_query_item(")
    rest = src.replace("    _t0 = _clock()\n", "", 1).replace("\n    _record(tables, _t0)\n", "", 1)
    assert rest == gen.source + timeline._PROBES
    fn = timeline.load_instrumented(gen)  # imported from beside the generated module
    assert fn.arg_names == gen.kernel("_attn_fwd").arg_names
    assert gen.path.with_name(gen.path.stem + "_timeline.py").read_text() == src


def test_the_timeline_summary_counts_busy_slots_and_kinds():
    timeline = pytest.importorskip("timeline")
    t0 = np.array([1000, 1000, 3000, 5000])  # ns
    t1 = np.array([3000, 9000, 5000, 9000])
    rec = timeline.summarise(t0, t1, np.array([0, 1, 0, 0]), np.array(["row", "piece", "row", "row"]), 2)
    assert rec["span_us"] == 8.0 and rec["sms"] == 2
    assert rec["slot_busy"] == (2 + 8 + 2 + 4) / (8 * 2)
    assert rec["row"] == {"count": 3, "mean_us": 2.67, "total_us": 8.0, "first_start_us": 0.0, "last_end_us": 8.0}
    assert rec["piece"]["last_end_us"] == 8.0 and len(rec["running"]) == 20 and rec["running"][0] == 2


def test_the_timeline_reads_switch_variants_in_each_switch_type():
    timeline = pytest.importorskip("timeline")
    current = {"THIN_ROWS": True, "SCRATCH_FRACTION": 0.05, "MIN_SPLIT": 16}.__getitem__
    assert timeline.parse_variant("default", current) == {}
    assert timeline.parse_variant("THIN_ROWS=0,SCRATCH_FRACTION=0.2,MIN_SPLIT=8", current) == {
        "THIN_ROWS": False, "SCRATCH_FRACTION": 0.2, "MIN_SPLIT": 8}


def test_kernel_rates_count_each_passs_products_on_its_walked_blocks(tmp_path):
    """One walked 64x64 block at D=64 is 2 * 64**3 flops a product: 1000 blocks in 1 ms is
    0.524 TFLOP/s a product, times 2 / 3 / 4 for the forward / dQ / dK/dV; dense flash's
    backward does 2.5 forwards' flops; rows without per-kernel times are left out."""
    row = {"pattern": "p", "T": 1024, "D": 64, "kernel_blocks": 1000,
           "pcc_fwdbwd_kernels": {"_attn_fwd": 1.0, "_attn_bwd_dq": 1.0, "_attn_bwd_dkdv": 2.0},
           "dense_fwd_ms": 1.0, "dense_fwdbwd_ms": 3.5}
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps({"meta": {"device": "X"}, "setup": {"B": 1, "H": 2, "block_size": 64},
                                              "rows": [row, {"pattern": "q", "T": 1, "D": 64}]}))
    (got,) = kernel_rates.rates(str(path))
    unit = 2 * 64 ** 3 * 1000 / 1e-3 / 1e12
    assert got["fwd"] == round(2 * unit, 1) and got["dq"] == round(3 * unit, 1) and got["dkdv"] == round(2 * unit, 1)
    dense = 4 * 1024 ** 2 * 64 * 2 / 1e-3 / 1e12
    assert got["dense_fwd"] == round(dense, 1) and got["dense_bwd"] == round(2.5 * dense / 2.5, 1)
    assert got["device"] == "X" and (got["T"], got["D"]) == (1024, 64)


def _ab_round(variant, r, fwd, dkdv, ablate="pairs", pattern="longformer", graph=None):
    return {"T": 16384, "D": 64, "pattern": pattern, "ablate": ablate, "round": r, "variant": variant,
            "kernel_ms": fwd + 0.2 + dkdv, "fwd_graph_ms": fwd if graph is None else graph,
            "kernels": {"_attn_fwd": fwd, "_attn_bwd_dq": 0.2, "_attn_bwd_dkdv": dkdv}}


def test_the_ab_summary_takes_each_switchs_rounds_and_the_drift_out_of_the_backward():
    """Two A/Bs of one pattern, T and D in one file: split by switch; the variant's dK/dV change
    as measured and relative to the forward kernel of the same rounds (a machine that slowed
    down over the variant's rounds)."""
    rounds = [_ab_round("default", 0, 0.10, 0.30), _ab_round("pairs", 0, 0.11, 0.297),
              _ab_round("pairs", 1, 0.11, 0.297), _ab_round("default", 1, 0.10, 0.30),
              _ab_round("default", 0, 0.10, 0.30, "nocap"), _ab_round("nocap", 0, 0.10, 0.33, "nocap")]
    text = ["== pairs longformer", *map(json.dumps, rounds), "exit 0", '{"not": "a round"}']
    found = [ab_summary.summary(s) for s in ab_summary.sections(ab_summary.read_records(text))]
    assert [(s["ablate"], s["rounds"]) for s in found] == [("pairs", 2), ("nocap", 1)]
    pairs, nocap = found
    assert pairs["ms"]["dkdv"] == pytest.approx((0.30, 0.297))
    assert pairs["change"]["dkdv"] == pytest.approx(-0.01) and pairs["change"]["fwd"] == pytest.approx(0.1)
    assert pairs["change"]["dkdv/fwd"] == pytest.approx(0.99 / 1.1 - 1)
    assert nocap["change"]["dkdv"] == pytest.approx(0.1) and nocap["change"]["fwd"] == pytest.approx(0)
    table = ab_summary.markdown(found).splitlines()
    assert len(table) == 4 and table[2].startswith("| pairs | longformer | 16384 | 64 | 2 |") and "-1.0%" in table[2]
    assert pairs["by_round"] == pytest.approx([0.007 / 0.6] * 2) and "| +1.2 .. +1.2% |" in table[2]


def test_the_ab_summary_gives_each_rounds_change_by_round_number():
    """The variant against the default of its own round (not of the slot before it), lowest to
    highest in the table, forward+backward kernels and forward graph replay; a round the
    default lacks is left out."""
    rounds = [_ab_round("default", 0, 0.10, 0.30, graph=0.20), _ab_round("pairs", 0, 0.10, 0.33, graph=0.19),
              _ab_round("pairs", 1, 0.10, 0.27, graph=0.21), _ab_round("default", 1, 0.10, 0.36, graph=0.20),
              _ab_round("pairs", 2, 0.10, 0.30, graph=0.10)]
    (found,) = [ab_summary.summary(s) for s in ab_summary.sections(rounds)]
    assert found["by_round"] == pytest.approx([0.03 / 0.6, -0.09 / 0.66])
    assert found["graph_by_round"] == pytest.approx([-0.05, 0.05])
    row = ab_summary.markdown([found]).splitlines()[2]
    assert "| -13.6 .. +5.0% |" in row and row.endswith("| -5.0 .. +5.0% | — |")


def test_the_ab_summary_splits_older_files_where_a_run_starts_again():
    """Records without ``ablate`` (before it was written): a new A/B where the round falls back,
    or where another variant name comes."""
    old = [{k: v for k, v in r.items() if k != "ablate"} for r in (
        _ab_round("default", 0, 0.1, 0.3), _ab_round("cap128", 0, 0.1, 0.28), _ab_round("cap128", 1, 0.1, 0.28),
        _ab_round("default", 1, 0.1, 0.3), _ab_round("default", 0, 0.1, 0.3), _ab_round("cap128s2", 0, 0.1, 0.29))]
    split = ab_summary.sections(old)
    assert [len(s) for s in split] == [4, 2]
    assert [ab_summary.summary(s)["ablate"] for s in split] == ["cap128", "cap128s2"]


def test_the_ab_summary_says_so_when_a_file_has_no_rounds(tmp_path, capsys):
    empty = tmp_path / "log.txt"
    empty.write_text("bench exit 124\n")
    assert ab_summary.main(["ab_summary.py", str(empty)]) == 1
    assert "no A/B records" in capsys.readouterr().err


def test_the_clock_summary_averages_the_samples_it_can_read():
    samples = "1980, 400.0\n1755, 600.0\n[N/A], [N/A]\n\n"
    assert ab_interleaved.clock_summary(samples) == {"sm_clock_mhz": 1867.5, "power_w": 500.0}
    assert ab_interleaved.clock_summary("") == {}


def test_gpu_clocks_yields_an_empty_dict_without_nvidia_smi(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")
    monkeypatch.setattr(ab_interleaved.subprocess, "run", missing)
    monkeypatch.setattr(ab_interleaved.torch.cuda, "current_device", lambda: 0)
    with ab_interleaved.gpu_clocks() as found:
        pass
    assert found == {}


def test_gpu_clocks_fills_its_dict_with_the_readings_of_the_blocks_time_on_exit(monkeypatch):
    """A reading at the block's start, more while it runs, their mean when it ends."""
    readings = iter(["1980, 400.0\n", "1700, 500.0\n", "[N/A], [N/A]\n"] + ["1700, 500.0\n"] * 100)
    asked = []

    def fake_run(cmd, **kwargs):
        asked.append(cmd)
        return ab_interleaved.subprocess.CompletedProcess(cmd, 0, stdout=next(readings))
    monkeypatch.setattr(ab_interleaved.subprocess, "run", fake_run)
    monkeypatch.setattr(ab_interleaved.torch.cuda, "current_device", lambda: 0)
    with ab_interleaved.gpu_clocks(period_s=0.01) as found:
        while len(asked) < 3:
            time.sleep(0.01)
        assert found == {}
    n = len(asked) - 1  # readings of 1700 MHz / 500 W besides the first (one unreadable)
    assert found["sm_clock_mhz"] == pytest.approx(round((1980 + 1700 * (n - 1)) / n, 1))
    assert asked[0][:3] == ["nvidia-smi", "--id=0", "--query-gpu=clocks.sm,power.draw"]


@pytest.mark.parametrize("T", [1000, 1024])
@pytest.mark.parametrize("name", ["longformer", "bigbird", "causal_window", "dilated"])
def test_flex_block_mask_is_create_block_masks_without_its_compile(name, T):
    """The bench's block mask for FlexAttention, evaluated a slab of query blocks at a time
    (three slabs here, the last one short when T is not a multiple of 128), is the one
    create_block_mask builds: the same partial and FULL blocks, in the same order, both ways."""
    import torch
    import patterncc
    from torch.nn.attention.flex_attention import create_block_mask
    H = 4
    op = patterncc.compile(bench_attention.PATTERNS[name], block_size=64)
    mm = bench_attention.flex_mask_mod(name, op, T, H, "cpu")
    heads = H if name == "bigbird" else 1
    want = create_block_mask(mm, 1, heads, T, T, device="cpu", _compile=False)
    got = bench_attention.flex_block_mask(mm, heads, T, "cpu", chunk=heads * T * 3 * 128)
    assert got.BLOCK_SIZE == want.BLOCK_SIZE and got.seq_lengths == want.seq_lengths == (T, T)
    fields = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"]
    for f in fields:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert int(got.kv_num_blocks.sum()) > 0  # partial blocks (and FULL ones but in the dilated window)
    assert (int(got.full_kv_num_blocks.sum()) > 0) == (name != "dilated")
