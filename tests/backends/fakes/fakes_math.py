"""fp32 math shared by the fakes: softmax attention over explicit score matrices (no SDPA)."""

import torch


def attention_fp32(q, k, v, scale, allowed=None):
    """q [Sq, H, D], k/v [Sk, H, D], allowed [Sq, Sk] bool or None -> [Sq, H, D] fp32."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v.float())


def scores_fp32(q, k, scale, allowed=None, bias=None):
    """q [Sq, H, D], k [Sk, H, D] -> scaled scores [H, Sq, Sk] fp32 (+ bias [H, Sq, Sk]; -inf where not allowed)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if bias is not None:
        scores = scores + bias.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    return scores


def attention_stats_fp32(q, k, v, scale, allowed=None, bias=None):
    """-> (out [Sq, H, D], row max [H, Sq], sum of exp(score - max) [H, Sq]), all fp32."""
    scores = scores_fp32(q, k, scale, allowed, bias)
    row_max = scores.amax(dim=-1)
    e = torch.exp(scores - row_max[..., None])
    row_sum = e.sum(dim=-1)
    return torch.einsum("hqk,khd->qhd", e / row_sum[..., None], v.float()), row_max, row_sum


def attention_grad_fp32(q, k, v, dy, out, lse, scale, allowed=None, bias=None):
    """Flash-attention backward from an external out [Sq, H, D] and lse [H, Sq]:
    P = exp(s - lse), dV = P^T dy, dS = P (dy V^T - rowsum(dy * out)), dQ = scale dS K, dK = scale dS^T Q."""
    p = torch.exp(scores_fp32(q, k, scale, allowed, bias) - lse.float()[..., None])
    dyf = dy.float()
    dv = torch.einsum("hqk,qhd->khd", p, dyf)
    dp = torch.einsum("qhd,khd->hqk", dyf, v.float())
    ds = p * (dp - (dyf * out.float()).sum(-1).transpose(0, 1)[..., None])
    return (torch.einsum("hqk,khd->qhd", ds, k.float()) * scale, torch.einsum("hqk,qhd->khd", ds, q.float()) * scale,
            dv)
