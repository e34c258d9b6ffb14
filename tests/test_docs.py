"""Every docstring example in the public modules runs and prints what it says."""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

MODULES = ["patterncc", "patterncc.errors", "patterncc.ir", "patterncc.parser", "patterncc.layout",
           "patterncc.op", "patterncc.report", "patterncc.cli", "patterncc.lowering", "patterncc.codegen",
           "patterncc.backends.torch_backend", "patterncc.backends.tuning"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples read examples/*.attn
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
