"""Files shipped beside the code: the grammar (grammar/) and the kernel templates (kernels/).

Both folders sit at the top of the repository and are copied into the package by the wheel
(``patterncc/grammar``, ``patterncc/kernels``). They are plain folders of data, not Python
packages: a top-level ``kernels`` package in the repository would shadow the ``kernels``
distribution (a dependency of Hugging Face transformers) for anything run from the
repository's root, so the templates are found by path, never by import.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_folder(folder: str) -> Path:
    """The folder ``folder`` (``"grammar"`` or ``"kernels"``) that this patterncc reads.

    Installed from a wheel it lies inside the package; in a source checkout (editable
    install, or a GPU box running ``bench/`` straight from a clone) it is the folder beside
    ``patterncc/``.
    """
    for root in (_PACKAGE / folder, _PACKAGE.parent / folder):
        if root.is_dir():
            return root
    raise FileNotFoundError(f"patterncc's {folder}/ folder is missing: looked in {_PACKAGE / folder} "
                            f"and {_PACKAGE.parent / folder}; reinstall patterncc")


def read_text(folder: str, name: str) -> str:
    """Text of the file ``name`` in patterncc's ``folder`` (``"grammar"`` or ``"kernels"``)."""
    return (data_folder(folder) / name).read_text(encoding="utf-8")
