"""Launch configurations: lookup order, the autotuner and its on-disk cache.

The autotuner's timer is replaced by a fake (no GPU here); the kernels it launches run
under Triton's interpreter, so a tuned configuration is also checked to compute the
same attention.
"""
from __future__ import annotations

import json

import pytest
import torch

import patterncc
from patterncc import codegen, lowering
from patterncc.backends import triton_backend, tuning
from patterncc.backends.tuning import KernelConfig as K
from patterncc.layout import get_layout

GPU = "NVIDIA H100 80GB HBM3"
MEASURED = {gpu: dict(table) for gpu, table in tuning.TUNED.items()}  # before the fixture's fake table
TABLE = {("fwd", 64, True): K(128, 64, 8, 3), ("fwd", 64, False): K(64, 32, 4, 3), ("dq", 64, True): K(128, 32, 8, 2)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(tuning.TUNED, "NVIDIA H100", TABLE)
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "pcc"))
    monkeypatch.delenv("PATTERNCC_AUTOTUNE", raising=False)
    tuning.clear()
    yield tmp_path / "pcc"
    tuning.clear()


def test_lookup_order_forced_then_tuned_then_table_then_default(monkeypatch):
    assert tuning.config_for("fwd", 64, torch.bfloat16, GPU, tall=True) == TABLE[("fwd", 64, True)]
    assert tuning.config_for("fwd", 64, torch.bfloat16, GPU, tall=False) == TABLE[("fwd", 64, False)]
    assert tuning.config_for("dq", 64, torch.bfloat16, GPU, tall=False) == tuning.DEFAULT  # not in the table
    assert tuning.config_for("fwd", 64, torch.bfloat16, "Some Other GPU") == tuning.DEFAULT
    assert tuning.config_for("fwd", 64, torch.float32, GPU) == tuning.DEFAULT  # table is bf16/fp16
    assert tuning.config_for("fwd", 64, torch.bfloat16, None) == tuning.DEFAULT  # interpreter
    tuning.autotune("fwd", 64, torch.bfloat16, GPU, lambda cfg: None, timer=lambda run: 1.0)
    assert tuning.config_for("fwd", 64, torch.bfloat16, GPU) == tuning.CANDIDATES["fwd"][0]  # tuned wins
    assert tuning.config_for("fwd", 64, torch.bfloat16, GPU, tall=True) == TABLE[("fwd", 64, True)]  # per class
    monkeypatch.setitem(tuning.CONFIGS, ("fwd", 64), K(16, 16, 1, 1))
    assert tuning.config_for("fwd", 50, torch.bfloat16, GPU) == K(16, 16, 1, 1)  # forced wins; 50 pads to 64
    assert tuning.config_for("fwd", 128, torch.bfloat16, GPU) != K(16, 16, 1, 1)  # other head-dim class


def test_flat_layouts_only_try_flat_candidates():
    tried = []
    tuning.autotune("fwd", 64, torch.bfloat16, "GPU X", tried.append, timer=lambda run: (run(), 1.0)[1])
    assert tried and all(c.block_m <= 64 for c in tried)
    tried.clear()
    tuning.autotune("dkdv", 64, torch.bfloat16, "GPU X", tried.append, timer=lambda run: (run(), 1.0)[1], tall=True)
    assert tried == tuning.CANDIDATES["dkdv"] and any(c.block_n > 64 for c in tried)


def test_autotune_picks_the_fastest_and_skips_candidates_that_fail():
    cands = tuning.CANDIDATES["dq"]
    speed = {c: 10.0 - i for i, c in enumerate(cands)}  # the last is fastest ...

    def run(cfg):
        if cfg == cands[-1]:
            raise RuntimeError("out of shared memory")  # ... but does not build
    timings = []

    def timer(call):
        call()
        timings.append(len(timings))
        return speed[cands[len(timings) - 1]]
    best = tuning.autotune("dq", 128, torch.float16, "GPU X", run, timer=timer, tall=True)
    assert best == cands[-2]
    assert tuning.tuned("dq", 100, torch.float16, "GPU X", tall=True) == cands[-2]  # 100 pads into the 128 class
    assert tuning.tuned("dq", 128, torch.bfloat16, "GPU X", tall=True) is None      # dtype is part of the key
    assert tuning.tuned("dq", 128, torch.float16, "GPU X") is None                  # so is the class


def test_tuned_choice_survives_the_process_and_a_corrupted_file(private_cache):
    tuning.autotune("dkdv", 64, torch.bfloat16, "GPU X", lambda cfg: None, timer=lambda run: 1.0)
    path = tuning.tuning_file()
    assert path.parent == private_cache
    data = json.loads(path.read_text())
    assert data == {"dkdv/64/bfloat16/flat/GPU X": vars(tuning.CANDIDATES["dkdv"][0])}
    tuning.clear()  # a new process: read back from disk
    assert tuning.tuned("dkdv", 64, torch.bfloat16, "GPU X") == tuning.CANDIDATES["dkdv"][0]
    path.write_text("{not json")
    tuning.clear()
    assert tuning.tuned("dkdv", 64, torch.bfloat16, "GPU X") is None  # ignored, not an error
    tuning.autotune("dkdv", 64, torch.bfloat16, "GPU X", lambda cfg: None, timer=lambda run: 1.0)
    assert json.loads(path.read_text())  # rewritten whole


