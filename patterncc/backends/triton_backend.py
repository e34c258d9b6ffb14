"""Block-sparse attention on the generated Triton kernels (the GPU path).

``attention(q, k, v, layout, scale)`` runs the pattern's generated module (see
:mod:`patterncc.codegen`) over the layout's kernel plan (see :mod:`patterncc.lowering`):

* forward: one launch of ``_attn_fwd`` over the work items (split heavy rows merged in the
  kernel by their last item), saving the base-2 log-sum-exp per query row;
* backward: ``_attn_bwd_dq`` over the forward index, computing Delta = rowsum(dO * O) on
  the way (``DELTA_IN_DQ``), then ``_attn_bwd_dkdv`` over the kv index: one launch each
  (``_attn_bwd_preprocess`` computes Delta alone when dQ is not wanted).

With ``DIRECT_LAUNCH`` (on; ``PATTERNCC_DIRECT_LAUNCH=0`` turns it off) a kernel's repeated
launches skip Triton's JIT dispatch (see :class:`DirectLaunches`).

Launch configurations come from :mod:`patterncc.backends.tuning`; the row height of each
walk (one layout block, 64 or 128 positions) from the layout (``lowering.row_class``). No host
synchronisation (but the autotuner's first measurement), nothing of size T^2: the plan
tensors and each call's launch constants (:func:`launch_for`) are cached on the layout,
scratch buffers hold only the partials of split rows. Triton itself is imported lazily
(``import patterncc`` never imports it), and with ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors under Triton's interpreter (slow; for tests).
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings

import torch

from .. import codegen, lowering
from ..layout import Layout
from . import tuning

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# After a kernel's first launch, launch it again straight through the compiled kernel Triton
# returned while nothing it was specialised on has changed (see DirectLaunches): a quarter
# to a third less host time per launch (measured, bench/RESULTS.md). Off (the environment's
# PATTERNCC_DIRECT_LAUNCH=0, or False here): every launch goes through Triton's JIT dispatch.
DIRECT_LAUNCH = os.environ.get("PATTERNCC_DIRECT_LAUNCH", "1") != "0"
# A direct launch passes tensors as their addresses (ints): Triton's launcher takes an int
# pointer as it is, where for a tensor it calls data_ptr() and asks the driver whether the
# address is device memory (cuPointerGetAttribute), per pointer argument and launch. The
# plan's addresses are read once. False: tensors are passed as tensors (an A/B switch).
POINTER_ARGS = True
# The dQ pass computes Delta = rowsum(dO * O) from the O and dO rows it holds anyway and
# stores it for the dK/dV pass, which then runs after it: no separate pass reading O and dO
# again (2% of a backward at 64K, bench/RESULTS.md). False: the separate pass (an A/B switch).
DELTA_IN_DQ = True
# A forward walk with masked entries and no TAIL entry (T a whole number of blocks, no
# empty residue slots) runs a kernel compiled without the tail test: its PARTIAL tiles apply
# the predicate alone (a longformer masked tile 242 -> 86 sm_90 SASS instructions, Triton
# 3.6; FULL tiles as before). The first use compiles the other variant too (_Launch.warm):
# a new length with (or without) a tail then finds its kernel compiled, as issue 5's 50 ms
# to a new length's first launch asks (a dilated window at 16K + 64: 815 ms without it).
# Measured at 64K, D=64 on an H100 (bench/RESULTS.md, sixteenth session): longformer forward
# -4..-6%, dilated -3%, causal window -1..-2%. A walk of FULL entries only keeps the general
# kernel, whose mask branch never runs there (BigBird: its FULL path is 6 instructions
# shorter; the tail-free one measured +0..1%). False: the general kernel always (A/B row).
SKIP_TAIL_MASK = True
# Thin-row items (16 query rows against many key blocks, see lowering's THIN_ROWS) walk two
# key tiles per online-softmax step (kernels' _walk_pairs): 198 sm_90 SASS instructions a
# block instead of 228 at D=64 (Triton 3.6); measured at 64K on an H100 (bench/RESULTS.md,
# twenty-second session), longformer's forward -1% at D=64. Only up to heads padded to
# PAIR_THIN_MAX_HEAD_PAD: at D=128 the pairs' pipeline buffers took the 3-stage forward from
# 2 programs per SM to 1. False: one tile a step (A/B row `pairthin`).
PAIR_THIN = True
PAIR_THIN_MAX_HEAD_PAD = 64


def pairs_thin_rows(walk: lowering.Walk, head_pad: int) -> bool:
    """The forward's PAIR_THIN constexpr for ``walk`` at heads padded to ``head_pad``."""
    return PAIR_THIN and walk.items.n_thin > 0 and head_pad <= PAIR_THIN_MAX_HEAD_PAD


