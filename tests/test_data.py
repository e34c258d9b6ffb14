"""The grammar and kernel templates are found by path, and the repository's data folders
never shadow an installed top-level package of the same name."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from patterncc import _data

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder, name", [("grammar", "patterncc.lark"),
                                          ("kernels", "attention_fwd.py"),
                                          ("kernels", "attention_bwd.py")])
def test_read_text_finds_shipped_files(folder, name):
    text = _data.read_text(folder, name)
    assert text == (_data.data_folder(folder) / name).read_text(encoding="utf-8")
    assert len(text) > 100


def test_missing_folder_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(_data, "_PACKAGE", tmp_path / "patterncc")
    with pytest.raises(FileNotFoundError, match=r"kernels/ folder is missing: looked in .*patterncc.kernels"):
        _data.read_text("kernels", "attention_fwd.py")


@pytest.mark.parametrize("folder", ["grammar", "kernels"])
def test_repository_root_does_not_shadow_a_top_level_package(folder):
    # Run from the repository root, as `python -m pytest` and the examples are: the data
    # folder there must not be importable as a regular package, or it would hide an installed
    # distribution of that name (transformers imports the `kernels` distribution).
    probe = ("import importlib.util as u; s = u.find_spec(%r); "
             "print(s.origin if s and s.origin else (list(s.submodule_search_locations) if s else None))" % folder)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert str(REPO / folder / "__init__.py") not in out, out
    assert not (REPO / folder / "__init__.py").exists()
