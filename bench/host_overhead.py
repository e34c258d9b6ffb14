"""Host time of one patterncc call against its GPU time (T=16384, bf16, B=1, H=16, D=64).

On a GPU (the default) it prints, per reference pattern, one JSON line with
``host_ms_per_call`` (back-to-back forward calls, no synchronisation: the rate the Python
side can issue them), ``do_bench_ms`` (what bench_attention.py reports) and
``cudagraph_ms`` (the same forward replayed from a CUDA graph: GPU time alone). When the
first is near the second and above the third, the call is host-bound. The same for
forward+backward: ``host_fwdbwd_ms`` (issued while a sleep kernel holds the GPU, so the
host never waits on it) against ``do_bench_fwdbwd_ms``.

``--stub`` measures patterncc's own share on any machine: the Triton launches are replaced
by no-ops (CPU tensors, the interpreter's code path up to the launch, launch configurations
looked up as on the first GPU of the tuning table), and it prints the
microseconds per forward call and per forward+backward call. Before/after numbers of a
host-side change come from running it on both commits.

    python bench/host_overhead.py            # on a GPU machine
    python bench/host_overhead.py --profile  # ... with a cProfile of each forward+backward
    python bench/host_overhead.py --stub     # anywhere (sets TRITON_INTERPRET=1)
    python bench/host_overhead.py --breakdown  # on a GPU: host time per launch, per pass
    python bench/host_overhead.py --breakdown --profile  # and where the backward's host time goes
    python bench/host_overhead.py --jit      # any of the above with triton_backend.DIRECT_LAUNCH off
    python bench/host_overhead.py --split-ab  # on a GPU: host and GPU time, split rows first on / off
    python bench/host_overhead.py --phases   # on a GPU: where one forward+backward's host time goes

``--breakdown`` records the kernel launches of one forward+backward and replays each alone
behind a sleep kernel (its host cost: Triton's launch path and the driver; ``host_us_direct``:
the same launch straight into the compiled kernel, as DIRECT_LAUNCH does), and times the
forward and the backward pass apart, and one ``torch.empty`` of an output's size.
"""
from __future__ import annotations

import json
import os
import sys
import time

STUB = "--stub" in sys.argv
PROFILE = "--profile" in sys.argv
BREAKDOWN = "--breakdown" in sys.argv
JIT = "--jit" in sys.argv  # triton_backend.DIRECT_LAUNCH off (every launch through the JIT)
SPLIT_AB = "--split-ab" in sys.argv
PHASES = "--phases" in sys.argv
if STUB:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import patterncc  # noqa: E402
from patterncc.backends import triton_backend  # noqa: E402
from bench_attention import PATTERNS  # noqa: E402

