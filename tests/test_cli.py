"""The patterncc command: outputs, JSON, help and error exits."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from patterncc.cli import main

CARD = "window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)"


def test_compile_writes_outputs(tmp_path, capsys):
    assert main(["compile", "examples/longformer.attn", "--seq-len", "2048", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "layers 9..12" in text and "density" in text and "heads" in text
    for name in ("layout-0.npz", "layout-3.npz", "layout.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["seq_len"] == 2048 and rep["num_heads"] == 12 and len(rep["groups"]) == 4
    dilated = rep["groups"][3]["head_groups"]
    assert [g["heads"] for g in dilated] == [[0, 1], list(range(2, 12))]
    z = np.load(tmp_path / "layout-3.npz")
    assert z["indptr"][-1] == z["kblock"].size == rep["groups"][3]["touched_blocks"]


def test_compile_json_expression(capsys):
    assert main(["compile", CARD, "--seq-len", "4096", "--heads", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    g = rep["groups"][0]
    assert 0 < g["density"] < g["block_density"] < 1
    assert g["flops_fwd"]["sparse"] < g["flops_fwd"]["dense"]


def test_compile_shows_the_blocks_before_and_after_residue_order(capsys):
    assert main(["compile", "window(256) | global([0]) | dilate(2, heads=2)", "--seq-len", "8192",
                 "--heads", "4", "--json"]) == 0
    k = json.loads(capsys.readouterr().out)["groups"][0]["kernel"]
    assert k["residue_heads"] == [0, 1] and k["residue_factors"] == [2]
    assert k["touched_blocks"] < k["token_order_blocks"]
    assert k["full_fraction"] > k["token_order_full_fraction"]
    assert main(["compile", "window(256) | global([0]) | dilate(2, heads=2)", "--seq-len", "8192",
                 "--heads", "4"]) == 0
    assert "kernels: heads 0-1 run in residue order (tokens grouped by t mod 2)" in capsys.readouterr().out
    assert main(["compile", "window(256) | global([0])", "--seq-len", "8192"]) == 0
    assert "residue order" not in capsys.readouterr().out  # nothing dilated: nothing to say


@pytest.mark.parametrize("args,needle", [
    (["compile", "windw(3)", "--seq-len", "100"], "did you mean 'window'"),
    (["compile", "global([500])", "--seq-len", "100"], "outside the sequence"),
    (["compile", "window(3, heads=[7])", "--seq-len", "100", "--heads", "2"], "head 7"),
    (["compile", "missing.attn", "--seq-len", "100"], "no such pattern file"),
    (["compile", "window(3)", "--seq-len", "100", "--block-size", "48"], "power of two"),
    (["diagnose", "window(3) |", "--seq-len", "100"], "unexpected end of input"),
])
def test_errors_exit_2_with_a_message(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_error_has_caret_and_no_traceback_in_a_real_process(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text("heads = 2\n\nlayers 0..2: window(4) - causal\n")
    r = subprocess.run([sys.executable, "-m", "patterncc", "compile", str(f), "--seq-len", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{f}:3:24: unknown operator '-'" in r.stderr
    assert "\n                         ^" in r.stderr  # caret under the '-' (2 spaces indent + 23)
    assert "Traceback" not in r.stderr


def test_help_explains_flags_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seq-len", "--heads", "--block-size", "--out", "--json", "examples:"):
        assert flag in text
