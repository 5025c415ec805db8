"""CUDA kernels. Imported only when the ``cuda`` backend is selected.

attention: FlashAttention-2 when ``flash_attn`` is installed and there is no key mask (varlen for masks
is a later optimisation), otherwise torch SDPA (which dispatches to its own flash/efficient kernels);
norms and RoPE use the reference math (fused under ``torch.compile``); AdamW is torch's fused CUDA AdamW.
Same layouts and numerics as ``mm.ops.reference``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from mm.ops import reference

_HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None


def attention(q, k, v, key_mask=None, scale=None):
    if _HAVE_FLASH and key_mask is None and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # BSHD layout natively

        return flash_attn_func(q, k, v, softmax_scale=scale)
    return reference.attention(q, k, v, key_mask, scale)


def adamw_class():
    return functools.partial(torch.optim.AdamW, fused=True)


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": reference.rms_norm,
        "layer_norm": reference.layer_norm,
        "apply_rope": reference.apply_rope,
        "adamw_class": adamw_class,
    }