def test_when_the_autotuner_runs(monkeypatch):
    assert not tuning.should_autotune("fwd", 64, torch.bfloat16, None)      # CPU / interpreter
    assert not tuning.should_autotune("fwd", 64, torch.bfloat16, GPU)       # in the measured table
    assert tuning.should_autotune("fwd", 64, torch.bfloat16, "Unknown GPU")  # not measured: tune once
    monkeypatch.setenv("PATTERNCC_AUTOTUNE", "1")
    assert tuning.should_autotune("fwd", 64, torch.bfloat16, GPU)           # forced
    monkeypatch.setenv("PATTERNCC_AUTOTUNE", "0")
    assert not tuning.should_autotune("fwd", 64, torch.bfloat16, "Unknown GPU")
    monkeypatch.delenv("PATTERNCC_AUTOTUNE")
    tuning.autotune("fwd", 64, torch.bfloat16, "Unknown GPU", lambda cfg: None, timer=lambda run: 1.0)
    assert not tuning.should_autotune("fwd", 64, torch.bfloat16, "Unknown GPU")  # cached: never again


def test_each_key_is_tuned_once_and_a_new_length_reuses_it(monkeypatch):
    """The backend's hook: the first forward tunes "fwd", the first backward "dkdv" and
    "dq"; the chosen configurations compute the same attention; another sequence length
    tunes only a (kernel, row class) key not seen yet (the row class can differ at short
    lengths), and the same length again tunes nothing. The timer is a fake, the kernels run
    under the interpreter."""
    monkeypatch.setattr(triton_backend, "device_name", lambda x: "Fake GPU")
    monkeypatch.setattr(tuning.torch.cuda, "is_available", lambda: False)
    calls = []

    def timer(run):
        run()
        calls.append(1)
        return float(len(calls) % 3)  # some candidate is fastest; which one does not matter
    monkeypatch.setattr(tuning, "time_ms", timer)
    two = [K(64, 64, 4, 2), K(32, 32, 4, 2)]  # flat: every layout tries them
    monkeypatch.setattr(tuning, "CANDIDATES", {kind: two for kind in tuning.KINDS})
    pattern = patterncc.parse("window(8) | global([0])")
    seen = set()
    for t in (100, 130, 100):
        before = len(calls)
        q, k, v = (torch.randn(1, 2, t, 16, requires_grad=True) for _ in range(3))
        layout = get_layout(pattern, t, 2, 32)
        out = triton_backend.attention(q, k, v, layout, 0.25)
        out.sum().backward()
        ref = patterncc.compile(pattern, block_size=32, backend="torch")(q.detach(), k.detach(), v.detach(), 0.25)
        assert (out - ref).abs().max() < 1e-4
        pred = codegen.analyse(pattern)
        keys = {(kind, lowering.row_class(layout, pred, 1, kind)) for kind in tuning.KINDS}
        assert len(calls) - before == 2 * len(keys - seen)  # two candidates per new key
        seen |= keys
        for kind, tall in keys:
            assert tuning.tuned(kind, 16, torch.float32, "Fake GPU", tall) in two


def test_measured_table_holds_only_candidates_of_its_class():
    """TUNED entries come from the sweep, so each is a candidate of its class: the GPU test
    test_every_autotuner_candidate_shape_is_exact then covers what the table picks."""
    assert MEASURED, "the measured table is empty"
    for table in MEASURED.values():
        for (kind, width, tall), cfg in table.items():
            assert kind in tuning.KINDS and width in (64, 128, 256)
            assert cfg in tuning.candidates(kind, tall), (kind, width, tall, cfg)


def test_fingerprint_changes_with_everything_config_for_reads(monkeypatch):
    """Launch constants are keyed by it (triton_backend.launch_for): a tuning result, a
    forced config or a replaced table must change it; nothing else may."""
    start = tuning.fingerprint()
    assert tuning.fingerprint() == start
    tuning.record("fwd", 64, torch.bfloat16, GPU, K(64, 32, 4, 3))
    recorded = tuning.fingerprint()
    assert recorded != start
    monkeypatch.setitem(tuning.CONFIGS, ("dq", 64), K(32, 32, 4, 2))
    forced = tuning.fingerprint()
    assert forced != recorded
    monkeypatch.setitem(tuning.TUNED, "NVIDIA H100", dict(TABLE))
    assert tuning.fingerprint() != forced
    tuning.clear()
    assert tuning.fingerprint() not in (start, recorded, forced)
