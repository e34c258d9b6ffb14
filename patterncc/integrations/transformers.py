"""Hugging Face transformers: run a patterncc pattern as a model's ``attn_implementation``.

``register(name, pattern)`` registers an attention function with transformers'
``AttentionInterface`` (and a matching mask function with ``AttentionMaskInterface``), so
any model that dispatches through the attention interface runs patterncc's block-sparse
attention with ``attn_implementation=name``: Llama, Mistral, Qwen and most decoders from
transformers 4.53 (the mask interface) on; BERT-family encoders from transformers 5 (they
use the interface from that release; 4.x raises ``KeyError: name`` when building them).
Tested with transformers 4.53.3 (decoders) and 5.24. Needs ``pip install patterncc[hf]``.

Example (a randomly initialised Llama-like decoder, no download):
    >>> import torch, transformers
    >>> from patterncc.integrations.transformers import register
    >>> _ = register("patterncc-local", "window(32) & causal | sink(4) & causal", block_size=16)
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="patterncc-local")
    >>> ids = torch.randint(0, 64, (2, 50))
    >>> model(ids, labels=ids).logits.shape
    torch.Size([2, 50, 64])

What the attention function does with transformers' arguments:

* ``query`` [B, H, T, D], ``key``/``value`` [B, H_kv, S, D] (GQA native), ``scaling`` is
  the softmax scale; it returns ``(attn_output [B, T, H, D], None)`` (no attention
  weights: ``output_attentions`` is not supported).
* **Masks.** The registered mask function hands the attention function only the
  *padding* (a [B, 1, 1, S] bool mask, True = attend, or None): the causal / bidirectional
  structure comes from the pattern, not from transformers' 4D mask. Padding is exact,
  by compaction (:func:`patterncc.nn.masked_attention`): each sequence's valid tokens
  must be contiguous (left padding or right padding), and each sequence gets exactly the
  output it would get unpadded. Padded query positions give 0. A custom full 4D mask
  passed by the user raises ``ValueError``; packed sequences (several documents in one
  row, told apart by ``position_ids``) are not separated.
* **Causal decoders.** A module with ``is_causal = True`` (Llama, Mistral, ...) needs a
  causal pattern (every allowed pair has k <= q, e.g. ``window(1024) & causal``); the
  function checks this once per pattern and raises ``ValueError`` otherwise
  (``register(..., check_causal=False)`` turns the check off). Encoders (BERT) take any
  pattern.
* **Generation with a KV cache.** When the query is shorter than the keys (decoding), the
  queries are the last tokens of each sequence; their rows of the pattern are evaluated
  for the current length (the pattern's predicate, [H, T_q, S] per distinct valid
  length), so greedy generation gives the same tokens as a full forward pass.
* **Dropout.** Attention-probability dropout is not available in the block-sparse
  kernels; ``dropout > 0`` (BERT's ``attention_probs_dropout_prob`` in training mode) is
  applied to the attention output instead. Set it to 0 for exact eval-mode behaviour.
* ``softcap``, attention sinks (``s_aux``) and transformers' own ``sliding_window`` are not
  supported and raise ``ValueError``: write the window in the pattern and set
  ``config.sliding_window = None``.
* **Per-layer programs.** A ``.attn`` program with ``layers a..b:`` sections gives layer
  ``module.layer_idx`` its section's pattern.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .. import ir
from ..nn import as_op, masked_attention, padding_spans
from ..op import SparseAttention

__all__ = ["register", "attention_function", "is_causal_pattern"]


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("patterncc.integrations.transformers needs Hugging Face transformers >= 4.53: "
                          "pip install 'patterncc[hf]'") from e
    return transformers, AttentionInterface, AttentionMaskInterface


def register(name: str, pattern, block_size: int | None = 64, *, backend: str = "auto",
             check_causal: bool = True):
    """Register ``pattern`` as transformers attention implementation ``name``.

    ``pattern`` is a pattern expression, ``.attn`` path, IR or compiled
    ``SparseAttention`` (then ``block_size`` must match it or be None). Afterwards
    ``Model.from_config(cfg, attn_implementation=name)`` (or ``from_pretrained``, or
    ``model.set_attn_implementation(name)``) runs patterncc. Registering a name again
    replaces it. Returns the attention function (its ``.op`` is the compiled op).

    >>> from patterncc.integrations.transformers import register
    >>> fn = register("patterncc-longformer", "window(128) | global([0])")
    >>> fn.op.block_size
    64
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") \
            or name.startswith(("flash_attention", "paged")):
        raise ValueError(f"name must be a new attention implementation name (not one of transformers' own), "
                         f"got {name!r}")
    _, attention_interface, mask_interface = _transformers()
    if isinstance(pattern, SparseAttention) and block_size == 64 and pattern.block_size != 64:
        block_size = None
    op = as_op(pattern, block_size, backend)
    fn = attention_function(op, check_causal=check_causal, name=name)
    attention_interface.register(name, fn)
    mask_interface.register(name, padding_mask)
    return fn


