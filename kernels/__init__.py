"""Triton kernel templates that patterncc's code generator fills (shipped as patterncc.kernels)."""
