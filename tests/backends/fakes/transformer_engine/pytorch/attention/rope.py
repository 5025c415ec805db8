"""Fake ``transformer_engine.pytorch.attention.rope.apply_rotary_pos_emb`` (TE >= 2.3).

Contract (TE docs / the fused kernel's checks): ``t`` is ``[s, b, h, d]`` (``sbhd``) or ``[b, s, h, d]``
(``bshd``), any strides; ``freqs`` are *angles*, fp32, ``[s2, 1, 1, d2]`` with ``s2 >= s`` and ``d2 <= d``,
contiguous. The first ``d2`` channels are rotated rotate-half style over those ``d2`` channels
(``interleaved=False``: pairs ``(j, j + d2/2)``), cos/sin computed from the angles in fp32; channels past
``d2`` pass through. Output in ``t``'s dtype.
"""

import torch

calls = {"fused": 0, "unfused": 0}


def apply_rotary_pos_emb(t, freqs, tensor_format="sbhd", start_positions=None, interleaved=False, fused=False,
                         cu_seqlens=None, cp_size=1, cp_rank=0):
    calls["fused" if fused else "unfused"] += 1
    if tensor_format not in ("sbhd", "bshd"):
        raise RuntimeError(f"fake supports sbhd and bshd, got {tensor_format!r}")
    if start_positions is not None or interleaved or cp_size != 1 or cu_seqlens is not None:
        raise RuntimeError("fake supports start_positions=None, interleaved=False, cp_size=1")
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise RuntimeError(f"expected 4D t and freqs [s2, 1, 1, d2], got {tuple(t.shape)} / {tuple(freqs.shape)}")
    if freqs.dtype != torch.float32 or not freqs.is_contiguous():
        raise RuntimeError("Dtype of the freqs tensor must be float (and contiguous)")
    s = t.shape[0] if tensor_format == "sbhd" else t.shape[1]
    d2 = freqs.shape[-1]
    if s > freqs.shape[0] or d2 > t.shape[-1] or d2 % 2:
        raise RuntimeError(f"freqs {tuple(freqs.shape)} cannot cover t {tuple(t.shape)} ({tensor_format})")
    f = freqs[:s]  # [s, 1, 1, d2]
    if tensor_format == "bshd":
        f = f.transpose(0, 1)
    x, rest = t[..., :d2].float(), t[..., d2:]
    x1, x2 = x.chunk(2, dim=-1)
    out = x * f.cos() + torch.cat([-x2, x1], dim=-1) * f.sin()
    return torch.cat([out.to(t.dtype), rest], dim=-1)
