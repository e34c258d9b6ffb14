"""Files shipped beside the code: the grammar (grammar/) and the kernel templates (kernels/)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def read_text(package: str, name: str) -> str:
    """Text of ``name`` in ``patterncc.grammar`` or ``patterncc.kernels``.

    Installed, these are packages of their own; in a source checkout that was never
    installed (a GPU box running ``bench/`` straight from a clone) they are the folders
    beside ``patterncc/``.
    """
    try:
        return resources.files(package).joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        folder = package.rsplit(".", 1)[-1]
        return (Path(__file__).resolve().parents[1] / folder / name).read_text(encoding="utf-8")
