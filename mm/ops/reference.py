"""Pure-PyTorch reference kernels: the ``cpu`` backend and the oracle for backend-parity tests.

Layouts and numerics (shared by every backend, see ``mm/ops/__init__.py``):

* attention: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` ("BSHD"); ``key_mask`` ``[B, Sk]`` bool with
  **True = attend** (a key-padding mask; never an Sq x Sk matrix); ``scale`` defaults to ``D**-0.5``.
  Returns ``[B, Sq, H, D]`` in the input dtype, softmax accumulated in fp32.
* rms_norm: ``(x * rsqrt(mean(x^2) + eps))`` in fp32, cast back to x's dtype, then ``* weight``
  (spec §2.7 QK-norm order).
* layer_norm: computed in fp32, cast back to x's dtype.
* apply_rope: rotate-half *within each chunk* of the last dim (spec §2.5: chunks t/h/w), in fp32,
  ``x * cos + rotate_half(x) * sin``, cast back.
* attention_block / attention_block_backward: one block of ring attention (``mm.distributed.ring_attention``).
  Forward: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, ``key_bias`` ``[B, Sk]`` additive (0 = attend,
  ``MASKED_BIAS`` = masked; a finite bias keeps the log-sum-exp of a fully masked block finite, so the merge
  gives it no weight) or None -> ``(out [B, Sq, H, D]`` in the input dtype, ``lse [B, H, Sq]`` fp32 or
  wider). Backward takes the *merged* (global) out and lse of the whole ring and returns ``(dq, dk, dv)``
  of this block. CPU: aten's flash-attention-for-cpu kernel and its backward, which take a mask and
  return the log-sum-exp.
"""

from __future__ import annotations

import platform
from typing import Sequence

import torch
import torch.nn.functional as F


def check_key_mask(key_mask: torch.Tensor, k: torch.Tensor) -> None:
    """The one key-mask contract of every backend: bool ``[B, Sk]``, True = attend."""
    if key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"key_mask must be bool [B, Sk] = {(k.shape[0], k.shape[1])}, got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    # [B, S, H, D] -> [B, H, S, D] for SDPA
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if key_mask is not None:
        check_key_mask(key_mask, k)
        mask = key_mask[:, None, None, :]  # [B, 1, 1, Sk], broadcast over heads and queries
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


MASKED_BIAS = -10000.0  # upstream's additive key bias; finite on purpose (see attention_block)


def _bias_BHSk(key_bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]  # [B, 1, 1, Sk]


def attention_block(q, k, v, key_bias=None, scale=None):
    # [B, S, H, D] -> [B, H, S, D] views; the kernel returns out [B, H, Sq, D], lse [B, H, Sq]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=_bias_BHSk(key_bias, q), scale=scale)
    return out.transpose(1, 2), lse


def attention_block_backward(dout, q, k, v, out, lse, key_bias=None, scale=None):
    t = (x.transpose(1, 2) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *t, lse, 0.0, False, attn_mask=_bias_BHSk(key_bias, q), scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def check_rope_chunks(chunks: Sequence[int], head_dim: int) -> None:
    if sum(chunks) != head_dim or any(c % 2 for c in chunks):
        raise ValueError(f"rope chunks {tuple(chunks)} must be even and sum to the head dim {head_dim}")


def rotate_half_chunks(x: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
    """Per chunk ``u = [u1, u2] -> [-u2, u1]`` along the last dim."""
    check_rope_chunks(chunks, x.shape[-1])
    out = []
    for u in torch.split(x, list(chunks), dim=-1):
        u1, u2 = u.chunk(2, dim=-1)
        out += [-u2, u1]
    return torch.cat(out, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
    xf = x.float()
    return (xf * cos.float() + rotate_half_chunks(xf, chunks) * sin.float()).to(x.dtype)


def device_name(device: torch.device) -> str:
    return platform.processor() or platform.machine() or "cpu"


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": rms_norm,
        "layer_norm": layer_norm,
        "apply_rope": apply_rope,
        "attention_block": attention_block,
        "attention_block_backward": attention_block_backward,
    }
