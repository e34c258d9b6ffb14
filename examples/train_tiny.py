"""Train a tiny causal language model whose attention is a patterncc op, on the CPU.

The data is synthetic (no downloads): sequences that repeat a random motif, so a model
that attends back over its window can predict the next token. The loss should fall
within a few dozen steps.

    python examples/train_tiny.py --steps 60
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import patterncc


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: patterncc.SparseAttention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, pattern: str, block_size: int):
        super().__init__()
        op = patterncc.compile(pattern, block_size=block_size)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(4096, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, op) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def batch(n: int, t: int, vocab: int, period: int, gen: torch.Generator) -> torch.Tensor:
    motif = torch.randint(0, vocab, (n, period), generator=gen)
    return motif.repeat(1, -(-t // period))[:, :t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default="(sink(4) | window(48)) & causal")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab, period = 16, 8
    model = TinyLM(vocab, dim=64, heads=4, layers=2, pattern=args.pattern, block_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        x = batch(8, args.seq_len + 1, vocab, period, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"pattern {args.pattern!r}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
