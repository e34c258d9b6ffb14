"""``torch.nn`` building blocks on top of the patterncc attention op.

* :class:`SparseSelfAttention` -- a drop-in self-attention layer (q/k/v/out projections,
  GQA/MQA, batch-first tensors, key padding mask) whose attention is a patterncc pattern.
* :func:`masked_attention` -- the functional form: ``op(q, k, v)`` plus a key padding mask.

Key padding, exactly and without a T x T tensor
-----------------------------------------------
The op has no per-batch mask, so padding is handled by *compaction*: the valid tokens of
each sequence must form one contiguous span (right padding, the Hugging Face convention
for encoders and training; left padding, the convention for batched generation; or both).
Rows are grouped by their valid length ``L`` and each group runs through the op as a batch
of sequences of length ``L`` (the op accepts any length), gathered from and scattered back
into the padded tensor. The output of every sequence is therefore *exactly* the output of
that sequence run alone, unpadded: pattern positions count from the first valid token, so
position-dependent terms (``global([-1])``, ``random``, ``block``) see the real sequence,
not the padded one. Padded query positions get zeros (before the output projection).
Masks with holes inside a sequence raise ``ValueError``: such masks are not padding, and
the pattern would be ambiguous about the positions of the remaining tokens.

Cost: one op call per distinct valid length in the batch (one call without padding), one
host synchronisation to read the lengths; no T x T tensor anywhere.

Dropout
-------
The block-sparse kernels have no dropout on attention probabilities. ``dropout=p`` is
applied to the attention output (per head, before the output projection) in training
mode instead; ``dropout=0`` (the default) makes the layer deterministic.

Example:
    >>> import torch
    >>> from patterncc.nn import SparseSelfAttention
    >>> attn = SparseSelfAttention(64, num_heads=4, pattern="window(16) | global([0])",
    ...                            num_kv_heads=2, block_size=16)
    >>> x = torch.randn(2, 50, 64)
    >>> pad = torch.zeros(2, 50, dtype=torch.bool); pad[1, 40:] = True   # row 1: 40 tokens
    >>> y = attn(x, key_padding_mask=pad)
    >>> y.shape
    torch.Size([2, 50, 64])
    >>> torch.allclose(y[1, :40], attn(x[1:, :40])[0], atol=1e-5)      # same as unpadded
    True
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import ir
from .op import SparseAttention, compile as _compile

__all__ = ["SparseSelfAttention", "masked_attention", "padding_spans", "as_op"]


def as_op(pattern, block_size: int | None = None, backend: str = "auto") -> SparseAttention:
    """A :class:`SparseAttention` from a pattern source, IR, ``.attn`` path or op.

    An op is returned as is (``block_size`` must then agree with it, or be None).

    >>> as_op("window(8) & causal", block_size=16).block_size
    16
    """
    if isinstance(pattern, SparseAttention):
        if block_size is not None and block_size != pattern.block_size:
            raise ValueError(f"block_size={block_size} disagrees with the given op's block_size="
                             f"{pattern.block_size}; pass block_size=None to keep the op's")
        return pattern
    if not isinstance(pattern, (str, os.PathLike, ir.Pattern, ir.Program)):
        raise ValueError(f"pattern must be a pattern source string, a .attn path, a patterncc Pattern/"
                         f"Program or a SparseAttention op, got {type(pattern).__name__}")
    return _compile(pattern, block_size=block_size, backend=backend)


def padding_spans(key_padding_mask: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first valid position, valid length) of every row of a key padding mask.

    ``key_padding_mask`` is [B, T] bool, True at padding (``nn.MultiheadAttention``'s
    convention). Raises ``ValueError`` unless each row's valid tokens are contiguous.

    >>> m = torch.tensor([[False, False, True], [True, False, False]])
    >>> padding_spans(m)
    (tensor([0, 1]), tensor([2, 2]))
    """
    if not isinstance(key_padding_mask, torch.Tensor):
        raise ValueError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got dtype "
                         f"{key_padding_mask.dtype}; additive float masks are not supported")
    if key_padding_mask.dim() != 2 or (seq_len is not None and key_padding_mask.shape[1] != seq_len):
        want = "[batch, seq_len]" if seq_len is None else f"[batch, {seq_len}]"
        raise ValueError(f"key_padding_mask must have shape {want}, got {tuple(key_padding_mask.shape)}")
    valid = ~key_padding_mask
    t = valid.shape[1]
    lengths = valid.sum(1)
    first = torch.where(lengths > 0, valid.int().argmax(1), torch.zeros_like(lengths))
    pos = torch.arange(t, device=valid.device)
    span = (pos >= first[:, None]) & (pos < (first + lengths)[:, None])
    bad = (span != valid).any(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"key_padding_mask rows {rows[:8]}{'...' if len(rows) > 8 else ''} have padding between valid "
            f"tokens; patterncc supports padding at the start and/or the end of each sequence (the valid "
            f"tokens of a row must be contiguous)")
    return first, lengths


