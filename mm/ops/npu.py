"""Ascend NPU kernels (torch_npu). Imported only when the ``npu`` backend is selected (or by the contract
tests, with a fake ``torch_npu``). Same layouts and numerics as ``mm.ops.reference``.

* attention: ``torch_npu.npu_fusion_attention``. Without a key mask: layout ``BSND`` (= our BSHD). With
  one: layout ``TND`` with the valid keys packed (``mm.ops.varlen``) and ``actual_seq_qlen`` /
  ``actual_seq_kvlen`` (cumulative host lists, no leading 0), so no ``[B, 1, Sq, Sk]`` mask is ever
  materialised (it would be 1 GiB per sample at 32k tokens). The kernel's ``atten_mask`` convention is
  the opposite of ours (True = *masked*); the packed path needs no mask. ``scale`` defaults to 1.0 in
  the kernel, so it is always passed. Outputs: a tuple whose first element is the attention output.
* attention_block / attention_block_backward (ring attention): ``npu_fusion_attention`` returns
  ``(attention_out, softmax_max, softmax_sum, ...)``, fp32 statistics with 8 equal copies in the last dim
  (``[B, N, Sq, 8]`` for BSND, ``[T, N, 8]`` for TND): lse = ``softmax_max + log(softmax_sum)``. Without a bias:
  BSND. With the ring's finite key bias: TND over the packed valid keys (``mm.ops.varlen.block_key_mask``: a
  sample whose block keys are all masked attends to all of them with its lse lowered by ``MASKED_BIAS``, the
  finite bias's exact value). Backward: ``npu_fusion_attention_grad(..., softmax_max=lse, softmax_sum=1,
  attention_in=out, scale_value=scale)`` with the ring's merged out/lse (the kernel recomputes
  ``exp(s - max) / sum``), packed dK/dV scattered back with zeros at the masked keys.
* rms_norm: ``torch_npu.npu_rms_norm(x, gamma, epsilon)`` -> ``(y, rstd)``; without a weight: reference.
* apply_rope: MindSpeed's ``mindspeed.ops.npu_rotary_position_embedding.npu_rotary_position_embedding(x,
  cos, sin, mode=0)`` (rotate_half; 4-D x, cos/sin in x's dtype, ``S11D`` for the model's ``SBND``) when
  MindSpeed is installed and importable (the ops only, never its megatron adaptor), else
  ``torch_npu.npu_rotary_mul(x, cos, sin)`` (logged once). Both rotate halves of the *whole* last dim;
  our rotate-half works within each t/h/w chunk, so the last dim is permuted (all first halves, then all
  second halves), rotated in fp32 and permuted back.
* layer_norm: the reference (torch's layer_norm is a native fused NPU op).
* attention / rms_norm stay on torch_npu's operators: MindSpeed's wrappers of them
  (``mindspeed.ops.fusion_attention_v2``, its rms_norm) call the same CANN kernels.
* AdamW: torch's AdamW (foreach). ``NpuFusedAdamW`` fuses by packing all params into combined buffers,
  which megatron's distributed optimizer (per-shard fp32 state) cannot use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch
import torch_npu  # noqa: F401  (fails loudly if missing: the registry only imports this for npu)

from mm.ops import reference
from mm.ops.varlen import block_key_mask, pack_keys

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.info("npu kernels: %s", reason)


def _mindspeed_rope():
    """MindSpeed's fused RoPE if MindSpeed is installed and the op module imports, else None (reason logged)."""
    if importlib.util.find_spec("mindspeed") is None:
        _once("apply_rope: MindSpeed is not installed; torch_npu.npu_rotary_mul")
        return None
    try:
        return importlib.import_module("mindspeed.ops.npu_rotary_position_embedding").npu_rotary_position_embedding
    except ImportError as e:
        _once(f"apply_rope: mindspeed.ops.npu_rotary_position_embedding does not import ({e}); torch_npu.npu_rotary_mul")
        return None


_ms_rope = _mindspeed_rope()


def attention(q, k, v, key_mask=None, scale=None):
    b, sq, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if key_mask is None:
        return torch_npu.npu_fusion_attention(q, k, v, h, input_layout="BSND", scale=scale, keep_prob=1.0)[0]
    p = pack_keys(q, k, v, key_mask)
    # host lists are the kernel's API: the query lengths are known on the host, the key lengths cost one
    # device->host copy of B ints per call
    out = torch_npu.npu_fusion_attention(
        p.q, p.k, p.v, h, input_layout="TND", scale=scale, keep_prob=1.0,
        actual_seq_qlen=list(range(sq, (b + 1) * sq, sq)), actual_seq_kvlen=p.cu_seqlens_k[1:].tolist(),
    )[0]
    return out.view(b, sq, h, v.shape[-1])  # [B*Sq, N, D] -> [B, Sq, N, D]


