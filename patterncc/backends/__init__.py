"""Attention backends: block-sparse PyTorch (torch_backend) and generated Triton (triton_backend)."""