def padding_mask(batch_size: int | None = None, q_length: int | None = None, kv_length: int | None = None,
                 q_offset=0, kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                 **kwargs):
    """transformers mask function: the key padding only, as [B, 1, 1, S] bool (True =
    attend), or None when nothing is padded. The pattern supplies the rest.

    >>> m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    >>> padding_mask(2, 4, 4, attention_mask=m)[:, 0, 0].tolist()
    [[True, True, True, False], [True, True, True, True]]
    >>> padding_mask(2, 4, 4, attention_mask=torch.ones(2, 4)) is None
    True
    """
    cache_position = kwargs.get("cache_position")  # transformers < 4.56 passes this instead of q_length / q_offset
    if q_length is None:
        q_length = cache_position.shape[0] if cache_position is not None else kv_length
        q_offset = cache_position[0] if cache_position is not None else 0
    if kv_length is None:
        kv_length = attention_mask.shape[-1] if attention_mask is not None else q_length
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else "cpu")
    if attention_mask is None:
        filled = q_offset + q_length  # a static cache holds unfilled slots past this
        if isinstance(filled, torch.Tensor) or kv_offset + kv_length > filled:
            pos = torch.arange(kv_length, device=device) + kv_offset
            mask = (pos < filled)[None, :].expand(batch_size or 1, kv_length)
            return None if bool(mask.all()) else mask[:, None, None, :]
        return None
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if (extra := kv_offset + kv_length - mask.shape[-1]) > 0:
        mask = torch.nn.functional.pad(mask, (0, extra))  # unfilled static-cache slots: padding
    mask = mask[:, kv_offset:kv_offset + kv_length]
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]


def attention_function(op: SparseAttention, *, check_causal: bool = True, name: str = "patterncc"):
    """The transformers-style attention function of an op (what :func:`register` registers).

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)``
    returns ``(attn_output [B, T, H, D], None)``.
    """

    def patterncc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        for unsupported in ("softcap", "s_aux", "sliding_window"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"attn_implementation={name!r} does not support {unsupported}="
                                 f"{kwargs[unsupported]!r}"
                                 + ("; write the window into the pattern (e.g. 'window(4096) & causal') and set "
                                    "config.sliding_window = None" if unsupported == "sliding_window" else ""))
        layer = getattr(module, "layer_idx", None) if op.num_layers is not None else None
        b, h, tq, d = query.shape
        tk = key.shape[2]
        pattern = op.pattern_for_layer(layer)
        causal_module = bool(getattr(module, "is_causal", False))
        # With fewer queries than keys (decoding) no later key exists; check full passes only.
        if causal_module and check_causal and tq == tk and not is_causal_pattern(pattern, h, op.block_size, tk):
            raise ValueError(
                f"attn_implementation={name!r}: {type(module).__name__} is a causal decoder (is_causal=True), but "
                f"the pattern '{pattern}' lets queries attend later keys; intersect it with causal, e.g. "
                f"'({pattern}) & causal' (or register(..., check_causal=False) to allow it)")
        key_padding = _key_padding(attention_mask, b, tk, name)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        if tq == tk:
            out = masked_attention(op, query, key, value, key_padding, scale, layer=layer)
        elif tq < tk and causal_module:
            out = _decode(op, pattern, query, key, value, key_padding, scale)
        else:
            raise ValueError(f"attn_implementation={name!r} runs self-attention: got {tq} queries and {tk} keys "
                             f"in a non-causal module (cross-attention is not supported)")
        if dropout and getattr(module, "training", False):
            out = torch.nn.functional.dropout(out, float(dropout), True)
        return out.transpose(1, 2).contiguous(), None

    patterncc_attention.op = op
    patterncc_attention.__qualname__ = patterncc_attention.__name__ = f"patterncc_attention[{name}]"
    return patterncc_attention


