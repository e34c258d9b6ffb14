"""Where a forward's time goes, program by program: each program's start, end and SM from the GPU clock.

The uninstrumented forward is timed first (CUDA-graph replay, ms). Then the generated forward of a pattern is compiled a second time with two lines added to
`_attn_fwd`: it reads ``%globaltimer`` when it starts and, when it ends, stores (start, end,
``%smid``) at its program id in a buffer passed in place of the membership tables, so
patterns with tables are refused. One eager launch after a warm-up; times in µs from the first
start. Per kind of work item (an ordinary row, a piece of a split row, a thin-row piece):
how many, their mean and total duration, when the last one ends; for the whole launch: its
span, how busy the SMs' program slots were (the sum of durations over span x slots) and how
many programs were running in each twentieth of the span.

    T=65536 PATS="window(256);window(256) | global([0])" python3 bench/timeline.py   # on a GPU

Writes one JSON line per (pattern, head dim) to $OUT/timeline.jsonl (or ./timeline.jsonl).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

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


def load_instrumented(gen, directory: Path):
    """The instrumented `_attn_fwd` of a generated module, imported from a file beside it."""
    path = directory / (gen.path.stem + "_timeline.py")
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


def main() -> None:
    import torch
    import patterncc
    from patterncc.backends import triton_backend as tb
    from sass_loops import programs_per_sm
    from triton.testing import do_bench_cudagraph

    out_dir = Path(os.environ.get("OUT", "."))
    T, H = int(os.environ.get("T", "65536")), 16
    pats = os.environ.get("PATS", "window(256);window(256) | global([0])").split(";")
    tb.DIRECT_LAUNCH = False  # every launch through kernel[grid](...), which the wrapper below replaces
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for D in (64, 128):
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for src in pats:
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
            timed = load_instrumented(run.gen, out_dir)
            names = list(timed.arg_names)

            compiled = []

            class Timed:  # the kernel the backend launches, with the buffer in place of the tables
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        args = list(args)
                        args[names.index("tables")] = buf.view(torch.int8)
                        compiled.append((timed[grid](*args, **kwargs), kwargs.get("num_warps", 4)))
                        return compiled[-1][0]
                    return launch

            real_kernel = run.gen.kernel
            run.gen.__dict__["kernel"] = lambda name: Timed() if name == "_attn_fwd" else real_kernel(name)
            try:
                for _ in range(3):
                    out, _ = tb.forward(q, k, v, lay, D ** -0.5)
                torch.cuda.synchronize()
            finally:
                del run.gen.__dict__["kernel"]
            stamps = buf.view(programs, 3).cpu().numpy()
            it = walk.items
            item = np.arange(programs) // tiles
            kinds = np.where(it.thin.cpu().numpy()[item] >= 0, "thin_piece",
                             np.where(it.slot.cpu().numpy()[item] >= 0, "split_piece", "row"))
            kernel, warps = compiled[-1]
            slots = programs_per_sm(kernel.n_regs, kernel.metadata.shared, warps)
            used = torch.cuda.get_device_properties(0)
            rec = {"pattern": src, "D": D, "T": T, "device": used.name, "torch": torch.__version__, "graph_ms": graph_ms,
                   "exact": bool(torch.equal(out, ref)), "tiles_per_item": [int(x) for x in np.bincount(
                       (it.end - it.start).cpu().numpy())[1:].nonzero()[0] + 1][:12],
                   "registers": kernel.n_regs, "programs_per_sm": slots,
                   **summarise(stamps[:, 0], stamps[:, 1], stamps[:, 2], kinds, sms * slots)}
            print(json.dumps(rec), flush=True)
            with open(out_dir / "timeline.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