T, H, D = 16384, 16, 64


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](*args) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_call_us(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def stub_main() -> None:
    from patterncc import codegen
    from patterncc.backends import triton_backend, tuning
    codegen.Generated.kernel = lambda self, name: _NoLaunch()
    gpu = next(iter(tuning.TUNED))  # configs looked up as on that GPU (the tuning-table path)
    triton_backend.device_name = lambda x: gpu
    q, k, v = (torch.randn(1, H, T, D, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def fwdbwd(op):
        qg.grad = kg.grad = vg.grad = None  # no CPU-side gradient accumulation in the timing
        op(qg, kg, vg).backward(do)

    for name, src in PATTERNS.items():
        op = patterncc.compile(src, block_size=64, backend="triton")
        row = {"pattern": name,
               "fwd_us": _per_call_us(lambda: op(q, k, v), 2000),
               "fwd_grad_inputs_us": _per_call_us(lambda: op(qg, kg, vg), 2000),
               "fwdbwd_us": _per_call_us(lambda: fwdbwd(op), 1000)}
        print(json.dumps({k: round(x, 1) if isinstance(x, float) else x for k, x in row.items()}), flush=True)


def gpu_main() -> None:
    from bench_attention import bench, bench_graph, host_ms
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    for name, src in PATTERNS.items():
        op = patterncc.compile(src, block_size=64, backend="triton")

        def fwdbwd():
            qg.grad = kg.grad = vg.grad = None  # as do_bench's grad_to_none: no accumulation kernels
            op(qg, kg, vg).backward(do)
        host = host_ms(lambda: op(q, k, v), 200)
        plain = bench(lambda: op(q, k, v))
        graph = bench_graph(lambda: op(q, k, v), name)
        print(json.dumps({"pattern": name, "host_ms_per_call": round(host, 4), "do_bench_ms": round(plain, 4),
                          "cudagraph_ms": graph and round(graph, 4),
                          "host_fwdbwd_ms": round(host_ms(fwdbwd, 20, ahead=True), 4),
                          "do_bench_fwdbwd_ms": round(bench(fwdbwd, [qg, kg, vg]), 4)}), flush=True)
        if PROFILE:
            _host_profile(fwdbwd, name)


def _host_profile(fn, name: str, n: int = 200, sort=("tottime",)) -> None:
    """The host functions ``fn`` spends its time in (cProfile, by own time, then by ``sort``)."""
    import cProfile
    import pstats
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"== host profile of {n} calls, {name}", flush=True)
    for key in sort:
        pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(18)


class _Recorder:
    """Wraps a generated kernel: kernel[grid](*args) launches it and keeps the call."""

    def __init__(self, name: str, kernel, calls: list):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, self.kernel, grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _op_profile(fn, name: str, n: int = 50) -> None:
    """The torch operators and CUDA runtime calls ``fn`` issues (torch.profiler, by self CPU time):
    what cProfile's C++ frames hide (autograd nodes, the caching allocator, cudaMalloc, events)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"== operators of {n} calls, {name}", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def breakdown_main(patterns=("longformer", "causal_window")) -> None:
    from bench_attention import host_ms
    from patterncc import codegen
    from triton.tools.tensor_descriptor import TensorDescriptor
    calls: list = []
    real = codegen.Generated.kernel
    recording = lambda self, name: _Recorder(name, real(self, name), calls)  # noqa: E731
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    print(json.dumps({"torch_empty_us": round(host_ms(lambda: torch.empty_like(q), 200, ahead=True) * 1e3, 1)}))
    for name in patterns:
        op = patterncc.compile(PATTERNS[name], block_size=64, backend="triton")
        out = op(qg, kg, vg)
        out.backward(do, retain_graph=True)
        torch.cuda.synchronize()
        # Record one forward+backward's launches only: kept arguments (the gradients) would make
        # autograd copy every later gradient instead of taking it, and hold memory. Through the
        # JIT: a direct launch of a known key never calls kernel[grid], so it would record nothing.
        codegen.Generated.kernel = recording
        direct, triton_backend.DIRECT_LAUNCH = triton_backend.DIRECT_LAUNCH, False
        out = op(qg, kg, vg)
        out.backward(do, retain_graph=True)
        codegen.Generated.kernel, triton_backend.DIRECT_LAUNCH = real, direct
        torch.cuda.synchronize()
        recorded, calls[:] = list(calls), []

        def bwd():
            qg.grad = kg.grad = vg.grad = None  # no accumulation kernels in the timing
            out.backward(do, retain_graph=True)
        row = {"pattern": name,
               "fwd_us": round(host_ms(lambda: op(q, k, v), 50, ahead=True) * 1e3, 1),
               "fwd_us_no_ahead": round(host_ms(lambda: op(q, k, v), 50) * 1e3, 1),
               "bwd_us": round(host_ms(bwd, 20, ahead=True) * 1e3, 1),
               "bwd_us_no_ahead": round(host_ms(bwd, 20) * 1e3, 1),
               "launches": []}
        for kname, kernel, grid, args, kwargs in recorded:
            fn = (lambda kr=kernel, g=grid, a=args, kw=kwargs: kr[g](*a, **kw))
            direct = triton_backend.DirectLaunches()  # the same launch, straight into the compiled kernel
            fn_direct = (lambda n=kname, kr=kernel, g=grid, a=args, kw=kwargs: direct.launch(n, kr, g, a, kw))
            row["launches"].append({"kernel": kname, "args": len(args),
                                    "descriptors": sum(isinstance(a, TensorDescriptor) for a in args),
                                    "host_us": round(host_ms(fn, 50, ahead=True) * 1e3, 1),
                                    "host_us_no_ahead": round(host_ms(fn, 50) * 1e3, 1),
                                    "host_us_direct": round(host_ms(fn_direct, 50, ahead=True) * 1e3, 1)})
        print(json.dumps(row), flush=True)
        if PROFILE:
            _host_profile(bwd, f"{name} (backward only)", sort=("tottime", "cumulative"))
            _op_profile(bwd, f"{name} (backward only)")


def split_ab_main(patterns=("bigbird", "longformer"), rounds: int = 3) -> None:
    """lowering.SPLIT_FIRST on and off, alternated ``rounds`` times in one process: the host
    time of a forward call issued behind a sleep kernel (``host_ahead_ms``: what issuing costs)
    and back to back (``host_ms``: what bench_attention.py reports), do_bench and CUDA-graph
    times. The eighth-session bench measured split-first's host time 0.1-0.17 ms above row
    order's (BigBird, 16K and 64K), though item order is no host work: this tells a real host
    cost from the order the bench measured them in."""
    from bench_attention import bench, bench_graph, host_ms
    from patterncc import lowering
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name in patterns:
        for r in range(rounds):
            for first in (True, False):
                lowering.SPLIT_FIRST = first
                op = patterncc.compile(PATTERNS[name], block_size=64, backend="triton")
                op(q, k, v)
                print(json.dumps({"pattern": name, "round": r, "split_first": first,
                                  "host_ahead_ms": round(host_ms(lambda: op(q, k, v), 200, ahead=True), 4),
                                  "host_ms": round(host_ms(lambda: op(q, k, v), 50), 4),
                                  "do_bench_ms": round(bench(lambda: op(q, k, v)), 4),
                                  "cudagraph_ms": round(bench_graph(lambda: op(q, k, v), name) or 0, 4),
                                  "host_after_graph_ms": round(host_ms(lambda: op(q, k, v), 50), 4)}), flush=True)
    lowering.SPLIT_FIRST = True


class _Phases:
    """Inclusive host time per named function, through wrappers put in place of module or
    class attributes (perf_counter_ns: ~0.1 us per call, unlike cProfile's per-call cost)."""

    def __init__(self):
        self.ns: dict = {}
        self.calls: dict = {}
        self._undo: list = []

    def wrap(self, owner, attr: str, label: str | None = None) -> None:
        real = getattr(owner, attr)
        label = label or attr
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return real(*args, **kwargs)
            finally:
                ns[label] = ns.get(label, 0) + clock() - t0
                calls[label] = calls.get(label, 0) + 1
        own = vars(owner) if isinstance(owner, type) else getattr(owner, "__dict__", {})
        self._undo.append((owner, attr, attr in own, own.get(attr)))
        setattr(owner, attr, timed)

    def undo(self) -> None:
        for owner, attr, had, real in reversed(self._undo):
            if had:
                setattr(owner, attr, real)
            else:
                delattr(owner, attr)
        self._undo.clear()

    def per_call_us(self, n: int) -> dict:
        return {k: {"us": round(v / n / 1e3, 1), "calls": self.calls[k] / n} for k, v in
                sorted(self.ns.items(), key=lambda kv: -kv[1])}


def phases_main(patterns=("causal_window", "longformer"), n: int = 50) -> None:
    """phases_one with triton_backend.POINTER_ARGS on and off, alternated twice."""
    for r in range(2):
        for pointers in (True, False):
            triton_backend.POINTER_ARGS = pointers
            for name in patterns:
                print(json.dumps({"round": r, "pointer_args": pointers, **phases_one(name, n)}), flush=True)
    triton_backend.POINTER_ARGS = True


def phases_one(name: str, n: int = 50) -> dict:
    """Where the host time of one eager forward+backward goes (T=16K, D=64, direct launches
    as configured), per call: the whole step, the op call (forward) and ``backward()``
    (autograd included), patterncc's backend functions, and inside each direct launch the
    key (``_specialised``) and Triton's runner (descriptor encoding, argument packing, the
    driver call). Issued behind a sleep kernel so the host never waits on the GPU; inclusive
    times, so nested entries overlap."""
    from bench_attention import host_ms
    tb = triton_backend
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    op = patterncc.compile(PATTERNS[name], block_size=64, backend="triton")
    step_out = {}

    def fwd():
        step_out["out"] = op(q, k, v)

    def bwd():
        step_out["out"].backward(do)

    def step():
        q.grad = k.grad = v.grad = None
        fwd()
        bwd()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    plain_ms = host_ms(step, n, ahead=True)
    ph = _Phases()
    real_runner = tb._compiled_runner

    def timed_runner(kernel, compiled, grid, n_args, kwargs):
        # what a direct launch calls: Triton's runner (stream lookup, descriptor
        # encoding, argument packing, the driver call)
        run = real_runner(kernel, compiled, grid, n_args, kwargs)
        if run is None:
            return None
        holder = type("Runner", (), {"run": staticmethod(run)})
        ph.wrap(holder, "run", "Triton runner (launcher + driver)")
        return holder.run
    tb._compiled_runner = timed_runner
    ph.wrap(tb, "forward", "forward()")
    ph.wrap(tb, "backward", "backward()")
    ph.wrap(tb, "_tuned_launch")
    ph.wrap(tb, "_empty", "_empty (torch.empty)")
    ph.wrap(tb, "_specialised", "_specialised (direct-launch key)")
    ph.wrap(tb.DirectLaunches, "launch", "DirectLaunches.launch (key + runner)")
    ph.wrap(tb._Launch, "walked", "_Launch.walked (descriptors)")
    ph.wrap(tb._Launch, "walk_args")
    ph.wrap(tb._Launch, "scratch")
    ph.wrap(tb._SparseAttention, "apply", "autograd Function.apply (forward)")
    # new runners (and their timed launchers) for this op: drop the kept ones
    for lay_run in list(op.layout(T, H)._memo.values()):
        if isinstance(lay_run, tb._Launch):
            lay_run.direct = tb.DirectLaunches()
    step()
    torch.cuda.synchronize()
    ph.ns.clear(), ph.calls.clear()
    fwd_ms = host_ms(fwd, n, ahead=True)  # (and the phases of the forward alone)
    fwd_phases = ph.per_call_us(n + 1)
    ph.ns.clear(), ph.calls.clear()
    t_step = host_ms(step, n, ahead=True)
    row = {"pattern": name, "step_us_unwrapped": round(plain_ms * 1e3, 1),
           "step_us_wrapped": round(t_step * 1e3, 1), "fwd_only_us_wrapped": round(fwd_ms * 1e3, 1),
           "step_phases": ph.per_call_us(n + 1), "fwd_phases": fwd_phases}
    ph.undo()
    tb._compiled_runner = real_runner
    return row


if __name__ == "__main__":
    if JIT:
        triton_backend.DIRECT_LAUNCH = False
    if SPLIT_AB:
        split_ab_main()
    elif PHASES:
        phases_main()
    else:
        breakdown_main() if BREAKDOWN else stub_main() if STUB else gpu_main()
