"""SUV building blocks (spec §2.3, §2.4, §2.7, §2.9, §2.10): norms, adaLN modulation, FFN,
timestep + pooled-text conditioning, patch embedding.

Attribute names follow the released key space (§2.11): ``norm1.linear``, ``norm1.norm``,
``norm1.norm_enc``, ``ff.net.0.proj``, ``ff.net.2``, ``time_text_embed.timestep_embedder.linear_1``, ...
Precision (§2.10): norms, modulation, GELU and the adaLN GEMMs run in fp32; their results are cast back to
the residual-stream dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import mm.ops
from mm.distributed.tp_layers import TPContext, column_parallel, copy_to_tp, gather_last_dim, row_parallel


class LayerNorm(nn.Module):
    """Affine LayerNorm computed in fp32 (``mm.ops.layer_norm``), result in the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mm.ops.layer_norm(x, self.weight, self.bias, self.eps)


class QKNorm(nn.Module):
    """RMSNorm over the head dim (QK-norm, spec §2.7): fp32 normalise, cast, then ``* weight``.

    Each TP rank applies the replicated weight to its own heads, so the weight's gradient is summed over
    TP inside autograd (``copy_to_tp``); it therefore needs no ``sequence_parallel`` tag and no
    ``finalize_model_grads`` help (whose QK-norm rule keys on megatron's parameter names).
    """

    def __init__(self, dim: int, eps: float, tp: TPContext, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.tp = tp
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mm.ops.rms_norm(x, copy_to_tp(self.weight, self.tp), self.eps)


def modulation(linear: nn.Module, cond: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """adaLN GEMM in fp32 (weights up-cast on the fly, spec §14.1): ``cond`` = SiLU(c) ``[B, Dt]`` fp32
    (already passed through ``copy_to_tp``) -> ``[B, n*D]`` fp32, TP shards gathered in order."""
    bias = linear.bias.float() if linear.bias is not None else None
    m = F.linear(cond, linear.weight.float(), bias)  # [B, n*D/TP]
    return gather_last_dim(m, tp)  # [B, n*D]


def modulate(x_SBE: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` in fp32 (shift/scale ``[B, E]``), cast back to x's dtype."""
    return (x_SBE.float() * (1.0 + scale[None]) + shift[None]).to(x_SBE.dtype)


def gated_add(x_SBE: torch.Tensor, gate: torch.Tensor, branch_SBE: torch.Tensor) -> torch.Tensor:
    """Residual ``x + gate * branch`` in fp32 (gate ``[B, E]``), cast back to x's dtype."""
    return (x_SBE.float() + gate[None] * branch_SBE.float()).to(x_SBE.dtype)


class AdaLayerNormZero(nn.Module):
    """``norm1`` / ``norm2``: one column-parallel ``Dt -> 6D`` linear producing
    ``(shift, scale, gate, shift_t, scale_t, gate_t)`` and the video/text LayerNorms.

    ``with_text_norm=False`` omits ``norm_enc`` (``norm2`` of the last block, whose text output is unused).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float, tp: TPContext, config, with_text_norm: bool = True):
        super().__init__()
        self.tp = tp
        self.linear = column_parallel(cond_dim, 6 * dim, bias=True, tp=tp, config=config)
        self.norm = LayerNorm(dim, eps, dtype=config.params_dtype)
        self.norm_enc = LayerNorm(dim, eps, dtype=config.params_dtype) if with_text_norm else None

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> six fp32 ``[B, D]`` chunks in the upstream order."""
        return modulation(self.linear, cond, self.tp).chunk(6, dim=-1)


class AdaNormOut(nn.Module):
    """``norm_out``: ``(shift, scale)`` from a column-parallel ``Dt -> 2D`` linear, then LayerNorm + modulation."""

    def __init__(self, dim: int, cond_dim: int, eps: float, tp: TPContext, config):
        super().__init__()
        self.tp = tp
        self.linear = column_parallel(cond_dim, 2 * dim, bias=True, tp=tp, config=config)
        self.norm = LayerNorm(dim, eps, dtype=config.params_dtype)

    def forward(self, x_SBE: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation(self.linear, cond, self.tp).chunk(2, dim=-1)
        return modulate(self.norm(x_SBE), shift, scale)


class GELUProj(nn.Module):
    """``net.0``: column-parallel ``D -> 4D`` (no bias) then GELU evaluated in fp32."""

    def __init__(self, dim: int, inner: int, approximate: str, tp: TPContext, config):
        super().__init__()
        self.approximate = approximate
        self.proj = column_parallel(dim, inner, bias=False, tp=tp, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.proj(x)  # [S, B, 4D/TP]
        return F.gelu(h.float(), approximate=self.approximate).to(h.dtype)


class FeedForward(nn.Module):
    """``ff`` / ``ff_enc``: ``net.0`` (GELUProj) -> ``net.1`` dropout -> ``net.2`` row-parallel ``4D -> D``; no biases."""

    def __init__(self, dim: int, activation_fn: str, dropout: float, tp: TPContext, config):
        super().__init__()
        approximate = "tanh" if activation_fn == "gelu-approximate" else "none"
        self.net = nn.ModuleList([
            GELUProj(dim, 4 * dim, approximate, tp, config),
            nn.Dropout(dropout),
            row_parallel(4 * dim, dim, bias=False, tp=tp, config=config),
        ])

    def forward(self, x_SBE: torch.Tensor) -> torch.Tensor:
        h = self.net[1](self.net[0](x_SBE))
        out, _ = self.net[2](h)
        return out


def timestep_sinusoid(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[B] -> [B, dim]`` fp32 ``[cos(t*w_i), sin(t*w_i)]``, ``w_i = exp(-ln(max_period) * i / (dim/2))``
    (diffusers ``Timesteps`` with flip_sin_to_cos=True, shift 0; spec §2.4). ``t`` is not rounded."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    ang = timestep.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers TimestepEmbedding / PixArt-alpha text projection)."""

    def __init__(self, in_dim: int, out_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, dtype=dtype)
        self.linear_2 = nn.Linear(out_dim, out_dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """``time_text_embed``: ``c = fp32(MLP(sinusoid(1000*sigma)) + MLP(pooled CLIP))`` ``[B, Dt]`` (spec §2.4)."""

    def __init__(self, embed_dim: int, pooled_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.timestep_embedder = MLPEmbedder(embed_dim, embed_dim, dtype=dtype)
        self.text_embedder = MLPEmbedder(pooled_dim, embed_dim, dtype=dtype)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        temb = self.timestep_embedder(timestep_sinusoid(timestep, self.embed_dim).to(dtype))
        tpool = self.text_embedder(pooled.to(dtype))
        return (temb + tpool).float()


class PatchEmbed(nn.Module):
    """``patch_embed``: frame-wise ``Conv2d(C -> D, p x p, stride p)``; ``[B, C, t, h, w] -> [t*hp*wp, B, D]``
    with token index ``s = (ti*hp + hi)*wp + wi`` (spec §2.3). No positional embedding (RoPE only)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=True, dtype=dtype)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = latents.shape
        x = latents.transpose(1, 2).reshape(B * T, C, H, W)
        x = self.proj(x.to(self.proj.weight.dtype))  # [B*t, D, hp, wp]
        D, hp, wp = x.shape[1:]
        # [(B t), D, hp, wp] -> [(t hp wp), B, D]
        return x.reshape(B, T, D, hp, wp).permute(1, 3, 4, 0, 2).reshape(T * hp * wp, B, D).contiguous()
