"""Attention backends: ``torch_backend`` (block-sparse PyTorch, CPU and fallback) and
``triton_backend`` (generated Triton kernels, GPU; imported lazily so that
``import patterncc`` never imports Triton)."""
