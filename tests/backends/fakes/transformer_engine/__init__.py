"""Fake Transformer Engine (the parts ``mm/ops/cuda.py`` calls): see ``transformer_engine_torch`` for the norm
kernels and ``transformer_engine.pytorch.attention.rope`` for the fused RoPE."""

__version__ = "2.99.0+fake"
