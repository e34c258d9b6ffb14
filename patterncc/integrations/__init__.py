"""Integrations of patterncc with other libraries.

* :mod:`patterncc.integrations.transformers` -- Hugging Face transformers: register a
  pattern as an ``attn_implementation`` (``pip install patterncc[hf]``).

Each integration imports its library lazily, so importing this package needs nothing
beyond patterncc's own dependencies.
"""
