"""CUDA kernels. Imported only when the ``cuda`` backend is selected (or by the contract tests, with fakes).

Same layouts and numerics as ``mm.ops.reference``; which implementation runs is decided per call from
what is installed and the inputs, and every use of a slower path is logged once with its reason.

* attention: ``MM_CUDA_ATTENTION`` = ``auto`` (default) | ``flash`` | ``sdpa``, read at import.
  ``flash``/``auto`` use FlashAttention-2 (``flash_attn``) for fp16/bf16 with head dim <= 256:
  ``flash_attn_func`` without a key mask, ``flash_attn_varlen_func`` with one (valid keys packed,
  ``cu_seqlens`` built from the mask, ``mm.ops.varlen``); other inputs take SDPA (logged). ``flash`` raises
  if flash-attn is not installed; ``auto`` then uses SDPA (logged). ``sdpa``: torch SDPA with the boolean
  ``[B, 1, 1, Sk]`` mask (cuDNN / memory-efficient kernels; = the reference). ``auto`` prefers flash
  because varlen skips the padded keys instead of computing and masking them; ``make device-check``
  measures both on the machine at hand (``attention_fwd_bwd`` rows: ``flash_*`` and ``sdpa_*``, and
  ``fastest``), so a GPU where SDPA wins is switched with ``MM_CUDA_ATTENTION=sdpa``.
* attention_block / attention_block_backward (ring attention): torch's memory-efficient attention ops
  ``aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_log_sumexp=True)`` and its
  ``_backward``, with the finite key bias as ``attn_bias`` (the cpu kernel's exact math, fully masked blocks
  included) and the ring's merged out/lse passed to the backward. flash-attn is not used here: it has no
  additive bias, and its backward entry that takes an external lse (``_flash_attn_varlen_backward``) is
  internal and changes signature between 2.x releases.
* rms_norm / layer_norm: Transformer Engine's fused norm kernels (``transformer_engine_torch``
  ``rmsnorm_fwd/bwd``, ``layernorm_fwd/bwd``, the kernels behind TE's ``RMSNorm``/``LayerNorm`` modules,
  TE >= 2.3) when TE is installed, else apex's (``apex.normalization.fused_layer_norm``), else the
  reference under ``torch.compile`` (one fused Triton kernel). TE/apex need weight/bias in the input's
  dtype (their kernels dispatch on one dtype); a mix takes the compiled reference (logged). TE's modules
  own their weight (its op fuser caches the parameter list), so the norm is an autograd function over
  TE's forward/backward kernels taking our weight; a missing weight/bias is ones/zeros (exact).
* apply_rope: TE's fused RoPE (``transformer_engine.pytorch.attention.rope.apply_rotary_pos_emb``,
  ``fused=True``, TE >= 2.3) when TE is installed and cos/sin are ``[S, 1, 1, D]`` (x ``sbhd``, the model's
  layout) or ``[1, S, 1, D]`` (x ``bshd``). TE rotates halves of the whole rotary dim, ours rotate within
  each t/h/w chunk, so TE is called once per chunk on that chunk's slice (its kernel honours strides).
  TE takes angles, not cos/sin: ``atan2(sin, cos)`` recovers them (our tables are cos/sin of one angle
  table, ``mm/models/rope.py``), TE recomputes cos/sin in fp32 and rotates in fp32 like the reference;
  results agree to fp32 rounding. Otherwise the reference under ``torch.compile``.
* AdamW: torch's fused CUDA AdamW, switched on by ``mm.training.ema_adamw.fuse_inner_optimizers`` when
  megatron built torch's AdamW (TE/apex ``FusedAdam`` are fused already).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch
from packaging.version import Version

from mm.ops import reference
from mm.ops.varlen import pack_keys

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
ATTENTION_ENV = "MM_CUDA_ATTENTION"
ATTENTION_CHOICES = ("auto", "flash", "sdpa")
TE_MIN_VERSION = Version("2.3")
_said: set[str] = set()


def _once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.info("cuda kernels: %s", reason)


def _optional(module: str):
    """The module if it is installed; a broken install (found but failing to import) raises."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    return importlib.import_module(module)


def _attention_choice() -> str:
    choice = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV} must be one of {ATTENTION_CHOICES}, got {choice!r}")
    return choice


def _transformer_engine():
    """(norm kernels module, TE_DType, rope module) from TE >= 2.3, or Nones with the reason logged."""
    te = _optional("transformer_engine")
    if te is None:
        return None, None, None
    version = getattr(te, "__version__", "0")
    if Version(version.split("+")[0]) < TE_MIN_VERSION:
        _once(f"transformer_engine {version} < {TE_MIN_VERSION}: its norm/RoPE entry points differ; not used")
        return None, None, None
    te_dtypes = importlib.import_module("transformer_engine.pytorch.constants").TE_DType
    return (importlib.import_module("transformer_engine_torch"), te_dtypes,
            importlib.import_module("transformer_engine.pytorch.attention.rope"))


