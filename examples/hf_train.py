"""Train Hugging Face transformers models whose attention is a patterncc pattern, on the CPU.

Two small randomly initialised models are built from configs (nothing is downloaded):

* a BERT-like encoder with Longformer-style attention, ``window(16) | global([0])``,
  trained with masked-language modelling on right-padded batches;
* a Llama-like decoder (grouped-query attention) with a causal local pattern,
  ``window(32) & causal | sink(4) & causal``, trained as a causal language model.

The data is synthetic. Decoder: each sequence repeats a random 8-token motif, so the next
token is the one 8 positions back; with the default 100 steps its loss falls from about
4.2 to under 1 (the model learns to copy through the sparse pattern). Encoder: each
sequence draws its tokens from its own random set of 4 of 16 ids, so a masked token is
predictable from the tokens its window sees; the MLM loss falls from about 4.2 to about
2.7 in 100 steps (ln 16 = 2.77 is what token frequencies alone give; BERT's post-norm
layers at this size need more steps to go on towards ln 4 = 1.4). About 15 s on two CPU cores. Needs ``pip install patterncc[hf]``.

    python examples/hf_train.py --steps 100
"""
from __future__ import annotations

import argparse
import time

import torch

import transformers
from patterncc.integrations.transformers import register

VOCAB, PAD, MASK, FIRST = 64, 0, 1, 4  # ids 0..3 are special
MOTIF_TOKENS = 16  # motifs draw from ids FIRST..FIRST+15
PERIOD = 8


def motif_batch(batch: int, seq_len: int, gen: torch.Generator, min_len: int | None = None):
    """Token ids [batch, seq_len] repeating a random motif, right-padded to random lengths."""
    motif = torch.randint(FIRST, FIRST + MOTIF_TOKENS, (batch, PERIOD), generator=gen)
    ids = motif.repeat(1, -(-seq_len // PERIOD))[:, :seq_len].clone()
    lengths = torch.randint(min_len or seq_len // 2, seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len  # one full row per batch
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


def bag_batch(batch: int, seq_len: int, gen: torch.Generator):
    """Token ids [batch, seq_len], each sequence drawn from its own random set of 4 of the
    MOTIF_TOKENS ids (a masked token is predictable from its neighbours), right-padded to
    random lengths."""
    sets = torch.stack([torch.randperm(MOTIF_TOKENS, generator=gen)[:4] + FIRST for _ in range(batch)])
    ids = torch.gather(sets, 1, torch.randint(0, 4, (batch, seq_len), generator=gen))
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


def encoder(attn: str, seed: int = 0) -> transformers.BertForMaskedLM:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=512, pad_token_id=PAD,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM._from_config(cfg, attn_implementation=attn)


def decoder(attn: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=PAD, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def train_encoder(steps: int = 100, seq_len: int = 96, batch: int = 8, lr: float = 3e-3,
                  pattern: str = "window(16) | global([0])", log=print) -> list[float]:
    """Masked-language-model training of the BERT-like encoder; returns the losses."""
    register("patterncc-longformer", pattern, block_size=16)
    model = encoder("patterncc-longformer")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        ids, attention_mask = bag_batch(batch, seq_len, gen)
        masked = (torch.rand(ids.shape, generator=gen) < 0.15) & (attention_mask == 1)
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        inputs = torch.where(masked, torch.full_like(ids, MASK), ids)
        loss = model(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"  encoder step {step:3d}  mlm loss {loss.item():.3f}")
    return losses


def train_decoder(steps: int = 100, seq_len: int = 96, batch: int = 8, lr: float = 1e-2,
                  pattern: str = "window(32) & causal | sink(4) & causal", log=print) -> list[float]:
    """Causal-LM training of the Llama-like decoder; returns the losses."""
    register("patterncc-local-causal", pattern, block_size=16)
    model = decoder("patterncc-local-causal")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        ids, attention_mask = motif_batch(batch, seq_len, gen)
        labels = torch.where(attention_mask == 1, ids, torch.full_like(ids, -100))
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"  decoder step {step:3d}  lm loss {loss.item():.3f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per model (default 100)")
    ap.add_argument("--seq-len", type=int, default=96, help="sequence length (default 96)")
    args = ap.parse_args(argv)
    for name, train in (("BERT-like encoder, window(16) | global([0])", train_encoder),
                        ("Llama-like decoder, window(32) & causal | sink(4) & causal", train_decoder)):
        print(name)
        if train is train_encoder and int(transformers.__version__.split(".")[0]) < 5:
            print(f"  skipped: BERT uses transformers' attention interface from transformers 5 "
                  f"(installed: {transformers.__version__})")
            continue
        t0 = time.perf_counter()
        losses = train(steps=args.steps, seq_len=args.seq_len)
        k = max(1, len(losses) // 5)
        print(f"  loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} "
              f"(mean of first/last {k} steps, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