def _key_padding(mask, batch: int, kv_len: int, name: str) -> torch.Tensor | None:
    """[B, S] bool, True at padding, from what the mask function (or a user) passed."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attn_implementation={name!r} got an attention mask of type {type(mask).__name__}; "
                         f"load the model with this attn_implementation so its mask function is used")
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]
    if mask.dim() != 2 or mask.shape[-1] != kv_len or mask.shape[0] not in (1, batch):
        raise ValueError(f"attn_implementation={name!r} takes a key padding mask ([B, S] or [B, 1, 1, S]); got an "
                         f"attention mask of shape {tuple(mask.shape)}. Custom 4D masks cannot be combined with a "
                         f"patterncc pattern: put the structure into the pattern")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask == 0  # additive mask: 0 attends, a large negative number masks
    else:
        keep = mask != 0  # 1 attends, 0 is padding
    return ~keep.expand(batch, kv_len)


def _decode(op: SparseAttention, pattern: ir.Pattern, q, k, v, key_padding, scale) -> torch.Tensor:
    """Queries shorter than keys (KV-cache decoding): the queries are the last tokens of
    each sequence's valid span; evaluate their rows of the pattern at the valid length."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    group = h // k.shape[1]
    if key_padding is None:
        first, lengths = torch.zeros(b, dtype=torch.long), torch.full((b,), tk, dtype=torch.long)
    else:
        first, lengths = padding_spans(key_padding, tk)
    if bool((lengths < tq).any()):
        raise ValueError("a sequence has fewer valid keys than queries; with a KV cache the query tokens "
                         "must be valid (not padding)")
    out = q.new_zeros(b, h, tq, d)
    first_l, len_l = first.tolist(), lengths.tolist()
    heads = _specialised(pattern, h)
    for length in sorted(set(len_l)):
        rows = [i for i, n in enumerate(len_l) if n == length]
        idx = torch.tensor(rows, device=q.device)
        pos = torch.tensor([first_l[i] for i in rows], device=q.device)[:, None] + \
            torch.arange(length, device=q.device)[None, :]
        ctx = ir.Ctx(length, op.block_size)
        qpos = np.arange(length - tq, length)[:, None]
        kpos = np.arange(length)[None, :]
        allowed = torch.as_tensor(np.stack([p.allowed(ctx, qpos, kpos) for p in heads]), device=q.device)
        kk = k.transpose(1, 2)[idx[:, None], pos].transpose(1, 2).repeat_interleave(group, dim=1)
        vv = v.transpose(1, 2)[idx[:, None], pos].transpose(1, 2).repeat_interleave(group, dim=1)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q[idx].to(compute) @ kk.to(compute).transpose(-1, -2)) * scale  # [n, H, Tq, L]
        s = s.masked_fill(~allowed[None], float("-inf"))
        any_key = allowed.any(-1)[None, :, :, None]
        p = torch.softmax(s.masked_fill(~any_key, 0.0), -1)
        res = torch.where(any_key, p @ vv.to(compute), torch.zeros((), dtype=compute, device=q.device))
        out = out.index_put((idx,), res.to(q.dtype))
    return out


@functools.lru_cache(maxsize=64)
def _specialised(pattern: ir.Pattern, num_heads: int) -> tuple[ir.Pattern, ...]:
    pattern.check_heads(num_heads)
    return tuple(pattern.specialize(h) for h in range(num_heads))


def _symbolically_causal(p: ir.Pattern) -> bool:
    if isinstance(p, (ir.Causal, ir.Empty)):
        return True
    if isinstance(p, ir.Sink):
        return p.n <= 1
    if isinstance(p, ir.Intersect):
        return any(_symbolically_causal(t) for t in p.terms)
    if isinstance(p, ir.Union):
        return all(_symbolically_causal(t) for t in p.terms)
    return False


@functools.lru_cache(maxsize=256)
def is_causal_pattern(pattern: ir.Pattern, num_heads: int, block_size: int = 64, seq_len: int = 4096) -> bool:
    """Whether every head of ``pattern`` only allows pairs with k <= q.

    Decided from the IR when it is written that way (``... & causal``, a union of such
    terms); otherwise from the layout at ``seq_len`` (no key block after the query block,
    and nothing above the diagonal inside diagonal blocks).

    >>> import patterncc
    >>> is_causal_pattern(patterncc.parse("window(8) & causal | sink(4) & causal"), 4)
    True
    >>> is_causal_pattern(patterncc.parse("window(8)"), 4)
    False
    """
    heads = _specialised(pattern, num_heads)
    if all(_symbolically_causal(p) for p in heads):
        return True
    from ..layout import get_layout, partial_block_masks
    lay = get_layout(pattern, seq_len, num_heads, block_size)
    if (lay.kblock > lay.entry_qblock).any():
        return False
    for group in lay.head_groups():
        hh = group[0]
        s, e = lay.indptr[hh * lay.nblocks], lay.indptr[(hh + 1) * lay.nblocks]
        qb, kb, full = lay.entry_qblock[s:e], lay.kblock[s:e], lay.full[s:e]
        diag = qb == kb
        if (diag & full & (np.minimum((qb + 1) * block_size, seq_len) - qb * block_size > 1)).any():
            return False
        sel = np.flatnonzero(diag & ~full)
        masks = partial_block_masks(lay.heads[hh], lay.ctx, qb[sel], kb[sel])
        if (masks & np.triu(np.ones((block_size, block_size), bool), 1)[None]).any():
            return False
    return True
