"""The float64 dense reference attention every backend is checked against."""
from __future__ import annotations

import numpy as np
import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None = None) -> torch.Tensor:
    """Dense attention in float64 with an explicit token mask.

    q [B, H, T, D]; k, v [B, H_kv, T, D]; mask [H, T, T] bool (numpy or torch), True where
    query t may attend key s. Rows with no allowed key give 0 (not NaN). Differentiable.
    """
    q, k, v = q.double(), k.double(), v.double()
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    any_key = mask.any(-1)[None, :, :, None]
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1)
    return torch.where(any_key, p @ v, torch.zeros((), dtype=q.dtype, device=q.device))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    nb = b.norm().item()
    d = (a - b).norm().item()
    return d if nb == 0 else d / nb


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, rows, scale: float | None = None) -> torch.Tensor:
    """Float64 reference output of selected query rows only: [B, H, len(rows), D].

    For long sequences where a dense [T, T] reference does not fit: the allowed keys of
    each selected row come from each head's predicate, evaluated for those rows only.
    """
    b, h, t, d = q.shape
    group = h // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    rows = np.asarray(rows)
    keys = np.arange(t)
    out = torch.zeros(b, h, rows.size, d, dtype=torch.float64, device=q.device)
    for head in range(h):
        allowed = layout.heads[head].allowed(layout.ctx, rows[:, None], keys[None, :])
        m = torch.as_tensor(allowed, device=q.device)
        s = (q[:, head, rows].double() @ k[:, head // group].double().transpose(-1, -2)) * scale
        s = s.masked_fill(~m[None], float("-inf"))
        any_key = m.any(-1)[None, :, None]
        p = torch.softmax(s.masked_fill(~any_key, 0.0), -1)
        out[:, head] = torch.where(any_key, p @ v[:, head // group].double(), torch.zeros((), dtype=torch.float64, device=q.device))
    return out
