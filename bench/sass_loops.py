"""Instructions per tile in the kernels' main loops, counted in sm_90 SASS without a GPU.

Compiles the generated kernels of the reference patterns ahead of time for an H100 (Triton's
AOT path, as tests/test_codegen.py does: bf16, D=64, 64x64 tiles, 4 warps, 2 stages, TMA; thin
query rows and their paired steps where the backend launches them),
disassembles them with the nvdisasm that ships with Triton, finds each kernel's main loop
(the back-branch whose body holds the tile's HGMMA or HMMA products) and splits its instructions
into what every tile runs (the FULL path) and the sections a branch skips (the masks of
PARTIAL or tail tiles). The basis of bench/RESULTS.md's static predictions; a GPU run
measures what the counts turn into.

    python bench/sass_loops.py                       # the switches as they are
    SWITCHES=SKIP_TAIL_MASK,MERGE_BANDS,CLASS_MASK python bench/sass_loops.py   # those turned on
    KERNELS=_attn_fwd,_attn_bwd_dq PATTERNS=causal_window python bench/sass_loops.py
    HEAD_DIM=128 SWITCHES=AFFINE_TOKENS_MAX_HEAD_PAD=0 PATTERNS=dilated python bench/sass_loops.py
    MAXNREG=168 STAGES=3 KERNELS=_attn_fwd python bench/sass_loops.py   # a register cap, 3 stages
    SEQ_LEN16=1 KERNELS=_attn_bwd_dkdv python bench/sass_loops.py   # SEQ_LEN a multiple of 16 (SEQ_LEN_CLASSES)

Prints one JSON line per (pattern, kernel, loop): instructions in the loop, the skipped
sections (nested ones listed too), the FULL path, its waits for warpgroup products (one per
HGMMA: ptxas serialised them), the kernel's local-memory (register spill) instructions, and its
registers, shared memory and programs per SM (4 warps).
SWITCHES takes NAME (set True) or NAME=integer; MAXNREG caps registers, STAGES sets
num_stages (default 2) for every kernel. Counts depend on the Triton version (the device
runs 3.6: ``pip install triton==3.6.0`` into a venv to match it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
_SPILL = re.compile(r"\b(?:STL|LDL)\b")  # local memory: what ptxas spilled


def parse(sass: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """SASS text as [(kind, text)] items ('label' or 'ins') and the index of each label."""
    items, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(items)
            items.append(("label", m.group(1)))
            continue
        m = _INSTRUCTION.match(line)
        if m:
            items.append(("ins", m.group(1)))
    return items, labels


def main_loops(sass: str, min_products: int = 4, max_instructions: int = 1500) -> list[dict]:
    """Loops (a branch back to an earlier label) holding at least ``min_products`` tensor-core
    products (HGMMA, the warpgroup's; or HMMA, a warp's, which 16-row tiles use): their size,
    the sections skipped by forward branches inside them, the FULL path (the loop less its
    outermost skipped sections), and its waits for warpgroup products (WARPGROUP.DEPBAR):
    about one per tile where the products run asynchronously, one per HGMMA where ptxas
    serialised them (it did so for a whole walk loop at D=128 once, 19% slower:
    bench/RESULTS.md, twenty-second session)."""
    items, labels = parse(sass)
    count = lambda a, b: sum(1 for kind, _ in items[a:b] if kind == "ins")  # noqa: E731
    loops = []
    for i, (kind, text) in enumerate(items):
        m = _BRANCH.search(text) if kind == "ins" else None
        if not m or labels[m.group(1)] >= i:
            continue
        start = labels[m.group(1)]
        if sum("MMA" in t for _, t in items[start:i + 1]) < min_products or count(start, i + 1) > max_instructions:
            continue
        skips = []
        for j in range(start, i + 1):
            f = _BRANCH.search(items[j][1]) if items[j][0] == "ins" and "@" in items[j][1] else None
            if f and j < labels.get(f.group(1), -1) <= i:
                skips.append((j, labels[f.group(1)]))
        outer = [s for s in skips if not any(o[0] < s[0] and s[1] <= o[1] for o in skips)]
        total = count(start, i + 1)
        shapes = sorted({m.group(1) for _, t in items[start:i + 1]
                         for m in [re.search(r"(HMMA\.\d+|(?<=HGMMA\.)\d+x\d+)", t)] if m})
        waits = sum("WARPGROUP.DEPBAR" in t for _, t in items[start:i + 1])
        loops.append({"span": (start, i), "products": shapes, "instructions": total,
                      "skipped": [count(a + 1, b) for a, b in skips],
                      "full_path": total - sum(count(a + 1, b) for a, b in outer), "product_waits": waits})
    # Innermost loops only: a branch from a far-away wait loop back into a walk spans it.
    inner = [lp for lp in loops if not any(o is not lp and lp["span"][0] <= o["span"][0] and o["span"][1] <= lp["span"][1]
                                           for o in loops)]
    for lp in inner:
        del lp["span"]
    return inner


def sass_of(cubin: bytes) -> str:
    import triton
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def resources(compiled, num_warps: int) -> dict:
    """Registers per thread (ptxas, read back by cuobjdump), shared memory per program, and how
    many programs of ``num_warps`` warps fit on an sm_90 SM by each (64K registers, 228 KB with
    1 KB reserved per program): the kernels are latency-bound, so this decides as much as the
    instruction counts do (bench/RESULTS.md, nineteenth session)."""
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    return {"registers": regs, "shared_bytes": shared, "programs_per_sm": programs_per_sm(regs, shared, num_warps)}


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps that fit on one sm_90 SM at once: by registers (64K
    per SM, allocated per warp in units of 8 per thread) and by shared memory (228 KB, 1 KB
    of it reserved per program), whichever is fewer (the 32-program and 64-warp limits
    never bind here)."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * num_warps)
    by_shared = (228 * 1024) // (shared_bytes + 1024)
    return min(by_registers, by_shared)


def backend_plan(pattern, t: int = 4096, h: int = 16):
    """The kernel plan the backend launches for ``pattern`` (T=t, 64-token blocks): what the
    THIN_ROWS and PAIR_THIN constexprs of its forward and the THIN_KEYS of its dK/dV follow."""
    import torch
    from patterncc.backends import triton_backend
    from patterncc.layout import get_layout
    q = torch.empty(1, h, t, 64)
    return triton_backend.launch_for(q, q, get_layout(pattern, t, h, 64), None).plan


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter (before triton's import)
    import triton
    import patterncc
    from patterncc import codegen, lowering
    from patterncc.backends import triton_backend
    from bench_attention import PATTERNS, checked_names, switched
    from test_codegen import aot_compile

    os.environ.setdefault("PATTERNCC_CACHE_DIR", tempfile.mkdtemp())
    names = checked_names(os.environ.get("PATTERNS", ",".join(PATTERNS)).split(","), PATTERNS, "PATTERNS")
    kernels = os.environ.get("KERNELS", "_attn_fwd,_attn_bwd_dq,_attn_bwd_dkdv").split(",")
    on = [s for s in os.environ.get("SWITCHES", "").split(",") if s]
    head_dim = int(os.environ.get("HEAD_DIM", "64"))
    maxnreg = int(os.environ.get("MAXNREG", "0")) or None
    stages = int(os.environ.get("STAGES", "2"))
    seq_len_16 = os.environ.get("SEQ_LEN16") == "1"  # as Triton specialises a multiple of 16, where it may
    warps = 4
    values = {s.partition("=")[0]: int(s.partition("=")[2]) if "=" in s else True for s in on}
    with switched(values):
        tail = not triton_backend.SKIP_TAIL_MASK  # the bench's lengths have no tail entries
        for name in names:
            gen = codegen.load(patterncc.parse(PATTERNS[name]))
            permuted = 1 if name == "dilated" and lowering.RESIDUE_ORDER else 0
            gap = gen.plan.class_gap if permuted and lowering.CLASS_MASK else 0  # the bench's layouts allow it
            plan = backend_plan(patterncc.parse(PATTERNS[name]))
            compiled = aot_compile(gen, "bf16", head_dim, 64, 64, permuted, warps, stages, tma=True, tail=tail,
                                   class_gap=gap, maxnreg=maxnreg, thin_rows=plan.fwd.items.n_thin > 0,
                                   pair_thin=triton_backend.pairs_thin_rows(plan.fwd, lowering.head_pad(head_dim)),
                                   thin_keys=plan.kv.items.n_thin > 0, seq_len_16=seq_len_16)
            for kernel in kernels:
                sass = sass_of(compiled[kernel].asm["cubin"])
                spills = len(_SPILL.findall(sass))
                use = resources(compiled[kernel], warps)
                for n, loop in enumerate(main_loops(sass)):
                    print(json.dumps({"pattern": name, "kernel": kernel, "loop": n, "triton": triton.__version__,
                                      "head_dim": head_dim, "switches_on": on, "maxnreg": maxnreg,
                                      "stages": stages, "seq_len_16": seq_len_16, "spill_instructions": spills, **use,
                                      **loop}), flush=True)


if __name__ == "__main__":
    main()