def masked_attention(op: SparseAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                     *, layer: int | None = None) -> torch.Tensor:
    """``op(q, k, v)`` with a key padding mask, exact, without a T x T tensor.

    q [B, H, T, D], k and v [B, H_kv, T, D], ``key_padding_mask`` [B, T] bool (True = pad)
    or None. Every row gives exactly what the op gives for that row's valid span run
    alone; padded query positions give 0. See the module docstring for the method.

    >>> import torch, patterncc
    >>> op = patterncc.compile("window(4) & causal", block_size=16)
    >>> q = k = v = torch.randn(2, 2, 20, 8)
    >>> pad = torch.zeros(2, 20, dtype=torch.bool); pad[0, :5] = True     # left padding
    >>> out = masked_attention(op, q, k, v, pad)
    >>> torch.allclose(out[0, :, 5:], op(q[:1, :, 5:], k[:1, :, 5:], v[:1, :, 5:])[0], atol=1e-6)
    True
    """
    if key_padding_mask is None:
        return op(q, k, v, scale, layer=layer)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(q.shape)}")
    b, _, t, _ = q.shape
    if key_padding_mask.dim() == 2 and key_padding_mask.shape[0] != b:
        raise ValueError(f"key_padding_mask has batch size {key_padding_mask.shape[0]}, q has {b}")
    first, lengths = padding_spans(key_padding_mask.to(q.device), t)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if bool((lengths == t).all()):
        return op(q, k, v, scale, layer=layer)
    first_l, len_l = first.tolist(), lengths.tolist()
    # [B, T, H, D] views: a gather over (row, position) keeps heads and features together.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = q.new_zeros(qt.shape)
    for length in sorted(set(len_l)):
        if length == 0:
            continue
        rows = torch.tensor([i for i, n in enumerate(len_l) if n == length], device=q.device)
        pos = torch.tensor([first_l[i] for i in rows.tolist()], device=q.device)[:, None] + \
            torch.arange(length, device=q.device)[None, :]
        idx = (rows[:, None], pos)
        res = op(qt[idx].transpose(1, 2), kt[idx].transpose(1, 2), vt[idx].transpose(1, 2), scale, layer=layer)
        out = out.index_put(idx, res.transpose(1, 2))
    return out.transpose(1, 2)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention whose attention pattern is a patterncc pattern.

    Args:
        embed_dim: model width E (input and output features).
        num_heads: query heads H; ``embed_dim`` must be divisible by it.
        pattern: a pattern expression (``"window(256) | global([0])"``), a ``.attn`` path,
            a patterncc ``Pattern``/``Program``, or a compiled ``SparseAttention``.
        num_kv_heads: key/value heads (GQA; 1 = MQA). Default: ``num_heads``.
        dropout: dropout probability on the attention output in training mode (the
            kernels have no attention-probability dropout; see the module docstring).
        bias: whether the four projections have biases.
        block_size: layout block size (power of two, 16..256). Default: the source's
            ``block_size =`` option, else 64.
        backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise),
            ``"torch"`` or ``"triton"``.
        layer: for a per-layer ``.attn`` program, which layer's pattern this module uses.
        device, dtype: for the projection parameters.

    ``forward(x, key_padding_mask=None)``: x [B, T, E] (batch first), ``key_padding_mask``
    [B, T] bool with True at padding (left and/or right padding), returns [B, T, E]. The
    same code runs on CPU (block-sparse PyTorch path) and GPU (generated Triton kernels).

    Example:
        >>> import torch
        >>> attn = SparseSelfAttention(32, 4, "window(8) & causal", block_size=16)
        >>> attn(torch.randn(3, 40, 32)).shape
        torch.Size([3, 40, 32])
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern, num_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True, block_size: int | None = None, *,
                 backend: str = "auto", layer: int | None = None, device=None, dtype=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}, got {num_kv_heads!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        op = as_op(pattern, block_size, backend)
        if layer is not None:
            op = op.layer(layer)
        try:
            pat = op.pattern
        except ValueError:
            raise ValueError("this pattern program has different patterns per layer; pass layer=i to "
                             "pick the layer this module implements") from None
        if op.program.heads is not None and op.program.heads != num_heads:
            raise ValueError(f"the pattern source says heads = {op.program.heads}, but num_heads={num_heads}")
        pat.check_heads(num_heads)
        self.op = op
        kw = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    @property
    def pattern(self) -> ir.Pattern:
        """The pattern IR this layer attends with."""
        return self.op.pattern

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [batch, seq_len, {self.embed_dim}] (batch first), got {shape}")
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        y = masked_attention(self.op, q, k, v, key_padding_mask)
        y = nn.functional.dropout(y, self.dropout, self.training)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"pattern={str(self.op.pattern)!r}, block_size={self.op.block_size}, dropout={self.dropout}")
