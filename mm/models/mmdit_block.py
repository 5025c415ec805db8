"""One SUV block (``SparseMMDiTBlock``, spec §2.7): adaLN modulation (6 chunks, fp32), joint skiparse
attention, separate video/text FFNs (double_ff), gated fp32 residuals.

The forward is split into :meth:`attention_part` and :meth:`ffn_part` so activation checkpointing can be
applied from outside to either half (upstream's "selective recompute" unit is the FFN half).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mm.distributed.tp_layers import TPContext, mark_sequence_parallel
from mm.models.attention import AttentionContext, JointAttention
from mm.models.layers import AdaLayerNormZero, FeedForward, gated_add, modulate
from mm.models.suv_config import SUVConfig

FP16_MAX = 65504.0


def _sanitize_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 inference only (spec §2.7): NaN -> 0, +-inf -> +-65504, clamp. No-op for other dtypes."""
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)


class SparseMMDiTBlock(nn.Module):
    """``transformer_blocks.<stage>.<block>``. ``sparse_k`` / ``group_skip`` are run-time settings (no weights).

    ``context_pre_only`` (the last block of the model): its text output is unused, so ``attn1.to_add_out``,
    ``norm2.norm_enc`` and ``ff_enc`` are omitted and the text residual updates are skipped (spec §2.7).
    """

    def __init__(self, cfg: SUVConfig, tp: TPContext, config, *, group_skip: bool, sparse_k: int = 1,
                 context_pre_only: bool = False):
        super().__init__()
        D, Dt, eps = cfg.hidden_size, cfg.timestep_embed_dim, cfg.norm_eps
        self.context_pre_only = context_pre_only
        self.group_skip = group_skip
        self.sparse_k = sparse_k
        self.norm1 = AdaLayerNormZero(D, Dt, eps, tp, config)
        self.attn1 = JointAttention(D, cfg.num_heads, cfg.head_dim, bias=cfg.attention_bias, eps=eps,
                                    dropout=cfg.dropout, tp=tp, config=config, context_pre_only=context_pre_only)
        self.norm2 = AdaLayerNormZero(D, Dt, eps, tp, config, with_text_norm=not context_pre_only)
        self.ff = FeedForward(D, cfg.activation_fn, cfg.dropout, tp, config)
        self.ff_enc = None if context_pre_only else FeedForward(D, cfg.activation_fn, cfg.dropout, tp, config)
        # These LayerNorms see sequence shards under SP: TP-sum their grads (finalize_model_grads).
        for norm in (self.norm1.norm, self.norm1.norm_enc, self.norm2.norm, self.norm2.norm_enc):
            if norm is not None:
                mark_sequence_parallel(norm, tp)

    def attention_part(self, x_SBE: torch.Tensor, y_SBE: torch.Tensor, cond: torch.Tensor,
                       ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        x_SBE, y_SBE = _sanitize_fp16(x_SBE), _sanitize_fp16(y_SBE)
        sh, sc, g, sh_t, sc_t, g_t = self.norm1(cond)
        xn = modulate(self.norm1.norm(x_SBE), sh, sc)
        yn = modulate(self.norm1.norm_enc(y_SBE), sh_t, sc_t)
        a, a_t = self.attn1(xn, yn, ctx, self.sparse_k, self.group_skip)
        x_SBE = gated_add(x_SBE, g, a)
        if a_t is not None:
            y_SBE = gated_add(y_SBE, g_t, a_t)
        return x_SBE, y_SBE

    def ffn_part(self, x_SBE: torch.Tensor, y_SBE: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_SBE, y_SBE = _sanitize_fp16(x_SBE), _sanitize_fp16(y_SBE)
        sh, sc, g, sh_t, sc_t, g_t = self.norm2(cond)
        x_SBE = gated_add(x_SBE, g, self.ff(modulate(self.norm2.norm(x_SBE), sh, sc)))
        if not self.context_pre_only:
            y_SBE = gated_add(y_SBE, g_t, self.ff_enc(modulate(self.norm2.norm_enc(y_SBE), sh_t, sc_t)))
        return x_SBE, y_SBE

    def forward(self, x_SBE: torch.Tensor, y_SBE: torch.Tensor, cond: torch.Tensor,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """video ``[Lv(/TP), B, D]``, text ``[Lt(/TP), B, D]``, ``cond`` = SiLU(c) ``[B, Dt]`` fp32 -> (video, text)."""
        x_SBE, y_SBE = self.attention_part(x_SBE, y_SBE, cond, ctx)
        return self.ffn_part(x_SBE, y_SBE, cond)
