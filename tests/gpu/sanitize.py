"""Run the generated Triton kernels under NVIDIA compute-sanitizer and write a short log.

    python tests/gpu/sanitize.py --out sanitize-out        # ~3-5 minutes on an H100

What it does (self-contained; needs a CUDA GPU, the CUDA toolkit's ``compute-sanitizer``
on PATH, in $CUDA_HOME/bin or /usr/local/cuda*/bin, or given with --sanitizer):

1. a warm-up run without the sanitizer compiles every kernel variant into Triton's cache
   and checks every case against the float64 reference (so the sanitized runs, which only
   re-launch cached binaries, stay short);
2. ``memcheck`` over forward and backward of every case: out-of-bounds and misaligned
   global / shared memory accesses. ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` gives every
   tensor its own allocation, so an access past the end of one tensor is not hidden inside
   PyTorch's memory pool;
3. ``racecheck`` over the backward pass (which runs the forward first): shared-memory
   data races inside the kernels (tl.dot staging, reductions);
4. optionally ``initcheck`` (--tools memcheck,racecheck,initcheck): reads of device memory
   never written (uninitialised scratch); PyTorch's own kernels may add noise there.

Cases: the reference patterns of tests/gpu/test_gpu_kernels.py (Longformer, BigBird,
causal window, dilated, the card example, StreamingLLM, Sparse Transformer, rows that no
key reaches) at odd and tiny lengths T = 1, 77, 333, 1000 (B = 2, H = 4, H_kv = 2: GQA,
D = 64, bf16, 64-token blocks), plus fp16 with D = 80 (padded head dim), 128-token blocks,
heavy rows forced to split (the in-kernel merges and their atomics), D = 256 (the largest head dim) and
T = 4099 (a tail block). --quick runs a third of them.

Output in --out: ``sanitize.log`` (one line per tool: errors, exit status, minutes; then
the case list), ``sanitize.json`` (the same, machine-readable), and per tool the
sanitizer's own report ``<tool>.log`` and the program output ``<tool>.out``. Exit status 0
when every tool reports 0 errors.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# ----------------------------------------------------------------------------------------
# the cases (worker side)


def reference_patterns() -> dict[str, str]:
    """The REFERENCE patterns of tests/gpu/test_gpu_kernels.py (one source of truth)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    spec = importlib.util.spec_from_file_location("_pcc_gpu_kernels", HERE / "test_gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.REFERENCE)


def cases(quick: bool) -> list[dict]:
    """name, pattern, T, B, H, H_kv, D, dtype, block, split of every case."""
    pats = reference_patterns()
    out = []
    for i, (name, src) in enumerate(pats.items()):
        for t in (1, 77, 333, 1000):
            if quick and (t, i % 2) not in ((77, 0), (333, 1), (1000, 0)):
                continue
            out.append(dict(name=name, src=src, t=t, b=2, h=4, hkv=2, d=64, dtype="bf16", block=64, split=None))
    extras = [
        dict(name="card", src=pats["card"], t=333, b=1, h=4, hkv=1, d=80, dtype="fp16", block=64, split=None),
        dict(name="longformer", src=pats["longformer"], t=1000, b=1, h=2, hkv=2, d=64, dtype="bf16", block=128, split=None),
        dict(name="longformer", src=pats["longformer"], t=1000, b=2, h=2, hkv=1, d=64, dtype="bf16", block=64, split=2),
        dict(name="bigbird", src=pats["bigbird"], t=777, b=1, h=2, hkv=2, d=64, dtype="bf16", block=64, split=3),
        dict(name="window", src="window(20) | global([3])", t=100, b=1, h=2, hkv=2, d=256, dtype="bf16", block=64, split=None),
        dict(name="causal_window", src=pats["causal_window"], t=4099, b=1, h=2, hkv=1, d=128, dtype="bf16", block=64, split=None),
    ]
    return out + (extras[::2] if quick else extras)


def _label(c: dict) -> str:
    split = f" split={c['split']}" if c["split"] else ""
    return (f"{c['name']:<18} T={c['t']:<5} B={c['b']} H={c['h']}/{c['hkv']} D={c['d']:<3} {c['dtype']} "
            f"block={c['block']}{split}")


def run_cases(passes: str, quick: bool, check: bool) -> int:
    """Worker: run every case (forward, or forward + backward); return the failures."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import patterncc
    from patterncc.backends import triton_backend
    from reference import reference_attention, rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    failures = 0
    for c in cases(quick):
        t0 = time.time()
        try:
            op = patterncc.compile(c["src"], block_size=c["block"], backend="triton")
            g = torch.Generator(device=device).manual_seed(c["t"])
            mk = lambda hh: torch.randn(c["b"], hh, c["t"], c["d"], device=device, generator=g).to(dtypes[c["dtype"]])  # noqa: E731
            q, k, v = mk(c["h"]), mk(c["hkv"]), mk(c["hkv"])
            try:
                layout = op.layout(c["t"], c["h"])
            except patterncc.PatternError:
                print(f"skip  {_label(c)}  (pattern does not fit this length)", flush=True)
                continue
            need_grad = "bwd" in passes
            q, k, v = (x.requires_grad_(need_grad) for x in (q, k, v))
            scale = c["d"] ** -0.5
            with torch.set_grad_enabled(need_grad):
                out = triton_backend.attention(q, k, v, layout, scale, split=c["split"])
            grads = ()
            if need_grad:
                dout = torch.randn(out.shape, device=device, generator=g).to(out.dtype)
                grads = torch.autograd.grad(out, (q, k, v), dout)
            if device == "cuda":
                torch.cuda.synchronize()
            bad = [n for n, x in zip(("out", "dq", "dk", "dv"), (out, *grads)) if not torch.isfinite(x).all()]
            errs = []
            if check and not bad:
                ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
                ref = reference_attention(*ref_in, torch.as_tensor(layout.mask(), device=device), scale)
                errs = [rel_err(out, ref)]
                if need_grad:
                    errs += [rel_err(a, r) for a, r in zip(grads, torch.autograd.grad(ref, ref_in, dout.double()))]
            status = "FAIL" if bad or any(e > 2e-2 for e in errs) else "ok"
            failures += status != "ok"
            detail = f" non-finite: {bad}" if bad else (" errors " + " ".join(f"{e:.1e}" for e in errs) if errs else "")
            print(f"{status:<5} {_label(c)}  {time.time() - t0:6.1f} s{detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - every case is reported
            failures += 1
            print(f"ERROR {_label(c)}  {type(e).__name__}: {e}", flush=True)
    print(f"cases done: {failures} failing", flush=True)
    return failures


# ----------------------------------------------------------------------------------------
# the driver


def find_sanitizer(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in filter(None, roots):
        for sub in ("bin", "compute-sanitizer"):
            path = Path(root) / sub / "compute-sanitizer"
            if path.exists():
                return str(path)
    sys.exit("compute-sanitizer not found: install the CUDA toolkit or pass --sanitizer /path/to/compute-sanitizer")


def _summary(tool: str, log: str) -> dict:
    """Error counts from a compute-sanitizer report."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", log)]
    # racecheck ends with "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
    errors += [int(n) for n in re.findall(r"RACECHECK SUMMARY:.*?\((\d+)\s+errors?", log)]
    hazards = re.findall(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard", log)
    return {"errors": sum(errors) if errors else None, "hazards": sum(map(int, hazards)) if hazards else None,
            "summary_lines": [l.strip("= ").strip() for l in log.splitlines() if "SUMMARY" in l][:6]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for sanitize.log, sanitize.json and the reports")
    ap.add_argument("--tools", default="memcheck,racecheck", help="comma-separated: memcheck, racecheck, initcheck")
    ap.add_argument("--quick", action="store_true", help="a third of the cases")
    ap.add_argument("--sanitizer", help="path of compute-sanitizer (default: searched)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per tool (default 1200)")
    ap.add_argument("--worker", choices=("fwd", "fwd,bwd"), help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        return 1 if run_cases(args.worker, args.quick, args.check) else 0
    if args.out is None:
        ap.error("--out DIR is required")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sanitizer = find_sanitizer(args.sanitizer)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATTERNCC_CACHE_DIR=os.environ.get("PATTERNCC_CACHE_DIR", str(out / "kernel-cache")),
               TRITON_CACHE_DIR=os.environ.get("TRITON_CACHE_DIR", str(out / "triton-cache")))
    quick = ["--quick"] if args.quick else []
    me = [sys.executable, str(Path(__file__).resolve())]
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sanitizer": sanitizer, "tools": {}}
    try:
        version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True, timeout=60).stdout
        results["sanitizer_version"] = version.strip().splitlines()[-1] if version.strip() else ""
    except (OSError, subprocess.SubprocessError):
        results["sanitizer_version"] = "?"

    def run(name, cmd, extra_env):
        t0 = time.time()
        with open(out / f"{name}.out", "w") as f:
            try:
                p = subprocess.run(cmd, env=dict(env, **extra_env), stdout=f, stderr=subprocess.STDOUT,
                                   timeout=args.timeout, cwd=ROOT)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        return rc, (time.time() - t0) / 60

    print(f"warm-up (no sanitizer: compile every kernel, check against the reference) ...", flush=True)
    rc, minutes = run("warmup", me + ["--worker", "fwd,bwd", "--check"] + quick, {})
    results["warmup"] = {"exit": rc, "minutes": round(minutes, 2)}
    print(f"  exit {rc}, {minutes:.1f} min; see {out / 'warmup.out'}", flush=True)

    for tool in [t.strip() for t in args.tools.split(",") if t.strip()]:
        passes = "fwd,bwd"  # racecheck: the backward (its forward runs first), memcheck / initcheck: both
        log = out / f"{tool}.log"
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "50",
               "--log-file", str(log)] + me + ["--worker", passes] + quick
        print(f"{tool} over {'backward' if tool == 'racecheck' else 'forward and backward'} ...", flush=True)
        rc, minutes = run(tool, cmd, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        text = log.read_text(errors="replace") if log.exists() else ""
        info = {"exit": rc, "minutes": round(minutes, 2), **_summary(tool, text)}
        body = (out / f"{tool}.out").read_text(errors="replace")
        info["cases"] = len(re.findall(r"^(ok|FAIL|ERROR|skip) ", body, re.M))
        info["case_failures"] = len(re.findall(r"^(FAIL|ERROR) ", body, re.M))
        results["tools"][tool] = info
        print(f"  errors {info['errors']}, exit {rc}, {minutes:.1f} min, {info['cases']} cases", flush=True)

    clean = results["warmup"]["exit"] == 0 and all(
        t["exit"] == 0 and t["errors"] == 0 and not t["case_failures"] for t in results["tools"].values())
    results["clean"] = clean
    (out / "sanitize.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"patterncc compute-sanitizer run {results['started']} ({results['sanitizer_version']})",
             f"warm-up: exit {results['warmup']['exit']}, {results['warmup']['minutes']} min"]
    for tool, t in results["tools"].items():
        lines.append(f"{tool}: {t['errors']} errors" + (f", {t['hazards']} hazards" if t["hazards"] is not None else "")
                     + f", exit {t['exit']}, {t['cases']} cases ({t['case_failures']} failing), {t['minutes']} min")
    lines.append("result: " + ("CLEAN" if clean else "NOT CLEAN (see the <tool>.log reports)"))
    lines.append("")
    lines.append("cases:")
    lines += ["  " + _label(c) for c in cases(args.quick)]
    (out / "sanitize.log").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(results["tools"]) + 3]))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
