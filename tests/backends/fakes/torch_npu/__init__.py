"""Fake ``torch_npu``: the operators ``mm/ops/npu.py`` calls, per the Ascend torch_npu API reference.

* ``npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
  atten_mask=None, scale=1.0, keep_prob=1.0, ..., actual_seq_qlen=None, actual_seq_kvlen=None,
  sparse_mode=0, ...)`` -> 7-tuple ``(attention_out, softmax_max, softmax_sum, softmax_in, seed, offset,
  numels)``. Layouts: ``BSND``, ``BNSD``, ``TND`` (packed; ``actual_seq_qlen``/``actual_seq_kvlen`` are
  *cumulative host lists without a leading 0*). ``atten_mask`` is bool with **True = masked** (does not take
  part), shape ``[B, 1, Sq, Sk]``, ``[B, N, Sq, Sk]``, ``[1, 1, Sq, Sk]`` or ``[Sq, Sk]``. ``scale`` defaults to
  **1.0**. fp16/bf16 inputs (fp32 accepted here so fp32 parity can be tested). ``softmax_max`` / ``softmax_sum``:
  fp32 row max and sum of ``exp(score - max)``, 8 equal copies in the last dim: ``[B, N, Sq, 8]`` (BSND, BNSD)
  or ``[T, N, 8]`` (TND).
* ``npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, ..., softmax_max, softmax_sum,
  softmax_in, attention_in, scale_value=1.0, keep_prob=1.0, ..., actual_seq_qlen, actual_seq_kvlen, ...)`` ->
  ``(dq, dk, dv, dpse)``; recomputes ``P = exp(score - softmax_max) / softmax_sum``.
* ``npu_rms_norm(x, gamma, epsilon=1e-6)`` -> ``(y, rstd)``; gamma in x's dtype.
* ``npu_rotary_mul(x, r1, r2)`` = ``x * r1 + rotate_half(x) * r2``, rotate-half over the *whole* last dim.
* ``npu.get_device_name(index)``.

``MASK_TRUE_MEANS`` exists so a test can flip the polarity and prove that the contract tests notice.
"""

import types

import torch

from fakes_math import attention_grad_fp32, attention_stats_fp32

__version__ = "2.99.0+fake"
MASK_TRUE_MEANS = "masked"
calls = {"npu_fusion_attention": [], "npu_fusion_attention_grad": [], "npu_rms_norm": 0, "npu_rotary_mul": 0}


def _allowed(atten_mask, b, n, sq, sk):
    """The kernel's mask -> [B, N, Sq, Sk] bool 'takes part'."""
    if atten_mask is None:
        return None
    if atten_mask.dtype != torch.bool:
        raise RuntimeError(f"atten_mask must be bool, got {atten_mask.dtype}")
    m = atten_mask
    if m.dim() == 2:
        m = m[None, None]
    if m.dim() != 4 or m.shape[-2:] != (sq, sk) or m.shape[0] not in (1, b) or m.shape[1] not in (1, n):
        raise RuntimeError(f"atten_mask shape {tuple(atten_mask.shape)} invalid for B={b} N={n} Sq={sq} Sk={sk}")
    m = m.expand(b, n, sq, sk)
    return ~m if MASK_TRUE_MEANS == "masked" else m


def _layout_bsnd(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen):
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise RuntimeError("actual_seq_qlen/kvlen are for the TND layout")
    q, k, v = (query, key, value) if input_layout == "BSND" else (t.transpose(1, 2) for t in (query, key, value))
    if q.shape[2] != head_num:
        raise RuntimeError(f"head_num={head_num} but the {input_layout} input has N={q.shape[2]}")
    return q, k, v


def _tnd_bounds(query, key, head_num, atten_mask, actual_seq_qlen, actual_seq_kvlen):
    """Cumulative bounds ``[0, ...]`` of the packed sequences, validated."""
    if atten_mask is not None:
        raise RuntimeError("fake: TND with atten_mask is not modelled")
    if query.dim() != 3 or query.shape[1] != head_num:
        raise RuntimeError(f"TND query must be [T, N={head_num}, D], got {tuple(query.shape)}")
    for name, lens, t in (("actual_seq_qlen", actual_seq_qlen, query), ("actual_seq_kvlen", actual_seq_kvlen, key)):
        if not isinstance(lens, (list, tuple)) or not all(isinstance(x, int) for x in lens):
            raise RuntimeError(f"{name} must be a host list of ints, got {type(lens).__name__}")
        if not lens or list(lens) != sorted(lens) or lens[-1] != t.shape[0]:
            raise RuntimeError(f"{name}={lens} must be cumulative (no leading 0) and end at T={t.shape[0]}")
    if len(actual_seq_qlen) != len(actual_seq_kvlen):
        raise RuntimeError("actual_seq_qlen and actual_seq_kvlen differ in length")
    cq, ck = [0, *actual_seq_qlen], [0, *actual_seq_kvlen]
    if any(ck[i + 1] == ck[i] for i in range(len(ck) - 1)):
        raise RuntimeError(f"fake: an empty key sequence (actual_seq_kvlen={actual_seq_kvlen}) is not modelled")
    return cq, ck


