"""Kernel entry points used by model code; each dispatches to the selected backend.

Call ``select_backend(name)`` once at process start (entry scripts and tests do); a kernel called
before that selects from ``$MM_BACKEND`` (default ``auto``). Layouts are documented in
``mm/ops/reference.py``.
"""

from __future__ import annotations

from mm.ops.registry import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    available_backends,
    current_backend,
    kernel,
    select_backend,
)


def attention(q, k, v, key_mask=None, scale=None):
    """q [B,Sq,H,D], k/v [B,Sk,H,D], key_mask [B,Sk] bool (True = attend) -> [B,Sq,H,D]."""
    return kernel("attention")(q, k, v, key_mask, scale)


def attention_block(q, k, v, key_bias=None, scale=None):
    """One ring-attention block: q [B,Sq,H,D], k/v [B,Sk,H,D], key_bias [B,Sk] additive (0 or -10000) ->
    (out [B,Sq,H,D], lse [B,H,Sq] fp32)."""
    return kernel("attention_block")(q, k, v, key_bias, scale)


def attention_block_backward(dout, q, k, v, out, lse, key_bias=None, scale=None):
    """Gradients of one block given the ring's merged out and lse -> (dq, dk, dv)."""
    return kernel("attention_block_backward")(dout, q, k, v, out, lse, key_bias, scale)


def rms_norm(x, weight, eps):
    return kernel("rms_norm")(x, weight, eps)


def layer_norm(x, weight, bias, eps):
    return kernel("layer_norm")(x, weight, bias, eps)


def apply_rope(x, cos, sin, chunks):
    """Rotate-half RoPE within each chunk of the last dim (3-D split: t, h, w chunks), fp32 math."""
    return kernel("apply_rope")(x, cos, sin, chunks)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "current_backend",
    "select_backend",
    "attention",
    "attention_block",
    "attention_block_backward",
    "rms_norm",
    "layer_norm",
    "apply_rope",
]
