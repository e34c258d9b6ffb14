"""The Triton op under torch.compile (one opaque custom op, no graph break), on the CPU
through Triton's interpreter; CUDA graphs are checked in tests/gpu."""
from __future__ import annotations


import pytest
import torch

import patterncc
from patterncc.backends import triton_backend


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(t=40, h=2, hkv=1, d=16):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda n: torch.randn(1, n, t, d, device=dev, generator=g, requires_grad=True)
    return mk(h), mk(hkv), mk(hkv)


def test_fullgraph_compile_matches_eager_with_gradients():
    op = patterncc.compile("window(8) & causal | global([0])", block_size=16, backend="triton")
    def loss(q, k, v):
        return (op(q, k, v) * 2).sum()
    q, k, v = _inputs()
    eager = loss(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    cgrads = torch.autograd.grad(out, (q, k, v))
    assert torch.allclose(out, eager, atol=1e-5)
    for a, b in zip(cgrads, grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_custom_op_registration_passes_opcheck():
    q, k, v = _inputs(t=33)
    key = triton_backend.op_key(patterncc.parse("window(4) | global([-1])"), 16)
    torch.library.opcheck(torch.ops.patterncc.sparse_attention.default, (q, k, v, key, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_backend_still_works_under_compile():
    op = patterncc.compile("window(8)", block_size=16, backend="torch")
    q, k, v = _inputs()
    compiled = torch.compile(lambda q, k, v: op(q, k, v).sum(), backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), op(q, k, v).sum(), atol=1e-5)
