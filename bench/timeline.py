"""Where a forward's time goes, program by program: each program's start, end and SM.

The uninstrumented forward is timed first (CUDA-graph replay, ms). Then the pattern's
generated forward is compiled a second time with two lines added to `_attn_fwd`: it reads
``%globaltimer`` when it starts and, when it ends, stores (start, end, ``%smid``) at its
program id in a buffer passed in place of the membership tables, so patterns with tables are
refused. One eager launch after a warm-up; times in µs from the first start. Per kind of work
item (an ordinary row, a piece of a split row, a thin-row piece): how many, their mean and
total duration, when the first starts and the last ends; for the whole launch: its span, how
busy the SMs' program slots were (the sum of durations over span x slots) and how many
programs were running in each twentieth of the span.

    T=65536 PATS="window(256);window(256) | global([0])" python3 bench/timeline.py   # on a GPU
    VARIANTS="default;SCRATCH_FRACTION=0.2;THIN_ROWS=0" python3 bench/timeline.py   # switches (A/B)

Writes one JSON line per (head dim, pattern, variant) to $OUT/timeline.jsonl (or ./timeline.jsonl).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

_PROBES = '''

@triton.jit
def _clock():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _record(buf, t0):
    t1 = _clock()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    p = buf.to(tl.pointer_type(tl.int64)) + tl.program_id(0) * 3
    tl.store(p, t0)
    tl.store(p + 1, t1)
    tl.store(p + 2, sm.to(tl.int64))
'''


def instrumented_source(source: str) -> str:
    """The generated module's source with `_attn_fwd` timing itself into ``tables``."""
    start = source.index("def _attn_fwd(")
    body = source.index("):\n", start) + 3
    source = source[:body] + "    _t0 = _clock()\n" + source[body:]
    end = source.index("\n\n@triton.jit\ndef _merge_if_last")
    return source[:end] + "\n    _record(tables, _t0)\n" + source[end:] + _PROBES


def load_instrumented(gen):
    """The instrumented `_attn_fwd` of a generated module, imported from a file beside it."""
    path = gen.path.with_name(gen.path.stem + "_timeline.py")
    path.write_text(instrumented_source(gen.source))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._attn_fwd


def summarise(t0: np.ndarray, t1: np.ndarray, sm: np.ndarray, kinds: np.ndarray, slots: int) -> dict:
    """The launch's timeline (ns stamps per program) as the numbers the module docstring lists."""
    base = t0.min()
    start, end = (t0 - base) / 1e3, (t1 - base) / 1e3
    span = float(end.max())
    dur = end - start
    rec = {"span_us": round(span, 2), "programs": int(len(dur)), "sms": int(len(np.unique(sm))),
           "slot_busy": round(float(dur.sum() / (span * slots)), 3)}
    for kind in np.unique(kinds):
        k = kinds == kind
        rec[str(kind)] = {"count": int(k.sum()), "mean_us": round(float(dur[k].mean()), 2),
                          "total_us": round(float(dur[k].sum()), 1), "first_start_us": round(float(start[k].min()), 2),
                          "last_end_us": round(float(end[k].max()), 2)}
    edges = np.linspace(0, span, 21)
    mids = (edges[:-1] + edges[1:]) / 2
    rec["running"] = [int(((start <= m) & (end > m)).sum()) for m in mids]
    return rec


def parse_variant(text: str, current) -> dict:
    """``NAME=value,NAME=value`` (or ``default``) as switch values, each of its switch's type
    (``current(name)`` reads the switch as it is)."""
    out = {}
    for part in filter(None, text.split(",")):
        if part == "default":
            continue
        name, _, value = part.partition("=")
        kind = type(current(name))
        out[name] = bool(int(value)) if kind is bool else kind(value)
    return out


def timeline_of(q, k, v, src: str) -> dict:
    """The pattern's forward on (q, k, v): its graph-replay time, then one instrumented launch's
    timeline (summarise) and how the launch was configured."""
    import torch
    import patterncc
    from patterncc.backends import triton_backend as tb
    from sass_loops import programs_per_sm
    from triton.testing import do_bench_cudagraph

    T, H, D = q.shape[2], q.shape[1], q.shape[3]
    lay = patterncc.compile(src).layout(T, H)
    ref, _ = tb.forward(q, k, v, lay, D ** -0.5)
    graph_ms = do_bench_cudagraph(lambda: tb.forward(q, k, v, lay, D ** -0.5), rep=100)
    run = tb.launch_for(q, k, lay)
    if run.gen.plan.table_nodes:
        raise SystemExit(f"{src!r}: its membership tables use the argument the timeline takes")
    walk = run.plan.fwd
    tiles = walk.row_block // run.tiles("fwd")[0]
    programs = walk.items.n_items * tiles
    buf = torch.zeros(programs * 3, dtype=torch.int64, device="cuda")
    timed = load_instrumented(run.gen)
    tables_at = list(timed.arg_names).index("tables")
    compiled = []

    class Timed:  # what the backend launches as `_attn_fwd`: the buffer in place of the tables
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args = list(args)
                args[tables_at] = buf.view(torch.int8)
                compiled.append((timed[grid](*args, **kwargs), kwargs.get("num_warps", 4)))
            return launch

    # Generated.kernel looks the name up in the loaded module, so the module's attribute is
    # what to swap; DIRECT_LAUNCH off sends every launch through kernel[grid](...).
    with mock.patch.object(run.gen.module, "_attn_fwd", Timed()), mock.patch.object(tb, "DIRECT_LAUNCH", False):
        for _ in range(3):
            out, _ = tb.forward(q, k, v, lay, D ** -0.5)
        torch.cuda.synchronize()
    stamps = buf.view(programs, 3).cpu().numpy()
    it = walk.items
    item = np.arange(programs) // tiles
    kinds = np.where(it.thin.cpu().numpy()[item] >= 0, "thin_piece",
                     np.where(it.slot.cpu().numpy()[item] >= 0, "split_piece", "row"))
    kernel, warps = compiled[-1]
    slots = programs_per_sm(kernel.n_regs, kernel.metadata.shared, warps)
    lengths = np.unique((it.end - it.start).cpu().numpy())
    return {"pattern": src, "D": D, "T": T, "graph_ms": graph_ms, "exact": bool(torch.equal(out, ref)),
            "item_lengths": [int(x) for x in lengths[:12]], "registers": kernel.n_regs, "programs_per_sm": slots,
            **summarise(stamps[:, 0], stamps[:, 1], stamps[:, 2], kinds,
                        torch.cuda.get_device_properties(0).multi_processor_count * slots)}


def main() -> None:
    import torch
    from patterncc import codegen, lowering
    from patterncc.backends import triton_backend as tb
    from bench_attention import switched

    out_dir = Path(os.environ.get("OUT", "."))
    T, H = int(os.environ.get("T", "65536")), 16
    pats = os.environ.get("PATS", "window(256);window(256) | global([0])").split(";")
    variants = os.environ.get("VARIANTS", "default").split(";")
    owner = lambda name: next(m for m in (lowering, codegen, tb) if hasattr(m, name))  # noqa: E731
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for D in (64, 128):
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for src in pats:
            for variant in variants:
                with switched(parse_variant(variant, lambda name: getattr(owner(name), name))):
                    rec = {"variant": variant, **timeline_of(q, k, v, src), **meta}
                print(json.dumps(rec), flush=True)
                with open(out_dir / "timeline.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
