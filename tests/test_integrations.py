"""Hugging Face transformers integration: registered patterns run inside BERT and Llama models.

Skipped without transformers (``pip install patterncc[hf]``). Models are tiny and randomly
initialised from configs; nothing is downloaded.
"""
from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import patterncc  # noqa: E402
import patterncc.integrations.transformers as hf  # noqa: E402
from patterncc.integrations.transformers import attention_function, is_causal_pattern, register  # noqa: E402
from reference import reference_attention  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_train.py"
# BERT dispatches through transformers' AttentionInterface from transformers 5 on (Llama from 4.48)
needs_bert_interface = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                          reason="BERT uses the attention interface from transformers 5")


def load_example():
    spec = importlib.util.spec_from_file_location("hf_train_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ex():
    return load_example()


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def twins(make, attn_a: str, attn_b: str):
    """Two copies of a model with the same weights and different attention implementations."""
    a = make(attn_a).eval()
    b = make(attn_b).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def padded_batch(ex, lengths, seq_len, left=False):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, ex.VOCAB, (len(lengths), seq_len), generator=gen)
    pos = torch.arange(seq_len)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= seq_len - n) if left else (pos < n)
    ids[~mask] = ex.PAD
    return ids, mask.long()


@needs_bert_interface
def test_bert_dense_pattern_equals_eager_with_padding(ex):
    register("pcc-test-dense", "dense", block_size=16)
    ours, ref = twins(lambda a: ex.encoder(a).bert, "pcc-test-dense", "eager")
    ids, mask = padded_batch(ex, [40, 27, 33], 40)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_llama_causal_pattern_equals_sdpa_with_padding(ex, left):
    register("pcc-test-causal", "causal", block_size=16)
    ours, ref = twins(ex.decoder, "pcc-test-causal", "sdpa")
    ids, mask = padded_batch(ex, [36, 20, 29], 36, left=left)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count valid tokens, as generate() does
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)


def test_generation_with_cache_matches_sdpa_and_recompute(ex):
    register("pcc-test-causal", "causal", block_size=16)
    ours, ref = twins(ex.decoder, "pcc-test-causal", "sdpa")
    ids, mask = padded_batch(ex, [12, 7], 12, left=True)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=ex.PAD)
    with torch.no_grad():
        a = ours.generate(input_ids=ids, attention_mask=mask, **kw)
        b = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b)
    # a sparse pattern: decoding with the cache gives what full recomputation gives
    register("pcc-test-window", "window(3) & causal | sink(1) & causal", block_size=16)
    sparse = ex.decoder("pcc-test-window").eval()
    with torch.no_grad():
        cached = sparse.generate(input_ids=ids, attention_mask=mask, **kw)
        full = sparse.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, full)


class FakeModule(torch.nn.Module):
    def __init__(self, is_causal=False, layer_idx=0):
        super().__init__()
        self.is_causal, self.layer_idx = is_causal, layer_idx


@pytest.mark.parametrize("pattern,causal", [("window(5) | global([0]) | random(16, seed=1)", False),
                                            ("window(7) & causal | sink(2) & causal", True)])
def test_attention_function_matches_reference(pattern, causal):
    torch.manual_seed(0)
    op = patterncc.compile(pattern, block_size=16)
    fn = attention_function(op)
    q = torch.randn(2, 4, 30, 8, dtype=torch.float64)
    k, v = torch.randn(2, 4, 30, 8, dtype=torch.float64).chunk(2, dim=1)
    out, weights = fn(FakeModule(causal), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 30, 4, 8)
    want = reference_attention(q, k, v, op.mask(30, 4), scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-10, rtol=1e-10)
    # a [B, 1, 1, S] padding mask (True = attend), as the registered mask function passes it
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[1, 22:] = False
    out, _ = fn(FakeModule(causal), q, k, v, pad[:, None, None, :], scaling=0.3)
    torch.testing.assert_close(out[1, :22], fn(FakeModule(causal), q[1:, :, :22], k[1:, :, :22],
                                                v[1:, :, :22], None, scaling=0.3)[0][0])
    assert out[1, 22:].abs().max() == 0