def _lse(softmax_max, softmax_sum):
    """The kernel's softmax statistics (fp32, last dim 8 equal copies) -> log-sum-exp without that dim."""
    return softmax_max[..., 0] + torch.log(softmax_sum[..., 0])


def _stats(lse):
    """An lse -> (softmax_max, softmax_sum) that make the backward's ``exp(s - max) / sum`` = ``exp(s - lse)``."""
    m = lse.float().unsqueeze(-1).expand(*lse.shape, 8).contiguous()
    return m, torch.ones_like(m)


def _packed_block(q, k, v, key_bias):
    """(packed keys, lse shift [B], host lists actual_seq_qlen / actual_seq_kvlen) of a ring block's key bias."""
    b, sq = q.shape[:2]
    key_mask, shift = block_key_mask(key_bias, k)
    p = pack_keys(q, k, v, key_mask)
    return p, shift, list(range(sq, (b + 1) * sq, sq)), p.cu_seqlens_k[1:].tolist()


def attention_block(q, k, v, key_bias=None, scale=None):
    b, sq, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if key_bias is None:  # BSND: softmax_max/sum [B, N, Sq, 8]
        out, smax, ssum = torch_npu.npu_fusion_attention(q, k, v, h, input_layout="BSND", scale=scale,
                                                         keep_prob=1.0)[:3]
        return out, _lse(smax, ssum)
    p, shift, qlen, kvlen = _packed_block(q, k, v, key_bias)  # TND: softmax_max/sum [T, N, 8]
    out, smax, ssum = torch_npu.npu_fusion_attention(p.q, p.k, p.v, h, input_layout="TND", scale=scale,
                                                     keep_prob=1.0, actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)[:3]
    lse = _lse(smax, ssum).view(b, sq, h).transpose(1, 2) + shift[:, None, None]
    return out.view(b, sq, h, v.shape[-1]), lse


def attention_block_backward(dout, q, k, v, out, lse, key_bias=None, scale=None):
    b, sq, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if key_bias is None:
        smax, ssum = _stats(lse)
        return torch_npu.npu_fusion_attention_grad(
            q, k, v, dout, h, "BSND", softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=scale,
            keep_prob=1.0)[:3]
    p, shift, qlen, kvlen = _packed_block(q, k, v, key_bias)
    smax, ssum = _stats((lse - shift[:, None, None]).transpose(1, 2).reshape(b * sq, h))
    dq, dk_packed, dv_packed = torch_npu.npu_fusion_attention_grad(
        p.q, p.k, p.v, dout.reshape(b * sq, h, -1), h, "TND", softmax_max=smax, softmax_sum=ssum,
        attention_in=out.reshape(b * sq, h, -1), scale_value=scale, keep_prob=1.0, actual_seq_qlen=qlen,
        actual_seq_kvlen=kvlen)[:3]
    sk = k.shape[1]
    dk = dk_packed.new_zeros(b * sk, h, d).index_copy_(0, p.keep, dk_packed)
    dv = dv_packed.new_zeros(b * sk, h, v.shape[-1]).index_copy_(0, p.keep, dv_packed)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def rms_norm(x, weight, eps):
    if weight is None:
        _once("rms_norm without a weight: reference math (npu_rms_norm needs gamma)")
        return reference.rms_norm(x, weight, eps)
    return torch_npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


@functools.cache
def _halves_first(chunks: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index that puts every chunk's first half, then every chunk's second half; and its inverse."""
    firsts, seconds, start = [], [], 0
    for c in chunks:
        firsts += range(start, start + c // 2)
        seconds += range(start + c // 2, start + c)
        start += c
    perm = torch.tensor(firsts + seconds, device=device)
    return perm, torch.argsort(perm)


def apply_rope(x, cos, sin, chunks):
    reference.check_rope_chunks(chunks, x.shape[-1])
    perm, inv = _halves_first(tuple(chunks), x.device)
    xf = x.float().index_select(-1, perm)
    cos_p = cos.float().expand(*cos.shape[:-1], x.shape[-1]).index_select(-1, perm)
    sin_p = sin.float().expand(*sin.shape[:-1], x.shape[-1]).index_select(-1, perm)
    if _ms_rope is not None and xf.dim() == 4 and cos_p.dim() == 4:
        out = _ms_rope(xf, cos_p, sin_p, 0)  # mode 0: rotate_half
    else:
        if _ms_rope is not None:
            _once(f"apply_rope: MindSpeed's RoPE needs 4-D x and tables, got {xf.dim()}-D; torch_npu.npu_rotary_mul")
        out = torch_npu.npu_rotary_mul(xf, cos_p, sin_p)
    return out.index_select(-1, inv).to(x.dtype)


def device_name(device: torch.device) -> str:
    return torch_npu.npu.get_device_name(device.index if device.index is not None else 0)


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": rms_norm,
        "layer_norm": reference.layer_norm,
        "apply_rope": apply_rope,
        "attention_block": attention_block,
        "attention_block_backward": attention_block_backward,
    }