def _stats8(x):
    """[..] fp32 -> [.., 8]: the kernel's softmax statistics carry 8 equal copies in the last dim."""
    return x.unsqueeze(-1).expand(*x.shape, 8).contiguous()


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    """softmax_max / softmax_sum: fp32 ``[B, N, Sq, 8]`` (BSND, BNSD) or ``[T, N, 8]`` (TND)."""
    calls["npu_fusion_attention"].append(input_layout)
    if keep_prob != 1.0 or pse is not None or padding_mask is not None:
        raise RuntimeError("fake supports keep_prob=1, no pse, no padding_mask")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("query/key/value dtypes differ")
    if input_layout in ("BSND", "BNSD"):
        q, k, v = _layout_bsnd(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
        b, sq, n, d = q.shape
        allowed = _allowed(atten_mask, b, n, sq, k.shape[1])
        if allowed is not None and not bool((allowed == allowed[:, :1]).all()):
            raise RuntimeError("fake: per-head masks are not modelled")
        res = [attention_stats_fp32(q[i], k[i], v[i], scale, None if allowed is None else allowed[i, 0])
               for i in range(b)]
        out = torch.stack([r[0] for r in res])
        out = out if input_layout == "BSND" else out.transpose(1, 2)
        smax, ssum = (torch.stack([r[j] for r in res]) for j in (1, 2))  # [B, N, Sq]
    elif input_layout == "TND":
        cq, ck = _tnd_bounds(query, key, head_num, atten_mask, actual_seq_qlen, actual_seq_kvlen)
        res = [attention_stats_fp32(query[cq[i]:cq[i + 1]], key[ck[i]:ck[i + 1]], value[ck[i]:ck[i + 1]], scale)
               for i in range(len(cq) - 1)]
        out = torch.cat([r[0] for r in res])
        smax, ssum = (torch.cat([r[j].transpose(0, 1) for r in res]) for j in (1, 2))  # [T, N]
    else:
        raise RuntimeError(f"fake supports BSND, BNSD and TND, got {input_layout!r}")
    return out.to(query.dtype), _stats8(smax), _stats8(ssum), torch.empty(0), 0, 0, 0


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                              inner_precise=0, seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                              actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    """-> (dq, dk, dv, dpse) in the input layout; recomputes P = exp(s * scale - softmax_max) / softmax_sum."""
    calls["npu_fusion_attention_grad"].append(input_layout)
    if keep_prob != 1.0 or pse is not None or padding_mask is not None:
        raise RuntimeError("fake supports keep_prob=1, no pse, no padding_mask")
    if softmax_max is None or softmax_sum is None or attention_in is None:
        raise RuntimeError("softmax_max, softmax_sum and attention_in are required")
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if t.dtype != torch.float32 or t.shape[-1] != 8:
            raise RuntimeError(f"{name} must be fp32 with a last dim of 8, got {t.dtype} {tuple(t.shape)}")
    lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
    if input_layout in ("BSND", "BNSD"):
        q, k, v = _layout_bsnd(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
        dy_, out_ = (dy, attention_in) if input_layout == "BSND" else (dy.transpose(1, 2), attention_in.transpose(1, 2))
        b, sq, n, _ = q.shape
        if tuple(softmax_max.shape) != (b, n, sq, 8):
            raise RuntimeError(f"softmax_max must be [B, N, Sq, 8] = {(b, n, sq, 8)}, got {tuple(softmax_max.shape)}")
        allowed = _allowed(atten_mask, b, n, sq, k.shape[1])
        grads = [attention_grad_fp32(q[i], k[i], v[i], dy_[i], out_[i], lse[i], scale_value,
                                     None if allowed is None else allowed[i, 0]) for i in range(b)]
        dq, dk, dv = (torch.stack([g[j] for g in grads]) for j in range(3))
        if input_layout == "BNSD":
            dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    elif input_layout == "TND":
        cq, ck = _tnd_bounds(query, key, head_num, atten_mask, actual_seq_qlen, actual_seq_kvlen)
        if tuple(softmax_max.shape) != (query.shape[0], head_num, 8):
            raise RuntimeError(f"softmax_max must be [T, N, 8], got {tuple(softmax_max.shape)}")
        grads = [attention_grad_fp32(query[cq[i]:cq[i + 1]], key[ck[i]:ck[i + 1]], value[ck[i]:ck[i + 1]],
                                     dy[cq[i]:cq[i + 1]], attention_in[cq[i]:cq[i + 1]],
                                     lse[cq[i]:cq[i + 1]].transpose(0, 1), scale_value)
                 for i in range(len(cq) - 1)]
        dq, dk, dv = (torch.cat([g[j] for g in grads]) for j in range(3))
    else:
        raise RuntimeError(f"fake supports BSND, BNSD and TND, got {input_layout!r}")
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), torch.empty(0)


def npu_rms_norm(x, gamma, epsilon=1e-6):
    calls["npu_rms_norm"] += 1
    if gamma.dtype != x.dtype or gamma.shape[-1] != x.shape[-1]:
        raise RuntimeError(f"gamma {gamma.dtype} {tuple(gamma.shape)} vs x {x.dtype} {tuple(x.shape)}")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(x, r1, r2):
    calls["npu_rotary_mul"] += 1
    if r1.shape != r2.shape or r1.shape[-1] != x.shape[-1]:
        raise RuntimeError(f"r1/r2 {tuple(r1.shape)} must match x's last dim {x.shape[-1]}")
    x1, x2 = x.chunk(2, dim=-1)
    return x * r1 + torch.cat([-x2, x1], dim=-1) * r2


npu = types.SimpleNamespace(get_device_name=lambda index=0: f"Ascend910B2 (fake {index})")
