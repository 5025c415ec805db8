"""Ascend NPU kernels (torch_npu). Imported only when the ``npu`` backend is selected.

attention: ``torch_npu.npu_fusion_attention`` in BSND layout; its boolean mask means True = *masked*
(opposite of ours), so the key mask is inverted and broadcast to [B, 1, Sq, Sk] as the kernel requires.
rms_norm: ``torch_npu.npu_rms_norm`` (same math as the reference). AdamW: ``torch_npu``'s fused AdamW.
"""

from __future__ import annotations

import torch
import torch_npu  # noqa: F401  (fails loudly if missing: the registry only imports this for npu)

from mm.ops import reference


def attention(q, k, v, key_mask=None, scale=None):
    b, sq, h, d = q.shape
    mask = None
    if key_mask is not None:
        mask = (~key_mask)[:, None, None, :].expand(b, 1, sq, k.shape[1])
    return torch_npu.npu_fusion_attention(
        q, k, v, h, input_layout="BSND", atten_mask=mask, scale=scale if scale is not None else d**-0.5, keep_prob=1.0
    )[0]


def rms_norm(x, weight, eps):
    if weight is None:
        return reference.rms_norm(x, weight, eps)
    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


def adamw_class():
    return torch_npu.optim.NpuFusedAdamW


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": rms_norm,
        "layer_norm": reference.layer_norm,
        "apply_rope": reference.apply_rope,
        "adamw_class": adamw_class,
    }