ATTENTION = _attention_choice()
_flash = _optional("flash_attn")
if ATTENTION == "flash" and _flash is None:
    raise ImportError(f"{ATTENTION_ENV}=flash but flash_attn is not installed (README: NVIDIA GPUs)")
_tex, _te_dtype, _te_rope = _transformer_engine()
_apex_norm = _optional("apex.normalization.fused_layer_norm") if importlib.util.find_spec("apex") else None


# ------------------------------------------------------------------------------------------ attention
def flash_attention(q, k, v, key_mask=None, scale=None):
    """FlashAttention-2: dense without a key mask, varlen over the packed valid keys with one."""
    if key_mask is None:
        return _flash.flash_attn_func(q, k, v, softmax_scale=scale)  # BSHD natively
    b, sq, h, d = q.shape
    p = pack_keys(q, k, v, key_mask)
    # max_seqlen_k: Sk bounds every packed length; passing it avoids a device->host sync
    out = _flash.flash_attn_varlen_func(p.q, p.k, p.v, p.cu_seqlens_q, p.cu_seqlens_k, sq, k.shape[1],
                                        softmax_scale=scale)
    return out.view(b, sq, h, v.shape[-1])  # [B*Sq, H, D] -> [B, Sq, H, D]


def attention(q, k, v, key_mask=None, scale=None):
    if ATTENTION == "sdpa":
        _once(f"attention: {ATTENTION_ENV}=sdpa; torch SDPA with a boolean key mask (flash-attn not used)")
    elif _flash is None:
        _once("attention: flash_attn is not installed; torch SDPA with a boolean key mask")
    elif q.dtype not in FLASH_DTYPES:
        _once(f"attention: {q.dtype} inputs; flash-attn needs fp16/bf16, using torch SDPA")
    elif q.shape[-1] > FLASH_MAX_HEAD_DIM:
        _once(f"attention: head dim {q.shape[-1]} > {FLASH_MAX_HEAD_DIM}; flash-attn cannot, using torch SDPA")
    else:
        return flash_attention(q, k, v, key_mask, scale)
    return reference.attention(q, k, v, key_mask, scale)


def attention_impls() -> dict:
    """The attention implementations installed here, by ``MM_CUDA_ATTENTION`` name (for the timing table)."""
    return {"sdpa": reference.attention, **({"flash": flash_attention} if _flash is not None else {})}


# ------------------------------------------------------------------------------------------ ring attention block
# torch's memory-efficient attention (CUDA): the one fused kernel that takes an additive bias, returns the
# fp32 log-sum-exp and has a backward taking an external (the ring's merged) out and lse. Layouts: q/k/v
# [B, H, S, D] (BSHD transposed views; the op transposes back); bias in q's dtype, broadcastable to
# [B, H, Sq, Sk] with every stride but the last aligned to 16 elements; lse fp32 [B, H, ceil(Sq/32)*32]
# (padded to the backward's query block, kAlignLSE = 32). Module attributes so the contract tests can put
# fakes of these CUDA-only ops in their place.
_efficient_fwd = torch.ops.aten._scaled_dot_product_efficient_attention
_efficient_bwd = torch.ops.aten._scaled_dot_product_efficient_attention_backward
LSE_ALIGN, BIAS_ALIGN = 32, 16


