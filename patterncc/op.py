"""The runtime op: a compiled pattern program behind one callable attention op.

Example:
    >>> import torch, patterncc
    >>> op = patterncc.compile("window(8) & causal", block_size=16)
    >>> q = torch.randn(2, 4, 50, 32, requires_grad=True)
    >>> k = v = torch.randn(2, 2, 50, 32)          # GQA: 4 query heads share 2 kv heads
    >>> out = op(q, k, v)
    >>> out.sum().backward(); q.grad.shape
    torch.Size([2, 4, 50, 32])
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from pathlib import Path

import torch

from . import ir
from .layout import MAX_SEQ_LEN, Layout, check_block_size, get_layout
from .parser import load, parse_program

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_BLOCK = 64
# What the generated Triton kernels support (the PyTorch path has no such limits): head
# dims are padded to a power of two, and D = 256 already takes ~130 KB of shared memory in
# the backward kernels on an H100; the batch is the second grid axis (65535 at most); the
# first grid axis (work items x row tiles, at least B * H * ceil(T / 16) programs counting
# the backward's row-tile pass) must stay below 2**31.
TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_BATCH = 65535
TRITON_MAX_GRID = 2 ** 31 - 1


class SparseAttention:
    """A compiled pattern program: call it like attention, ask it for layouts and masks.

    ``op(q, k, v, scale=None, layer=None)`` with q [B, H, T, D] and k, v [B, H_kv, T, D]
    (H divisible by H_kv) returns [B, H, T, D]. For a per-layer program pass ``layer=``.
    Query rows that no key reaches give zeros. Autograd works on every backend.

    >>> import torch, patterncc
    >>> op = patterncc.compile("layers 0..2: window(4)\\nlayers 2..4: window(8)", block_size=16)
    >>> x = torch.randn(1, 2, 40, 8)
    >>> op(x, x, x, layer=3).shape, op.num_layers
    (torch.Size([1, 2, 40, 8]), 4)
    """

    def __init__(self, program: ir.Program, block_size: int | None = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.program = program
        self.block_size = check_block_size(
            block_size if block_size is not None else program.block_size or DEFAULT_BLOCK)
        self.backend = backend
        # The custom-op keys, made now: under torch.compile no host code may run to make them.
        from .backends.triton_backend import op_key
        self._keys = {s.pattern: op_key(s.pattern, self.block_size) for s in program.sections}

    # -- structure
    @property
    def pattern(self) -> ir.Pattern:
        """The pattern (for a per-layer program: raises, use ``pattern_for_layer``)."""
        pats = {s.pattern for s in self.program.sections}
        if len(pats) > 1:
            raise ValueError("this program has different patterns per layer; "
                             "use op.pattern_for_layer(i) or op.layer(i)")
        return self.program.sections[0].pattern

    def pattern_for_layer(self, layer: int | None) -> ir.Pattern:
        if layer is None:
            return self.pattern
        return self.program.pattern_for_layer(layer)

    def layer(self, layer: int) -> "SparseAttention":
        """The single-pattern op of one layer of a per-layer program."""
        single = ir.Program((ir.Section(0, -1, self.program.pattern_for_layer(layer)),),
                            self.block_size, self.program.heads, False, self.program.source)
        return SparseAttention(single, self.block_size, self.backend)

    @property
    def num_layers(self) -> int | None:
        return self.program.num_layers

    def __repr__(self) -> str:
        src = str(self.program).replace("\n", "; ")
        return f"SparseAttention({src!r}, block_size={self.block_size}, backend={self.backend!r})"

    # -- layouts
    def layout(self, seq_len: int, num_heads: int | None = None, *, layer: int | None = None) -> Layout:
        """The (cached) block-sparse layout for a sequence length and head count."""
        heads = self._heads(num_heads)
        return get_layout(self.pattern_for_layer(layer), seq_len, heads, self.block_size)

    def mask(self, seq_len: int, num_heads: int | None = None, *, layer: int | None = None) -> torch.Tensor:
        """[H, T, T] bool token mask (small T only: for tests and pictures)."""
        return torch.from_numpy(self.layout(seq_len, num_heads, layer=layer).mask())

    def diagnose(self, seq_len: int, layers: int | None = None, num_heads: int | None = None, **kw):
        """Receptive-field / reachability report (see :mod:`patterncc.analysis`)."""
        from .analysis import diagnose
        return diagnose(self.program, seq_len, num_heads=self._heads(num_heads), layers=layers,
                        block_size=self.block_size, **kw)

    def kernel_source(self, layer: int | None = None) -> str:
        """The generated Triton source for this op's pattern."""
        from .backends import triton_backend
        return triton_backend.generated_source(self.pattern_for_layer(layer))

    def block_mask(self, seq_len: int, num_heads: int | None = None, *, layer: int | None = None, device=None):
        """The equivalent FlexAttention ``BlockMask``: FULL blocks as Flex full blocks, PARTIAL
        blocks with this pattern's ``mask_mod`` (see :mod:`patterncc.interop`).

        >>> import patterncc
        >>> op = patterncc.compile("window(16) & causal", block_size=16)
        >>> op.block_mask(64, 1).to_dense()[0, 0].tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
        """
        from .interop import block_mask
        return block_mask(self, seq_len, num_heads, layer=layer, device=device)

    def mask_mod(self, seq_len: int, num_heads: int | None = None, *, layer: int | None = None, device=None):
        """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (see :mod:`patterncc.interop`)."""
        from .interop import mask_mod
        return mask_mod(self.pattern_for_layer(layer), seq_len, self._heads(num_heads), self.block_size,
                        device=device)

    def _heads(self, num_heads: int | None) -> int:
        if num_heads is None:
            if self.program.heads is None:
                raise ValueError("num_heads is needed: the pattern source sets no 'heads = N' option")
            return self.program.heads
        if self.program.heads is not None and num_heads != self.program.heads:
            raise ValueError(f"the pattern source says heads = {self.program.heads}, "
                             f"but {num_heads} heads were given")
        return num_heads

    # -- the op
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 *, layer: int | None = None) -> torch.Tensor:
        backend = self._backend_for(q) if isinstance(q, torch.Tensor) else "torch"
        _validate(q, k, v, scale, backend)
        b, h, t, d = q.shape
        heads = self._heads(h)
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        if b == 0 or t == 0:
            return torch.zeros_like(q) + 0 * (q.sum() + k.sum() + v.sum())  # grads (zero) for all three
        pattern = self.pattern_for_layer(layer)
        if backend == "triton":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            if torch.compiler.is_compiling():
                # One opaque custom op for torch.compile: the layout is built, and cached,
                # inside it, so no host code is traced.
                key = self._keys[pattern]
                return torch.ops.patterncc.sparse_attention(q, k, v, key, float(scale))[0]
            from .backends import triton_backend
            return triton_backend.attention(q, k, v, get_layout(pattern, t, heads, self.block_size), float(scale))
        if torch.compiler.is_compiling():  # host-side plan: run it eagerly (a graph break)
            return torch.compiler.disable(self._torch_path)(q, k, v, pattern, heads, float(scale))
        return self._torch_path(q, k, v, pattern, heads, float(scale))

    def _torch_path(self, q, k, v, pattern: ir.Pattern, heads: int, scale: float) -> torch.Tensor:
        from .backends import torch_backend
        return torch_backend.attention(q, k, v, get_layout(pattern, q.shape[2], heads, self.block_size), scale)



    def _backend_for(self, q: torch.Tensor) -> str:
        if self.backend == "torch":
            return "torch"
        can_triton = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        if self.backend == "triton":
            if not can_triton:
                raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                                 "CPU interpreter); got tensors on " + str(q.device))
            if q.dtype == torch.float64:
                raise ValueError("the triton backend takes float16, bfloat16 or float32, not float64")
            return "triton"
        return "triton" if q.is_cuda and q.dtype != torch.float64 and _triton_available() else "torch"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _validate(q, k, v, scale, backend: str = "torch") -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k and v have {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sequence lengths differ: q has {q.shape[2]}, k and v have {k.shape[2]} "
                         f"(self-attention needs the same length)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q has {q.shape[3]}, k and v have {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads are not a multiple of k/v's {k.shape[1]} heads (GQA/MQA "
                         f"needs H divisible by H_kv)")
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                                  and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    b, h, t, d = q.shape
    if h == 0:
        raise ValueError(f"q has 0 heads (shape {tuple(q.shape)}); [batch, heads, seq_len, head_dim] needs heads >= 1")
    if d == 0:
        raise ValueError(f"head_dim is 0 (q of shape {tuple(q.shape)}); it must be at least 1")
    if t > MAX_SEQ_LEN:
        raise ValueError(f"seq_len={t} is over the supported maximum {MAX_SEQ_LEN} (2**31 - 1)")
    if q.device.type == "meta":
        raise ValueError("q, k, v are meta tensors; the op needs real data (CPU or CUDA)")
    if backend == "triton":
        if d > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"head_dim={d} is over the triton backend's maximum {TRITON_MAX_HEAD_DIM}; "
                             f"use backend='torch' or a smaller head dim")
        if b > TRITON_MAX_BATCH:
            raise ValueError(f"batch {b} is over the triton backend's maximum {TRITON_MAX_BATCH} "
                             f"(the kernels' second grid axis); split the batch")
        if b * h * -(-t // 16) > TRITON_MAX_GRID:
            raise ValueError(f"batch x heads x ceil(seq_len / 16) = {b * h * -(-t // 16)} is over the "
                             f"triton backend's maximum grid of {TRITON_MAX_GRID} programs; split the "
                             f"batch or the heads")


def compile(source: str | os.PathLike | ir.Pattern | ir.Program, block_size: int | None = None,
            backend: str = "auto") -> SparseAttention:
    """Compile a pattern (expression, ``.attn`` source or path, or IR) into an attention op.

    ``block_size`` overrides the source's ``block_size =`` option (default 64);
    ``backend`` is ``"auto"`` (Triton on CUDA tensors, PyTorch otherwise), ``"torch"``
    or ``"triton"``.

    >>> import torch, patterncc
    >>> op = patterncc.compile("window(256) | global([0])")
    >>> x = torch.randn(1, 2, 300, 16)
    >>> op(x, x, x).shape
    torch.Size([1, 2, 300, 16])
    """
    program = _as_program(source)
    return SparseAttention(program, block_size, backend)


def _as_program(source) -> ir.Program:
    if isinstance(source, ir.Program):
        return source
    if isinstance(source, ir.Pattern):
        return ir.Program((ir.Section(0, -1, source),))
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(".attn")
                                            and "\n" not in source and "(" not in source):
        return load(Path(source))
    return parse_program(source)
