"""Fake ``torch_npu``: the operators ``mm/ops/npu.py`` calls, per the Ascend torch_npu API reference.

* ``npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
  atten_mask=None, scale=1.0, keep_prob=1.0, ..., actual_seq_qlen=None, actual_seq_kvlen=None,
  sparse_mode=0, ...)`` -> 7-tuple ``(attention_out, softmax_max, softmax_sum, softmax_in, seed, offset,
  numels)``. Layouts: ``BSND``, ``BNSD``, ``TND`` (packed; ``actual_seq_qlen``/``actual_seq_kvlen`` are
  *cumulative host lists without a leading 0*). ``atten_mask`` is bool with **True = masked** (does not take
  part), shape ``[B, 1, Sq, Sk]``, ``[B, N, Sq, Sk]``, ``[1, 1, Sq, Sk]`` or ``[Sq, Sk]``. ``scale`` defaults to
  **1.0**. fp16/bf16 inputs (fp32 accepted here so fp32 parity can be tested).
* ``npu_rms_norm(x, gamma, epsilon=1e-6)`` -> ``(y, rstd)``; gamma in x's dtype.
* ``npu_rotary_mul(x, r1, r2)`` = ``x * r1 + rotate_half(x) * r2``, rotate-half over the *whole* last dim.
* ``npu.get_device_name(index)``.

``MASK_TRUE_MEANS`` exists so a test can flip the polarity and prove that the contract tests notice.
"""

import types

import torch

from fakes_math import attention_fp32

__version__ = "2.99.0+fake"
MASK_TRUE_MEANS = "masked"
calls = {"npu_fusion_attention": [], "npu_rms_norm": 0, "npu_rotary_mul": 0}


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


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    calls["npu_fusion_attention"].append(input_layout)
    if keep_prob != 1.0 or pse is not None or padding_mask is not None:
        raise RuntimeError("fake supports keep_prob=1, no pse, no padding_mask")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("query/key/value dtypes differ")
    if input_layout in ("BSND", "BNSD"):
        if actual_seq_qlen is not None or actual_seq_kvlen is not None:
            raise RuntimeError("actual_seq_qlen/kvlen are for the TND layout")
        q, k, v = (query, key, value) if input_layout == "BSND" else (t.transpose(1, 2) for t in (query, key, value))
        b, sq, n, d = q.shape
        if n != head_num:
            raise RuntimeError(f"head_num={head_num} but the {input_layout} input has N={n}")
        allowed = _allowed(atten_mask, b, n, sq, k.shape[1])
        out = torch.stack([attention_fp32(q[i], k[i], v[i], scale,
                                          None if allowed is None else allowed[i, 0]) for i in range(b)])
        if allowed is not None and not bool((allowed == allowed[:, :1]).all()):
            raise RuntimeError("fake: per-head masks are not modelled")
        out = out if input_layout == "BSND" else out.transpose(1, 2)
    elif input_layout == "TND":
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
        out = torch.cat([attention_fp32(query[cq[i]:cq[i + 1]], key[ck[i]:ck[i + 1]], value[ck[i]:ck[i + 1]], scale)
                         for i in range(len(cq) - 1)])
    else:
        raise RuntimeError(f"fake supports BSND, BNSD and TND, got {input_layout!r}")
    empty = torch.empty(0)
    return out.to(query.dtype), empty, empty, empty, 0, 0, 0


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