def _efficient_bias(key_bias, q, k):
    """``[B, Sk]`` key bias -> ``[B, H, Sq, Sk]`` view in q's dtype over a row padded to BIAS_ALIGN (strides
    ``(padded Sk, 0, 0, 1)``), the layout torch's own SDPA hands this kernel."""
    if key_bias is None:
        return None
    b, sk = key_bias.shape
    row = torch.zeros(b, -(-sk // BIAS_ALIGN) * BIAS_ALIGN, dtype=q.dtype, device=q.device)
    row[:, :sk] = key_bias
    return row[:, None, None, :sk].expand(b, q.shape[2], q.shape[1], sk)


def attention_block(q, k, v, key_bias=None, scale=None):
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    out, lse, _, _ = _efficient_fwd(q_, k_, v_, _efficient_bias(key_bias, q, k), True, 0.0, False, scale=scale)
    return out.transpose(1, 2), lse[:, :, :q.shape[1]]


def attention_block_backward(dout, q, k, v, out, lse, key_bias=None, scale=None):
    b, sq, h, _ = q.shape
    lse_padded = torch.zeros(b, h, -(-sq // LSE_ALIGN) * LSE_ALIGN, dtype=torch.float32, device=q.device)
    lse_padded[:, :, :sq] = lse
    no_dropout = torch.empty((), dtype=torch.long)  # philox seed/offset: read only when dropout_p > 0
    dq, dk, dv, _ = _efficient_bwd(
        *(t.transpose(1, 2) for t in (dout, q, k, v)), _efficient_bias(key_bias, q, k), out.transpose(1, 2),
        lse_padded, no_dropout, no_dropout, 0.0, [True, True, True, False], False, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------------------------------------------------ norms
@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _fused_norm(x, *params):
    """``"te"``, ``"apex"`` or None (compiled reference), with the reason logged once."""
    lib = "te" if _tex is not None else "apex" if _apex_norm is not None else None
    if lib is None:
        _once("norms: neither Transformer Engine nor apex is installed; torch.compile'd reference norms")
        return None
    if any(p is not None and p.dtype != x.dtype for p in params):
        _once(f"norms: weight dtype differs from the input's; {lib} needs them equal, torch.compile'd reference")
        return None
    return lib


@functools.cache
def _constant(value: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype, device=device)


class _TENorm(torch.autograd.Function):
    """TE's fused RMSNorm (bias None) / LayerNorm kernels over the last dim, with our weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        otype = _te_dtype[x.dtype]
        if rms:  # zero_centered_gamma=False; no output buffer, no quantizer, sm_margin 0
            y, _, rstd = _tex.rmsnorm_fwd(x2, weight, eps, None, None, otype, 0, False)
            ctx.save_for_backward(x2, weight, rstd)
        else:
            y, mu, rstd = _tex.layernorm_fwd(x2, weight, bias, eps, None, None, otype, 0, False)
            ctx.save_for_backward(x2, weight, mu, rstd)
        ctx.rms = rms
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        if ctx.rms:
            x2, weight, rstd = ctx.saved_tensors
            dx, dw = _tex.rmsnorm_bwd(dy2, x2, rstd, weight, 0, False)
            db = None
        else:
            x2, weight, mu, rstd = ctx.saved_tensors
            dx, dw, db = _tex.layernorm_bwd(dy2, x2, mu, rstd, weight, 0, False)
        return dx.view(dy.shape), dw, db, None, None


def rms_norm(x, weight, eps):
    lib = _fused_norm(x, weight)
    shape = (x.shape[-1],)
    if lib == "te":
        w = weight if weight is not None else _constant(1.0, shape[0], x.dtype, x.device)
        return _TENorm.apply(x, w, None, eps, True)
    if lib == "apex":
        if weight is None:
            return _apex_norm.fused_rms_norm(x, shape, eps)
        return _apex_norm.fused_rms_norm_affine(x, weight, shape, eps)
    return _compiled(reference.rms_norm)(x, weight, eps)


def layer_norm(x, weight, bias, eps):
    lib = _fused_norm(x, weight, bias)
    shape = (x.shape[-1],)
    if lib == "te":
        w = weight if weight is not None else _constant(1.0, shape[0], x.dtype, x.device)
        b = bias if bias is not None else _constant(0.0, shape[0], x.dtype, x.device)
        return _TENorm.apply(x, w, b, eps, False)
    if lib == "apex" and (weight is None) == (bias is None):
        if weight is None:
            return _apex_norm.fused_layer_norm(x, shape, eps)
        return _apex_norm.fused_layer_norm_affine(x, weight, bias, shape, eps)
    if lib == "apex":
        _once("layer_norm: apex needs both or neither of weight/bias; torch.compile'd reference")
    return _compiled(reference.layer_norm)(x, weight, bias, eps)


# ------------------------------------------------------------------------------------------ rope
def _rope_format(x, cos, sin) -> str | None:
    """TE's tensor_format for x when cos/sin are one angle per (position, dim) along x's sequence axis."""
    if x.dim() != 4 or cos.shape != sin.shape or cos.dim() != 4 or cos.shape[-1] != x.shape[-1]:
        return None
    if cos.shape[1:3] == (1, 1) and cos.shape[0] == x.shape[0]:
        return "sbhd"
    if cos.shape[0] == 1 and cos.shape[2] == 1 and cos.shape[1] == x.shape[1]:
        return "bshd"
    return None


def apply_rope(x, cos, sin, chunks):
    chunks = tuple(chunks)
    reference.check_rope_chunks(chunks, x.shape[-1])
    fmt = _rope_format(x, cos, sin) if _te_rope is not None else None
    if _te_rope is None:
        _once("apply_rope: Transformer Engine is not installed; torch.compile'd reference RoPE")
    elif fmt is None:
        _once(f"apply_rope: x {tuple(x.shape)} with cos {tuple(cos.shape)} is neither sbhd with [S,1,1,D] "
              "nor bshd with [1,S,1,D] tables; torch.compile'd reference RoPE")
    if fmt is None:
        return _compiled(reference.apply_rope)(x, cos, sin, chunks)
    angles = torch.atan2(sin.float(), cos.float())
    if fmt == "bshd":
        angles = angles.transpose(0, 1)  # TE's freqs are [S, 1, 1, D] for both formats
    parts, start = [], 0
    for c in chunks:  # TE rotates halves of the whole slice it gets: one call per t/h/w chunk
        freqs = angles[..., start:start + c].contiguous()
        parts.append(_te_rope.apply_rotary_pos_emb(x[..., start:start + c], freqs, tensor_format=fmt, fused=True))
        start += c
    return torch.cat(parts, dim=-1)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def kernels() -> dict:
    return {
        "attention": attention,
        "rms_norm": rms_norm,
        "layer_norm": layer_norm,
        "apply_rope": apply_rope,
        "attention_block": attention_block,
        "attention_block_backward": attention_block_backward,
    }
