"""patterncc: a declarative sparse-attention pattern compiler.

Write a pattern, get a block-sparse layout, graph diagnostics and an attention op:

    >>> import torch, patterncc
    >>> op = patterncc.compile("window(16) | global([0])", block_size=16)
    >>> q = k = v = torch.randn(1, 2, 100, 32)
    >>> op(q, k, v).shape
    torch.Size([1, 2, 100, 32])
"""
from .errors import PatternError
from .ir import Pattern, Program
from .deepspeed import from_sparsity_config
from .layout import Layout
from .nn import SparseSelfAttention
from .op import SparseAttention, compile
from .parser import load, parse, parse_program

__all__ = ["PatternError", "Pattern", "Program", "Layout", "SparseAttention", "SparseSelfAttention",
           "parse", "parse_program", "load", "compile", "from_sparsity_config"]
__version__ = "0.1.0"
