"""fp32 math shared by the fakes: softmax attention over explicit score matrices (no SDPA)."""

import torch


def attention_fp32(q, k, v, scale, allowed=None):
    """q [Sq, H, D], k/v [Sk, H, D], allowed [Sq, Sk] bool or None -> [Sq, H, D] fp32."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v.float())
