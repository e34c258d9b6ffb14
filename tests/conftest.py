"""Shared test configuration.

* ``tests/`` is put on ``sys.path`` so test modules can ``from strategies import ...``
  and ``from reference import ...`` whatever pytest's import mode.
* Hypothesis profiles: ``default`` (fast, used locally and in CI) and ``thorough``
  (many more examples); pick one with ``HYPOTHESIS_PROFILE=thorough``. Deadlines are
  off: the first call of a pattern fills caches and timing on shared CI runners varies.
* Without a CUDA device the Triton kernels run under Triton's CPU interpreter. Triton
  decides that when its own ``@jit`` helpers are decorated, at its import, so
  TRITON_INTERPRET is set here, before any test (or torch.compile) can import triton.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

settings.register_profile(
    "default", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=1000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def fresh_layout_cache():
    """The global layout cache, emptied before and after the test."""
    from patterncc.layout import CACHE
    CACHE.clear()
    yield CACHE
    CACHE.clear()
