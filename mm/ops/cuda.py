"""CUDA kernels. Imported only when the ``cuda`` backend is selected (or by the contract tests, with fakes).

Same layouts and numerics as ``mm.ops.reference``; which implementation runs is decided per call from
what is installed and the inputs, and every use of a slower path is logged once with its reason.

* attention: FlashAttention-2 (``flash_attn``) for fp16/bf16 with head dim <= 256: ``flash_attn_func``
  without a key mask, ``flash_attn_varlen_func`` with one (valid keys packed, ``cu_seqlens`` built from
  the mask, ``mm.ops.varlen``). Otherwise torch SDPA with the boolean mask (cuDNN / memory-efficient
  kernels) = the reference. ``make device-check`` times both (``attention_tflops`` in its JSON).
* rms_norm / layer_norm: apex's fused kernels (``apex.normalization.fused_layer_norm``) when apex is
  installed and weight/bias share the input's dtype (apex's kernels require it), else the reference
  under ``torch.compile`` (one fused Triton kernel).
* apply_rope: the reference under ``torch.compile``: the chunked (t/h/w) rotate-half has no fused
  library kernel with the same layout.
* AdamW: torch's fused CUDA AdamW, switched on by ``mm.training.ema_adamw.fuse_inner_optimizers`` when
  megatron built torch's AdamW (TE/apex ``FusedAdam`` are fused already).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch

from mm.ops import reference
from mm.ops.varlen import pack_keys

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
_said: set[str] = set()


def _once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.info("cuda kernels: %s", reason)


def _optional(module: str):
    """The module if it is installed; a broken install (found but failing to import) raises."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    return importlib.import_module(module)


_flash = _optional("flash_attn")
_apex_norm = _optional("apex.normalization.fused_layer_norm") if importlib.util.find_spec("apex") else None


def attention(q, k, v, key_mask=None, scale=None):
    if _flash is None:
        _once("attention: flash_attn is not installed; torch SDPA with a boolean key mask")
    elif q.dtype not in FLASH_DTYPES:
        _once(f"attention: {q.dtype} inputs; flash-attn needs fp16/bf16, using torch SDPA")
    elif q.shape[-1] > FLASH_MAX_HEAD_DIM:
        _once(f"attention: head dim {q.shape[-1]} > {FLASH_MAX_HEAD_DIM}; flash-attn cannot, using torch SDPA")
    elif key_mask is None:
        return _flash.flash_attn_func(q, k, v, softmax_scale=scale)  # BSHD natively
    else:
        b, sq, h, d = q.shape
        p = pack_keys(q, k, v, key_mask)
        # max_seqlen_k: Sk bounds every packed length; passing it avoids a device->host sync
        out = _flash.flash_attn_varlen_func(p.q, p.k, p.v, p.cu_seqlens_q, p.cu_seqlens_k, sq, k.shape[1],
                                            softmax_scale=scale)
        return out.view(b, sq, h, v.shape[-1])  # [B*Sq, H, D] -> [B, Sq, H, D]
    return reference.attention(q, k, v, key_mask, scale)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _apex_ok(x, *params) -> bool:
    if _apex_norm is None:
        _once("norms: apex is not installed; torch.compile'd reference norms")
        return False
    if any(p is not None and p.dtype != x.dtype for p in params):
        _once("norms: weight dtype differs from the input's; apex needs them equal, torch.compile'd reference")
        return False
    return True


def rms_norm(x, weight, eps):
    if _apex_ok(x, weight):
        shape = (x.shape[-1],)
        if weight is None:
            return _apex_norm.fused_rms_norm(x, shape, eps)
        return _apex_norm.fused_rms_norm_affine(x, weight, shape, eps)
    return _compiled(reference.rms_norm)(x, weight, eps)


def layer_norm(x, weight, bias, eps):
    if _apex_ok(x, weight, bias) and (weight is None) == (bias is None):
        shape = (x.shape[-1],)
        if weight is None:
            return _apex_norm.fused_layer_norm(x, shape, eps)
        return _apex_norm.fused_layer_norm_affine(x, weight, bias, shape, eps)
    return _compiled(reference.layer_norm)(x, weight, bias, eps)


def apply_rope(x, cos, sin, chunks):
    return _compiled(reference.apply_rope)(x, cos, sin, tuple(chunks))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": rms_norm,
        "layer_norm": layer_norm,
        "apply_rope": apply_rope,
    }
