"""Fakes of torch's CUDA-only memory-efficient attention ops, which ``mm/ops/cuda.py`` calls for the ring's
block kernel; the contract tests put them in place of ``cuda._efficient_fwd`` / ``cuda._efficient_bwd``.

Contract (torch 2.13 schema; ``aten/src/ATen/native/transformers/cuda/attention.cu`` and the cutlass kernel):

* ``_scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.,
  is_causal=False, *, scale=None) -> (output, log_sumexp, philox_seed, philox_offset)``. q/k/v ``[B, H, S, D]``
  of one dtype; ``attn_bias`` additive, in q's dtype, of shape ``[B, H, Sq, Sk]`` (expanded views allowed), last dim
  contiguous, other strides multiples of 16 elements (torch's SDPA pads the row to 16 for this). ``output`` ``[B, H, Sq, Dv]``;
  ``log_sumexp`` fp32 ``[B, H, ceil(Sq / 32) * 32]``: rows past Sq are padding (unspecified; NaN here, so a caller
  that reads them fails).
* ``_scaled_dot_product_efficient_attention_backward(grad_out_, query, key, value, attn_bias, out, logsumexp,
  philox_seed, philox_offset, dropout_p, grad_input_mask, is_causal=False, *, scale=None) -> (dq, dk, dv,
  dbias)``: ``logsumexp`` in the forward's padded layout; gradients ``[B, H, S, D]``; ``dbias`` None unless asked.
"""

import torch

from fakes_math import attention_grad_fp32, attention_stats_fp32

LSE_ALIGN, BIAS_ALIGN = 32, 16
calls = {"forward": 0, "backward": 0}


def _check(query, key, value, attn_bias):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4 or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be 4-D [B, H, S, D] with a contiguous last dim, got {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("query, key and value must have the same dtype")
    b, h, sq, _ = query.shape
    sk = key.shape[2]
    if attn_bias is None:
        return None
    if attn_bias.dtype != query.dtype:
        raise RuntimeError(f"attn_bias dtype {attn_bias.dtype} must match query dtype {query.dtype}")
    if tuple(attn_bias.shape) != (b, h, sq, sk):  # the kernel checks every size (expanded views are fine)
        raise RuntimeError(f"attn_bias must be [B, H, Sq, Sk] = {(b, h, sq, sk)}, got {tuple(attn_bias.shape)}")
    if attn_bias.stride(-1) != 1 or any(s % BIAS_ALIGN for s in attn_bias.stride()[:3]):
        raise RuntimeError(f"attn_bias is not correctly aligned: strides {attn_bias.stride()}")
    return attn_bias


def _lse_len(sq):
    return -(-sq // LSE_ALIGN) * LSE_ALIGN


def efficient_attention(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                        scale=None):
    calls["forward"] += 1
    if dropout_p != 0.0 or is_causal:
        raise RuntimeError("fake: dropout and causal masking are not modelled")
    bias = _check(query, key, value, attn_bias)
    b, h, sq, d = query.shape
    scale = d**-0.5 if scale is None else scale
    outs, lses = [], []
    for i in range(b):
        t = [x[i].transpose(0, 1) for x in (query, key, value)]  # [S, H, D]
        out, m, s = attention_stats_fp32(*t, scale, bias=None if bias is None else bias[i])
        outs.append(out.transpose(0, 1))
        lses.append(m + torch.log(s))
    lse = torch.full((b, h, _lse_len(sq) if compute_log_sumexp else 0), float("nan"))
    if compute_log_sumexp:
        lse[:, :, :sq] = torch.stack(lses)
    no_dropout = torch.empty((), dtype=torch.long)
    return torch.stack(outs).to(query.dtype), lse, no_dropout, no_dropout


def efficient_attention_backward(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                                 dropout_p, grad_input_mask, is_causal=False, *, scale=None):
    calls["backward"] += 1
    if dropout_p != 0.0 or is_causal:
        raise RuntimeError("fake: dropout and causal masking are not modelled")
    bias = _check(query, key, value, attn_bias)
    b, h, sq, d = query.shape
    if logsumexp.dtype != torch.float32 or tuple(logsumexp.shape) != (b, h, _lse_len(sq)):
        raise RuntimeError(f"logsumexp must be fp32 [B, H, ceil(Sq/32)*32] = {(b, h, _lse_len(sq))}, "
                           f"got {logsumexp.dtype} {tuple(logsumexp.shape)}")
    if grad_out_.shape != out.shape or out.shape[:3] != query.shape[:3]:
        raise RuntimeError(f"grad_out {tuple(grad_out_.shape)} / out {tuple(out.shape)} do not match the query")
    scale = d**-0.5 if scale is None else scale
    grads = []
    for i in range(b):
        t = [x[i].transpose(0, 1) for x in (query, key, value, grad_out_, out)]
        grads.append(attention_grad_fp32(*t, logsumexp[i, :, :sq], scale, bias=None if bias is None else bias[i]))
    dq, dk, dv = (torch.stack([g[j].transpose(0, 1) for g in grads]).to(query.dtype) for j in range(3))
    if grad_input_mask[3]:
        raise RuntimeError("fake: the bias gradient is not modelled")
    return dq, dk, dv, None
