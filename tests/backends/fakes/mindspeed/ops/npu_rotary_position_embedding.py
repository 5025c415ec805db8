"""Fake ``mindspeed.ops.npu_rotary_position_embedding.npu_rotary_position_embedding(x, cos, sin, mode=0)``.

Contract (MindSpeed docs/ops/npu_rotary_position_embedding.md): x, cos, sin 4-D, fp16/bf16/fp32, cos/sin in
x's dtype with values in [-1, 1]; x layout BNSD, BSND or SBND with cos/sin broadcastable to it along the
layout's S and D (``11SD``/``B1SD``/``BNSD``, ``1S1D``/``BS1D``/``BSND``, ``S11D``/``SB1D``/``SBND``);
``mode`` 0 = rotate_half over the whole last dim (``x * cos + rotate_half(x) * sin``), 1 = rotate_interleaved.
"""

import torch

calls = {"npu_rotary_position_embedding": []}


def npu_rotary_position_embedding(x, cos, sin, mode=0):
    calls["npu_rotary_position_embedding"].append(mode)
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape:
        raise RuntimeError(f"x/cos/sin must be 4-D with cos.shape == sin.shape: {tuple(x.shape)} {tuple(cos.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise RuntimeError(f"cos/sin dtype {cos.dtype} must equal x's {x.dtype}")
    if cos.shape[-1] != x.shape[-1] or x.shape[-1] % 2 or any(c not in (1, n) for c, n in zip(cos.shape, x.shape)):
        raise RuntimeError(f"cos {tuple(cos.shape)} does not broadcast to x {tuple(x.shape)} along S and D")
    if bool((cos.abs() > 1).any()) or bool((sin.abs() > 1).any()):
        raise RuntimeError("cos/sin must lie in [-1, 1]")
    xf = x.float()
    if mode == 0:
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    elif mode == 1:
        rot = torch.stack([-xf[..., 1::2], xf[..., ::2]], dim=-1).flatten(-2)
    else:
        raise RuntimeError(f"mode must be 0 (rotate_half) or 1 (rotate_interleaved), got {mode}")
    return (xf * cos.float() + rot * sin.float()).to(x.dtype)
