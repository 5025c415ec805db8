"""Fake ``flash_attn`` (FlashAttention-2 Python API, the two functions our wrapper calls).

Contract (flash-attn 2.x docs): q/k/v fp16 or bf16, same dtype, contiguous last dim, head dim <= 256.
``flash_attn_func``: ``[B, S, H, D]``. ``flash_attn_varlen_func``: packed ``[total, H, D]`` with int32
``cu_seqlens_q/k`` of shape ``[B+1]`` (0 first, non-decreasing, last = total) and max lengths that bound
every sequence. No mask argument: padding is expressed by packing. Returns the output only.
"""

import torch

from fakes_math import attention_fp32

__version__ = "2.99.0+fake"
calls = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}


def _check_qkv(q, k, v, dims):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise RuntimeError(f"{name} must have {dims} dims, got {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError("query and key must have the same dtype")
    if q.shape[-1] > 256 or q.shape[-2] != k.shape[-2] or k.shape[:-1] != v.shape[:-1]:
        raise RuntimeError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    calls["flash_attn_func"] += 1
    _check_qkv(q, k, v, 4)
    if q.shape[0] != k.shape[0]:
        raise RuntimeError("batch sizes differ")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.stack([attention_fp32(q[b], k[b], v[b], scale) for b in range(q.shape[0])])
    return out.to(q.dtype)


def _check_cu(cu, total, max_len, name):
    if cu.dtype != torch.int32 or cu.dim() != 1:
        raise RuntimeError(f"{name} must be a 1-D int32 tensor, got {cu.dtype} {tuple(cu.shape)}")
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()) or int(lens.max()) > max_len:
        raise RuntimeError(f"{name}={cu.tolist()} does not describe {total} tokens with max length {max_len}")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    calls["flash_attn_varlen_func"] += 1
    _check_qkv(q, k, v, 3)
    _check_cu(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
    _check_cu(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.cat([attention_fp32(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale)
                     for i in range(len(cq) - 1)])
    return out.to(q.dtype)