# Queries per step of dK/dV's thin-key items (lowering.THIN_KEYS; at most a layout block): a
# 16-key tile against 64 queries holds 16 x 64 fp32 scores, where the regular D=64 step
# (BLOCK_M = 32) holds 64 x 32.
THIN_KEY_QUERIES = 64

# Launch configurations live in tuning.py; these names stay here for callers and tests.
KernelConfig = tuning.KernelConfig
CONFIGS = tuning.CONFIGS


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(x: torch.Tensor) -> str | None:
    """The GPU name that keys launch configurations (None under the CPU interpreter)."""
    if not x.is_cuda or codegen.interpreting():
        return None
    return _gpu_name(x.device.index if x.device.index is not None else torch.cuda.current_device())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
              *, split: int | None = None) -> torch.Tensor:
    """out [B, H, T, D] for q [B, H, T, D], k, v [B, H_kv, T, D]; differentiable in q, k, v.

    The caller validated shapes, dtypes and devices and made the tensors contiguous.
    ``split`` overrides the longest run of blocks one program walks (see lowering).
    Runs through the ``patterncc::sparse_attention`` custom op, so ``torch.compile`` sees
    one opaque op (no graph break) and CUDA graphs can capture it after a warm-up call.
    """
    if torch.compiler.is_compiling():
        key = op_key(layout.pattern, layout.block_size, split)
        return torch.ops.patterncc.sparse_attention(q, k, v, key, float(scale))[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return forward(q, k, v, layout, float(scale), split)[0]  # no graph to record: skip autograd's bookkeeping
    return _SparseAttention.apply(q, k, v, layout, float(scale), split)


class _SparseAttention(torch.autograd.Function):
    """The eager path. The custom op below runs the same forward/backward for
    torch.compile; in eager mode its dispatch layer costs about 0.5 ms of host time per
    forward+backward on an H100 host (bench/profile_op.py), enough to idle the GPU."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, split):
        out, lse = forward(q, k, v, layout, scale, split)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.split = layout, scale, split
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, ctx.layout, ctx.scale, ctx.split,
                              need_q, need_k or need_v)
        return dq, dk if need_k else None, dv if need_v else None, None, None, None


def op_key(pattern, block_size: int, split: int | None = None) -> str:
    """The string the custom op carries to find its pattern again (ops take no Python objects)."""
    key = f"{block_size}/{split}/{pattern}"
    _PATTERNS.setdefault(key, (pattern, block_size, split))
    return key


def generated_source(pattern) -> str:
    """The generated Triton module source for ``pattern``."""
    return codegen.generated_source(pattern)


# ----------------------------------------------------------------------------------------
# the custom op: forward, backward and their fake (shape-only) versions for tracing

_PATTERNS: dict = {}


def _layout_of(key: str, q: torch.Tensor) -> tuple[Layout, int | None]:
    from ..layout import get_layout
    pattern, block, split = _PATTERNS[key]
    return get_layout(pattern, q.shape[2], q.shape[1], block), split


@torch.library.custom_op("patterncc::sparse_attention", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    layout, split = _layout_of(key, q)
    return forward(q, k, v, layout, scale, split)


@_fwd_op.register_fake
def _(q, k, v, key, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("patterncc::sparse_attention_backward", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, key: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout, split = _layout_of(key, q)
    return backward(do.contiguous(), q, k, v, out, lse, layout, scale, split)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, key, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.key, ctx.scale = key, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.patterncc.sparse_attention_backward(dout, q, k, v, out, lse, ctx.key, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------


class DirectLaunches:
    """Launches of generated kernels that skip Triton's JIT dispatch once it has compiled them.

    Triton's ``kernel[grid](*args, **constexprs)`` binds and specialises every argument on
    every launch (about 25 per kernel here), most of a launch's host time. Within one set of
    launch constants (:class:`_Launch`), what a launch is specialised on can only change
    with the arguments' values: the grid, the constexprs and launch options, the ints, and
    each tensor's (or descriptor's base's) dtype and whether it is 16-byte aligned (a
    caller's tensor may start anywhere). Keyed on exactly those, a repeated launch calls the
    compiled kernel the first one returned, with the arguments in the kernel's parameter
    order; anything new goes through the JIT again. Under the interpreter (or when Triton
    returns no compiled kernel) nothing is kept.

    The plan's device tensors and merge counters (``fixed``) are built once per launch
    constants and never change dtype or alignment, so they are left out of the key: keying
    costs ~0.25 us per argument, and they are most of a kernel's ~30 arguments. A repeated
    launch passes tensors as their addresses (POINTER_ARGS): the key has read them anyway,
    and Triton's launcher then skips its per-argument data_ptr() call and driver query.

    Calling a compiled kernel with every parameter in order is how Triton 3.x's launchers
    take them (checked on the GPU with Triton 3.6). Should another version refuse the
    arguments (a TypeError from a kernel's first direct launch, raised before anything is
    launched), the launch goes through the JIT instead and direct launches stop for the
    process, with a warning: the same as ``PATTERNCC_DIRECT_LAUNCH=0``.
    """

    def __init__(self):
        self._runners: dict = {}
        self._untried: set = set()  # keys whose runner has not launched yet

    def launch(self, name: str, kernel, grid: tuple, args: tuple, kwargs: dict,
               fixed: tuple[int, int] = (0, 0), fixed_pointers: tuple | None = None) -> None:
        """``kernel[grid](*args, **kwargs)``, through the compiled kernel when it may.
        ``args[fixed[0]:fixed[1]]`` must be the same kinds of argument (dtype, alignment, int
        value) on every launch of ``name`` through this instance: they are not keyed.
        ``fixed_pointers``: those arguments with each tensor replaced by its address, what a
        direct launch passes (with POINTER_ARGS; the other tensors' addresses it reads)."""
        lo, hi = fixed
        pointers = [] if POINTER_ARGS else None
        spec = _specialised(args[:lo] + args[hi:] if hi else args, pointers)
        key = (name, grid, spec, *kwargs.values())
        runner = self._runners.get(key)
        if runner is not None:
            direct = args if pointers is None else (
                *pointers[:lo], *(args[lo:hi] if fixed_pointers is None else fixed_pointers), *pointers[lo:])
            if self._untried and key in self._untried:
                self._first_direct(key, name, runner, kernel, grid, args, kwargs, direct)
            else:
                runner(*direct)
            return
        compiled = kernel[grid](*args, **kwargs)
        runner = _compiled_runner(kernel, compiled, grid, len(args), kwargs)
        if runner is not None and spec is not None and (not hi or _specialised(args[lo:hi]) is not None):
            self._runners[key] = runner
            self._untried.add(key)

    def _first_direct(self, key, name, runner, kernel, grid, args, kwargs, direct: tuple) -> None:
        """A key's first direct launch, of ``direct`` (``args`` as the runner takes them): on a
        TypeError (the launcher refused them), launch ``args`` through the JIT and turn direct
        launches off (see the class's docstring)."""
        global DIRECT_LAUNCH
        try:
            runner(*direct)
        except TypeError as err:
            DIRECT_LAUNCH = False
            self._runners.clear()
            self._untried.clear()
            import triton
            warnings.warn(f"patterncc: a direct launch of {name} into Triton {triton.__version__}'s compiled kernel "
                          f"failed ({err}); launching through Triton's JIT from now on, as with "
                          "PATTERNCC_DIRECT_LAUNCH=0", RuntimeWarning, stacklevel=2)
            kernel[grid](*args, **kwargs)
            return
        self._untried.discard(key)


_KEYED_BY_VALUE = frozenset((int, bool, str, type(None)))


def _specialised(args: tuple, pointers: list | None = None) -> tuple | None:
    """What a launch of these arguments may be specialised on beyond the launch constants:
    ints by value, tensors by dtype and 16-byte alignment, tensor descriptors by their base's
    dtype, alignment and block shape (floats are not specialised); None for an argument of
    another kind. ``pointers``, if given, gets the arguments with tensors as their addresses.
    (Exact types first: this runs on every launch.)"""
    out = []
    add = out.append
    for a in args:
        kind = type(a)
        if kind is torch.Tensor or (kind not in _KEYED_BY_VALUE and isinstance(a, torch.Tensor)):
            ptr = a.data_ptr()
            add((a.dtype, ptr % 16 == 0))
            if pointers is not None:
                pointers.append(ptr)
            continue
        if kind in _KEYED_BY_VALUE or (kind is not float and isinstance(a, (int, str))):  # bool is an int
            add(a)
        elif kind is float or isinstance(a, float):
            add(float)
        elif isinstance(getattr(a, "base", None), torch.Tensor) and hasattr(a, "block_shape"):
            add((a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape)))
        else:
            return None
        if pointers is not None:
            pointers.append(a)
    return tuple(out)


def _compiled_runner(kernel, compiled, grid: tuple, n_args: int, kwargs: dict):
    """``compiled[grid]`` taking the positional arguments and appending the remaining
    parameters (constexprs from ``kwargs``, else their defaults) in the kernel's order; None
    when there is no compiled kernel to call (the interpreter)."""
    fn = getattr(kernel, "fn", None)  # the Python function a JITFunction wraps
    if fn is None or compiled is None or not hasattr(compiled, "__getitem__") or not hasattr(compiled, "function"):
        return None
    tail = []
    for param in list(inspect.signature(fn).parameters.values())[n_args:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return None
    run = compiled[grid if len(grid) == 3 else (*grid, *(1,) * (3 - len(grid)))]
    return lambda *args: run(*args, *tail)


def launch_for(q: torch.Tensor, k: torch.Tensor, layout: Layout, split: int | None = None,
               configs: dict | None = None) -> "_Launch":
    """The launch constants of a call, built once per (layout, shapes, dtype, device, split)
    and memoised on the layout: a repeated call only looks them up (the host time of a call
    is what a short sequence waits on; bench/RESULTS.md, third session). The key carries the
    lowering switches and the tuning state, so changing either (an A/B run, an autotuner
    result, ``tuning.CONFIGS``) builds new constants. ``configs`` (an explicit override, as
    the autotuner passes) is never cached."""
    if configs:
        return _Launch(q, k, layout, split, configs)
    key = ("triton_launch", q.shape, k.shape[1], q.dtype, q.device, device_name(q), split,
           codegen.interpreting(), codegen.switches(), lowering.switches(), tuning.fingerprint())
    return layout._cached(key, lambda: _Launch(q, k, layout, split))


class _Launch:
    """Constants shared by the launches of one pass: configs, row heights, the kernel plan,
    compile-time flags, and per kernel its tiles and walk arguments (see launch_for)."""

    def __init__(self, q, k, layout: Layout, split, configs: dict | None = None):
        if q.dtype not in DTYPES:
            raise ValueError(f"the triton backend takes float16, bfloat16 or float32, not {q.dtype}")
        self.b, self.h, self.t, self.d = q.shape
        if self.b > 65535:
            raise ValueError(f"batch {self.b} is over the 65535 the kernels' second grid axis allows")
        self.group = self.h // k.shape[1]
        if self.t != layout.seq_len or self.h != layout.num_heads:
            raise ValueError(f"layout is for seq_len={layout.seq_len}, heads={layout.num_heads}; "
                             f"got q of shape {tuple(q.shape)}")
        self.gen = codegen.load(layout.pattern)
        self.lb = layout.block_size
        self.d_pad = lowering.head_pad(self.d)
        self.interp = codegen.interpreting()
        self.name = device_name(q)
        self.tall = {kind: lowering.row_class(layout, self.gen.plan, self.group, kind) for kind in tuning.KINDS}
        self.cfg = {kind: (configs or {}).get(kind) or tuning.config_for(kind, self.d_pad, q.dtype, self.name,
                                                                        self.tall[kind])
                    for kind in tuning.KINDS}
        self.rows = {kind: lowering.row_height(layout, self.gen.plan, self.tall[kind], tuning.owned_rows(kind, c))
                     for kind, c in self.cfg.items()}
        tiles = lowering.Tiles(*(self.rows[kind] // self.lb for kind in ("fwd", "dq", "dkdv")))
        self.plan = lowering.plan_for(layout, self.gen.plan, q.device, self.group, split, tiles,
                                      self.d, q.element_size())
        klay = lowering.kernel_layout(layout, self.gen.plan, self.group)
        self.consts = dict(
            HEAD_DIM=self.d, HEAD_PAD=self.d_pad, LAYOUT_BLOCK=self.lb,
            PERMUTED=lowering.order_mode(klay, max(self.lb, *self.rows.values()), self.d_pad),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=self.interp and q.dtype == torch.bfloat16,
        )
        # The forward's and dQ's CLASS_GAP (dK/dV tests tokens: see kernels/common.py _walked_mask).
        self.class_gap = lowering.class_gap(klay, self.gen.plan)
        self.device = q.device
        # Scratch of a walk without split rows: the kernels never touch it (slot < 0 everywhere).
        self.no_scratch = torch.empty(1, dtype=torch.float32, device=q.device)
        self._tiles = {kind: self._tile_shape(kind) for kind in tuning.KINDS}
        self._args: dict = {}
        self.tma_capable = _tma_capable(q.device, self.interp)
        # residue order through strided boxes: order mode 1 and one residue factor for all heads
        self.residue_dil = (lowering.residue_stride(klay)
                            if lowering.RESIDUE_TMA and self.consts["PERMUTED"] == 1 else None)
        self.residue_seg = int(klay.seg.max())  # class length (padded to the layout block)
        # The dQ walk's kernel positions a head: every one is stored by dQ (or the Delta pass),
        # past T where residue-order classes are padded to whole blocks.
        self.positions = self.plan.dq.rows_per_head * self.plan.dq.row_block
        # LSE and Delta as pairs by kernel position (codegen.PAIRED_STATS, from a padded head dim
        # of PAIRED_STATS_MIN_HEAD_PAD), or Delta and an LSE copy by kernel position (residue
        # order, codegen.POSITION_STATS): asked of the generated module, whose kernels decide it
        # the same way at compile time. stats_len: positions a head; 0 where Delta is by token.
        self.paired_stats = self.gen.module.stats_paired(self.d_pad)
        by_position = self.gen.module.stats_by_position(self.consts["PERMUTED"], self.d_pad)
        self.stats_len = self.positions if by_position else 0
        self.settled: set = set()  # (kind, PATTERNCC_AUTOTUNE) pairs known not to need tuning
        self.direct = DirectLaunches()
        self.warmed: set = set()  # kernels whose other variant warm() has compiled

    def launch(self, name: str, grid: tuple, head: tuple, plan: tuple = (), tail: tuple = (), **kwargs) -> None:
        """Launch the generated kernel ``name`` on ``(*head, *plan tensors, *tail)``, where
        ``plan`` is walk_args' (tensors, addresses) (DIRECT_LAUNCH: see DirectLaunches; the
        plan is not keyed, and a direct launch passes its addresses)."""
        kernel = self.gen.kernel(name)
        if DIRECT_LAUNCH and not self.interp:
            tensors, pointers = plan or ((), ())
            self.direct.launch(name, kernel, grid, (*head, *tensors, *tail), kwargs,
                               (len(head), len(head) + len(tensors)), pointers)
        else:
            kernel[grid](*head, *(plan[0] if plan else ()), *tail, **kwargs)

    def warm(self, name: str, grid: tuple, head: tuple, plan: tuple, tail: tuple, consts: dict, **changes) -> None:
        """Compile ``name`` for a launch's arguments with ``changes`` to its constexprs, without
        launching it (Triton's warmup): a variant another length will launch. Once per kernel
        and launch constants (a repeated call only tests a set); nothing under the
        interpreter, which compiles nothing."""
        if self.interp or name in self.warmed:
            return
        self.warmed.add(name)
        self.gen.kernel(name).warmup(*head, *(plan[0] if plan else ()), *tail, grid=grid, **{**consts, **changes})

    def tiles(self, kind: str) -> tuple[int, int, dict]:
        """(BLOCK_M, BLOCK_N, launch options) of one kernel: the owned axis is at most its
        row (ROW_BLOCK), the walked axis at most one layout block."""
        return self._tiles[kind]

    def _tile_shape(self, kind: str) -> tuple[int, int, dict]:
        c, rows = self.cfg[kind], self.rows[kind]
        cap = {"maxnreg": c.maxnreg} if c.maxnreg else {}
        opts = {} if self.interp else dict(num_warps=c.num_warps, num_stages=c.num_stages, **cap)
        if kind == "dkdv":
            return min(self.lb, c.block_m), min(rows, c.block_n), opts
        return min(rows, c.block_m), min(self.lb, c.block_n), opts

    def scratch(self, walk: lowering.Walk, *widths: int) -> tuple[torch.Tensor, ...]:
        """fp32 partials of split rows, one [slots, B, ROW_BLOCK, width] buffer per width
        (width 1: [slots, B, ROW_BLOCK]), views of one allocation: new per call (two calls in
        flight must not share them); a shared dummy per width where no row is split."""
        slots = walk.items.n_slots
        if slots == 0:
            return (self.no_scratch,) * len(widths)
        lead = (slots, self.b, walk.row_block)
        size = slots * self.b * walk.row_block
        flat = torch.empty(size * sum(widths), dtype=torch.float32, device=self.device)
        out, at = [], 0
        for w in widths:  # (each starts at a multiple of 16 rows of 4 bytes: 16-byte aligned)
            out.append(flat[at:at + size * w].view(*lead, w) if w > 1 else flat[at:at + size].view(lead))
            at += size * w
        return tuple(out)

    def walked(self, kind: str, tensors: tuple, block: int) -> tuple[tuple, bool]:
        """The walked tensors of kernel ``kind`` as TMA descriptors, and True -- when its
        config asks for TMA and the call allows it (rows 16-byte aligned, a Hopper GPU or the
        interpreter; in residue order, see residue_stride); else the tensors themselves, and
        False. Token order: [B * heads, T, D] with [1, block, HEAD_PAD] boxes. Residue order:
        [B * heads, T / d, d, D] with [1, block, 1, HEAD_PAD] boxes, one class per box."""
        if not (self.cfg[kind].tma and self.tma_capable and _tma_aligned(tensors)):
            return tensors, False
        d = 1
        if self.plan.permuted:
            d = self.residue_dil
            if d is None or self.residue_seg % block:
                return tensors, False
        from triton.tools.tensor_descriptor import TensorDescriptor
        out = []
        for x in tensors:
            bh = x.shape[0] * x.shape[1]
            # the base is only a pointer and a dtype to a descriptor: no view of x is needed
            if d == 1:
                out.append(TensorDescriptor(x, [bh, self.t, self.d], [self.t * self.d, self.d, 1],
                                            [1, block, self.d_pad]))
            else:
                out.append(TensorDescriptor(x, [bh, self.t // d, d, self.d], [self.t * self.d, d * self.d, self.d, 1],
                                            [1, block, 1, self.d_pad]))
        return tuple(out), True

    def walk_args(self, walk: lowering.Walk, tiles: int) -> tuple[tuple, tuple]:
        """The work-item and entry arguments of one kernel -- the merge counters of this
        call's stream, then device tensors of the plan (see _plan_args) -- and the same as
        addresses (what a direct launch passes), both built once per counters."""
        counters = walk.counters(self.b, tiles)
        key = (id(walk), id(counters))  # (both live as long as this object: ids stay theirs)
        got = self._args.get(key)
        if got is None:
            tensors = (counters, *self._plan_args(walk))
            got = self._args[key] = (tensors, tuple(x.data_ptr() for x in tensors))
        return got

    def _plan_args(self, walk: lowering.Walk) -> tuple:
        it = walk.items
        common = (it.row, it.start, it.end, it.slot, it.merge, it.merge_start, it.merge_end)
        tables = (self.plan.tables, self.plan.dil, self.plan.seg)
        if walk.head is None:  # forward, dQ: narrow entries of thin columns, then each item's thin rows
            return (*common, it.narrow_start, it.narrow_end, walk.block, walk.flags, walk.narrow_block,
                    walk.narrow_flags, *tables, it.thin)
        # dK/dV: its thin query entries sit in its entry arrays, after the regular ones; then its thin-key items
        return (*common, it.narrow_start, it.narrow_end, walk.block, walk.head, walk.flags, *tables, it.thin)


def _tma_capable(device: torch.device, interp: bool) -> bool:
    """Whether tensor descriptors can be used on ``device`` at all (Triton >= 3.3, and a
    Hopper GPU or the interpreter); checked once per launch constants."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.3)
    except ImportError:
        return False
    return interp or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_aligned(tensors: tuple) -> bool:
    """Whether these [B, H, T, D] tensors' rows and base addresses are 16-byte aligned, as
    tensor descriptors need (checked per call: a caller's tensor may start anywhere)."""
    x = tensors[0]
    return not ((x.shape[-1] * x.element_size()) % 16 or any(t.data_ptr() % 16 for t in tensors))


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Uninitialised buffer the kernels fill completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _tuned_launch(run: _Launch, kinds: tuple, q, k, layout: Layout, split, configs: dict | None,
                  launch) -> _Launch:
    """``run``, or -- on the first call for a (kernel, head dim, dtype, GPU, row class) key
    that should be tuned (tuning.should_autotune) -- a new _Launch with the autotuner's
    choice; ``launch(kind, config)`` runs one kernel with one candidate."""
    tuned = False
    for kind in kinds:
        if configs is None and _should_tune(run, kind, q.dtype):
            tuning.autotune(kind, run.d_pad, q.dtype, run.name, lambda cfg: launch(kind, cfg), tall=run.tall[kind])
            tuned = True
    return launch_for(q, k, layout, split, configs) if tuned else run


def _should_tune(run: _Launch, kind: str, dtype: torch.dtype) -> bool:
    """tuning.should_autotune for this launch's key, remembered on ``run`` once it says no
    outside a graph capture (a repeated call then skips the lookups: host time is what a
    short sequence waits on). What else the answer depends on -- the tuning cache, CONFIGS,
    the TUNED tables -- is in launch_for's key, so a change there builds a new ``run``."""
    settled = (kind, os.environ.get("PATTERNCC_AUTOTUNE", ""))
    if settled in run.settled:
        return False
    if tuning.should_autotune(kind, run.d_pad, dtype, run.name, run.tall[kind]):
        return True
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        run.settled.add(settled)
    return False


def forward(q, k, v, layout: Layout, scale: float, split: int | None = None, configs: dict | None = None):
    """(out, lse) without autograd: lse [B, H, T] fp32 is the base-2 log-sum-exp of the
    scores times scale * log2(e), +inf on rows no key reaches (a building block for custom ops).
    One kernel launch. ``configs`` ({"fwd": KernelConfig}) overrides the launch configuration."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    run = _tuned_launch(launch_for(q, k, layout, split, configs), ("fwd",), q, k, layout, split, configs,
                        lambda kind, cfg: forward(q, k, v, layout, scale, split, {kind: cfg}))
    walk = run.plan.fwd
    out = _empty(q.shape, q)
    lse = _empty((run.b, run.h, run.t), q, torch.float32)
    bm, bn, opts = run.tiles("fwd")
    tiles = walk.row_block // bm
    kv_tiles, tma = run.walked("fwd", (k, v), bn)
    args = ((walk.items.n_items * tiles, run.b), (q, k, v, out, lse, *kv_tiles, *run.scratch(walk, run.d_pad, 1, 1)),
            run.walk_args(walk, tiles), (scale * LOG2E, run.t, walk.rows_per_head, run.b, run.h, run.group))
    consts = dict(ROW_BLOCK=walk.row_block, BLOCK_M=bm, BLOCK_N=bn, NARROW=lowering.NARROW, USE_TMA=tma,
                  FOLD_SCALE=lowering.FOLD_SCALE and scale > 0, THIN_ROWS=walk.items.n_thin > 0,
                  TAIL=walk.has_tail or not (SKIP_TAIL_MASK and walk.has_masked), CLASS_GAP=run.class_gap,
                  PAIR_THIN=pairs_thin_rows(walk, run.d_pad),
                  **run.consts, **opts)
    run.launch("_attn_fwd", *args, **consts)
    if SKIP_TAIL_MASK and walk.has_masked and not configs:  # not for each autotuner candidate
        run.warm("_attn_fwd", *args, consts, TAIL=not consts["TAIL"])  # what a length with(out) a tail launches
    return out, lse


def backward(do, q, k, v, out, lse, layout: Layout, scale: float, split: int | None = None,
             need_q: bool = True, need_kv: bool = True, configs: dict | None = None):
    """(dq, dk, dv) from forward()'s out and lse; dq or dk/dv are None when not needed.
    One launch for dQ (with Delta, see ``DELTA_IN_DQ``), then one for dK/dV."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    args = (do, q, k, v, out, lse, layout, scale, split)
    kinds = ("dkdv",) * need_kv + ("dq",) * need_q
    run = _tuned_launch(launch_for(q, k, layout, split, configs), kinds, q, k, layout, split, configs,
                        lambda kind, cfg: backward(*args, need_q=kind == "dq", need_kv=kind == "dkdv",
                                                   configs={kind: cfg}))
    plan, c = run.plan, run.consts

    stats = run.stats_len
    if run.paired_stats:  # (LSE, Delta) pairs by position, one buffer for both arguments
        delta = lse_pos = _empty((run.b, run.h, stats, 2), lse)
    else:
        delta = _empty((run.b, run.h, stats or run.t), lse)
        lse_pos = _empty(delta.shape, lse) if stats else lse  # (read only by position)
    delta_in_dq = need_q and DELTA_IN_DQ
    if not delta_in_dq:
        bm, _, opts = run.tiles("dq")
        bm = min(bm, 64)  # (a power of two: it divides the dQ walk's rows)
        # every kernel position (by token too: ceil(T / bm) tiles of positions would miss the
        # tokens that residue-order classes padded to whole blocks put past them)
        m_blocks = run.positions // bm
        run.launch("_attn_bwd_preprocess", (run.b * run.h * m_blocks,),
            (out, do, lse, delta, lse_pos, plan.dil, plan.seg, run.t, m_blocks, stats, run.h),
            HEAD_DIM=run.d, HEAD_PAD=run.d_pad, BLOCK_M=bm, PERMUTED=c["PERMUTED"], **opts)

    dk = dv = dq = None
    if need_q:  # first: with delta_in_dq it writes the Delta that dK/dV reads
        dq = _empty(q.shape, q)
        walk = plan.dq
        bm, bn, opts = run.tiles("dq")
        tiles = walk.row_block // bm
        kv_tiles, tma = run.walked("dq", (k, v), bn)
        run.launch("_attn_bwd_dq", (walk.items.n_items * tiles, run.b),
            (q, k, v, do, out, lse, delta, lse_pos, *kv_tiles, dq, *run.scratch(walk, run.d_pad)),
            run.walk_args(walk, tiles),
            (scale * LOG2E, scale, run.t, walk.rows_per_head, run.b, run.h, run.group, stats),
            ROW_BLOCK=walk.row_block, BLOCK_M=bm, BLOCK_N=bn, NARROW=lowering.NARROW, USE_TMA=tma,
            THIN_ROWS=walk.items.n_thin > 0, DELTA_FROM_O=delta_in_dq, CLASS_GAP=run.class_gap, **c, **opts)

    if need_kv:
        dk = _empty(k.shape, k)
        dv = _empty(v.shape, v)
        walk = plan.kv
        bm, bn, opts = run.tiles("dkdv")
        tiles = walk.row_block // bn
        q_tiles, tma = run.walked("dkdv", (q, do), bm)
        kv_args = ((walk.items.n_items * tiles, run.b),
                   (q, k, v, do, lse, delta, lse_pos, *q_tiles, dk, dv, *run.scratch(walk, run.d_pad, run.d_pad)),
                   run.walk_args(walk, tiles))
        consts = dict(ROW_BLOCK=walk.row_block, BLOCK_M=bm, BLOCK_N=bn, NARROW=lowering.NARROW, USE_TMA=tma,
                      THIN_ROWS=walk.n_narrow > 0, THIN_KEYS=walk.items.n_thin > 0,
                      THIN_M=min(run.lb, THIN_KEY_QUERIES), **c, **opts)
        tail = (scale * LOG2E, scale, run.t, walk.rows_per_head, run.b, run.h, run.group, stats)
        run.launch("_attn_bwd_dkdv", *kv_args, tail, **consts)
        if codegen.SEQ_LEN_CLASSES and not configs:  # not for each autotuner candidate
            # what a length of the other class launches (Triton specialises SEQ_LEN by it)
            run.warm("_attn_bwd_dkdv", *kv_args, (*tail[:2], other_length_class(run.t), *tail[3:]), consts)
    return dq, dk, dv


def other_length_class(t: int) -> int:
    """A sequence length Triton specialises the other way from ``t``: a multiple of 16 for
    one that is not, and the other way round (codegen.SEQ_LEN_CLASSES)."""
    return t + 1 if t % 16 == 0 else -(-t // 16) * 16