def test_per_layer_program_uses_layer_idx():
    op = patterncc.compile("layers 0..1: window(2)\nlayers 1..2: window(9)", block_size=16)
    fn = attention_function(op)
    q = k = v = torch.randn(1, 2, 20, 8, dtype=torch.float64)
    for layer in (0, 1):
        out, _ = fn(FakeModule(layer_idx=layer), q, k, v, None)
        torch.testing.assert_close(out, op.layer(layer)(q, k, v).transpose(1, 2))


def test_decoder_needs_causal_pattern(ex):
    register("pcc-test-noncausal", "window(8)", block_size=16)
    model = ex.decoder("pcc-test-noncausal")
    with pytest.raises(ValueError, match=r"causal decoder.*'\(window\(8\)\) & causal'"):
        model(torch.randint(4, 20, (1, 20)))
    register("pcc-test-noncausal", "window(8)", block_size=16, check_causal=False)
    assert model(torch.randint(4, 20, (1, 20))).logits.shape == (1, 20, ex.VOCAB)


def test_is_causal_pattern():
    p = patterncc.parse
    assert is_causal_pattern(p("causal & window(4)"), 2)
    assert is_causal_pattern(p("causal & window(4) | sink(1)"), 2)
    assert not is_causal_pattern(p("causal | sink(4)"), 2)
    assert not is_causal_pattern(p("block(16) & causal(heads=[0]) | strided(3, heads=[1])"), 2, 16, 64)
    assert is_causal_pattern(p("window(0)"), 1, 16, 64)  # only the diagonal: causal, found from the layout
    assert is_causal_pattern(p("(window(3) | global([0])) & sink(1)"), 1, 16, 64)


def test_unsupported_arguments():
    fn = attention_function(patterncc.compile("window(2)", block_size=16), name="x")
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="sliding_window.*config.sliding_window = None"):
        fn(FakeModule(), q, q, q, None, sliding_window=4)
    with pytest.raises(ValueError, match="softcap"):
        fn(FakeModule(), q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="Custom 4D masks"):
        fn(FakeModule(), q, q, q, torch.ones(1, 1, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="cross-attention"):
        fn(FakeModule(), q, q[:, :, :6], q[:, :, :6], None)
    with pytest.raises(ValueError, match="new attention implementation name"):
        register("sdpa", "window(2)")
    # float and integer key masks: 0 additive / 1 = attend
    m = torch.ones(1, 10)
    m[0, 8:] = 0
    a, _ = fn(FakeModule(), q, q, q, m.long())
    b, _ = fn(FakeModule(), q, q, q, torch.where(m.bool(), 0.0, float("-inf"))[:, None, None, :])
    torch.testing.assert_close(a, b)


def test_dropout_applies_in_training(ex):
    register("pcc-test-dense", "dense", block_size=16)
    fn = hf.attention_function(patterncc.compile("dense", block_size=16))
    q = torch.randn(1, 2, 10, 8)
    mod = FakeModule().train()
    a, _ = fn(mod, q, q, q, None, dropout=0.5)
    assert (a == 0).any()
    mod.eval()
    b, _ = fn(mod, q, q, q, None, dropout=0.5)
    assert not (b == 0).any()


@needs_bert_interface
def test_example_trains_and_loss_falls(ex, one_thread):
    torch.manual_seed(0)
    enc = ex.train_encoder(steps=8, seq_len=48, batch=4, log=None)
    dec = ex.train_decoder(steps=8, seq_len=48, batch=4, log=None)
    for losses in (enc, dec):
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


def test_example_decoder_trains(ex, one_thread):
    losses = ex.train_decoder(steps=8, seq_len=48, batch=4, log=None)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


@needs_bert_interface
def test_example_main_runs(ex, capsys, one_thread):
    assert ex.main(["--steps", "1", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "BERT-like encoder" in out and "Llama-like decoder" in out and "->" in out


def test_docstring_examples():
    assert doctest.testmod(hf).failed == 0
