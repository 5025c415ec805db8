"""Joint video/text attention of one SUV block (``attn1``, spec §2.6, §2.7, §3.1, §3.2).

Projections (megatron column-parallel q/k/v, row-parallel out-projections: TP splits whole heads),
QK RMSNorm, 3-D RoPE on the video stream, skiparse regrouping of the video tokens into ``k`` extra batch
entries with the text replicated ``k`` times, one ``mm.ops.attention`` call with a ``[B', Sk]`` key-padding
mask (never an ``S x S`` mask), inverse regrouping and the mean of the ``k`` text outputs.

Layouts: the block runs sequence-first ``[S, B, E]``; under sequence parallelism the block's inputs are
sequence shards and the column-parallel projections all-gather the sequence, so attention always sees the
full sequences with this rank's heads.

Context parallelism (spec §3.3, ``mm.distributed.context_parallel``): when ``ctx.cp`` has size > 1 the
block's inputs are this CP rank's chunks of the (padded) sequences. Ulysses (over ``cp.ulysses``): an
all-to-all turns each projection ``[S/CP, B, nh/TP, hd]`` into ``[S/R, B, nh/(TP*U), hd]`` (R = ring size,
U = Ulysses size), and the inverse all-to-all runs on both outputs before the out-projections. Ring (over
``cp.ring``, R > 1): the rank's contiguous chunk regroups into pieces of the skiparse sub-sequences (the
padding keeps every chunk a multiple of k^2), and ``ring_attention`` circulates the joint
``[video piece ; text chunk]`` K/V blocks with one key bias per source rank. ``ctx.cos`` / ``ctx.sin`` are
the RoPE tables of the chunk this rank attends with; masks are sliced from the full-sequence ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

import mm.ops
from mm.distributed.context_parallel import CPContext, heads_to_seq, seq_to_heads
from mm.distributed import skiparse_cp
from mm.distributed.ring_attention import ring_attention
from mm.distributed.tp_layers import TPContext, column_parallel, row_parallel
from mm.models import skiparse
from mm.models.layers import QKNorm


@dataclass
class AttentionContext:
    """Per-forward inputs shared by every block: RoPE tables and the key-validity masks.

    ``video_keep`` ``[B, Lv]`` / ``text_keep`` ``[B, Lt]`` bool (True = valid) or None (all valid). Key masks
    (per (k, pattern)) and the skiparse-CP RoPE tables (per layout) are built once and cached for the rest of
    the forward (every block of the same kind reuses them). ``video_len`` / ``text_len`` and
    the masks are for the full (CP-padded) sequences, also under context parallelism (``cp``: the CP group,
    or None / size 1 for none); the RoPE tables are those of the chunk this rank attends with (the full
    sequence unless a ring runs).
    """

    cos: torch.Tensor  # [Lv, 1, 1, hd] fp32
    sin: torch.Tensor
    chunks: tuple[int, int, int]
    video_len: int
    text_len: int
    video_keep: torch.Tensor | None = None
    text_keep: torch.Tensor | None = None
    cp: CPContext | None = None
    full_cos: torch.Tensor | None = None  # [Lv', 1, 1, hd] tables of the whole padded sequence (skiparse CP)
    full_sin: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def key_mask(self, k: int, group: bool, batch: int, device) -> torch.Tensor | None:
        """``[k*B, L'/k + Lt]`` bool (True = attend), or None when every key is valid."""
        if self.video_keep is None and self.text_keep is None and skiparse.padded_length(self.video_len, k) == self.video_len:
            return None
        key = (k, group if k > 1 else False)
        if key not in self._cache:
            v = self.video_keep
            if v is None:
                v = torch.ones(batch, self.video_len, dtype=torch.bool, device=device)
            t = self.text_keep
            if t is None:
                t = torch.ones(batch, self.text_len, dtype=torch.bool, device=device)
            self._cache[key] = skiparse.key_padding_mask(v, t, k, group)
        return self._cache[key]

    def subsequence_rope(self, layout: skiparse_cp.Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Skiparse CP: cos, sin ``[Lv'/CP, 1, 1, hd]`` of the tokens this rank holds under ``layout``, gathered
        from the full-sequence tables. Built once per forward and layout: the token index is a host tensor, and
        moving it to an accelerator is a blocking copy (a host sync), which must not happen in every block."""
        key = ("rope", layout)
        if key not in self._cache:
            ids = skiparse_cp.global_ids(self.video_len, self.cp.size, layout)[self.cp.rank].to(self.full_cos.device)
            self._cache[key] = (self.full_cos.index_select(0, ids), self.full_sin.index_select(0, ids))
        return self._cache[key]

    def ring_key_biases(self, k: int, group: bool, batch: int, ring: int, device) -> list:
        """One additive key bias ``[k*B, L'/(k*R) + Lt/R]`` per ring rank (0 = attend, ``MASKED_BIAS``): the
        keys of that rank's joint block ``[video sub-sequence piece ; text chunk]``, sliced from the full
        mask (so the "no valid key at all" rule of ``key_padding_mask`` holds over the whole ring)."""
        from mm.ops.reference import MASKED_BIAS

        mask = self.key_mask(k, group, batch, device)
        if mask is None:
            return [None] * ring
        key = ("ring", k, group if k > 1 else False, ring)
        if key not in self._cache:
            lv, lt = skiparse.padded_length(self.video_len, k) // k // ring, self.text_len // ring
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, MASKED_BIAS)
            bias_v, bias_t = bias[:, :lv * ring], bias[:, lv * ring:]  # [kB, L'/k], [kB, Lt]
            self._cache[key] = [torch.cat([bias_v[:, j * lv:(j + 1) * lv], bias_t[:, j * lt:(j + 1) * lt]], dim=1)
                                for j in range(ring)]
        return self._cache[key]


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qt: torch.Tensor | None,
    kt: torch.Tensor,
    vt: torch.Tensor,
    *,
    sparse_k: int,
    group: bool,
    key_mask: torch.Tensor | None,
    scale: float,
    attend=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Skiparse joint attention.

    video ``q, k, v`` ``[Lv, B, H, hd]``, text ``qt, kt, vt`` ``[Lt, B, H, hd]`` (``qt=None``: no text
    queries, the text output is not needed) -> video out ``[Lv, B, H, hd]``, text out ``[Lt, B, H, hd]`` or None.
    Per sub-batch the sequence is ``[video sub-sequence (L'/k) ; text (Lt)]``. ``attend(q, k, v)`` replaces
    the ``mm.ops.attention`` call (ring attention passes its own; ``key_mask`` is then unused).
    """
    Lv, B = q.shape[:2]
    Lt = kt.shape[0]

    def joint(video, text):  # -> [k*B, L'/k + Lt, H, hd], one copy; text replicated, batch index r*B + b
        if sparse_k == 1:
            return torch.cat([video, text], dim=0).transpose(0, 1)
        v = skiparse.to_batch_view(video, sparse_k, group)  # [k, B, L'/k, H, hd] (strided view)
        t = text.transpose(0, 1).expand(sparse_k, *text.transpose(0, 1).shape)  # [k, B, Lt, H, hd] (no copy)
        return torch.cat([v, t], dim=2).flatten(0, 1)

    Lsub = skiparse.padded_length(Lv, sparse_k) // sparse_k
    k_all, v_all = joint(k, kt), joint(v, vt)
    q_all = joint(q, qt) if qt is not None else skiparse.to_batch(q, sparse_k, group)
    if attend is None:
        out = mm.ops.attention(q_all, k_all, v_all, key_mask=key_mask, scale=scale)  # [k*B, Sq, H, hd]
    else:
        out = attend(q_all, k_all, v_all)

    out_v = skiparse.from_batch(out[:, :Lsub], sparse_k, group, Lv)  # [Lv, B, H, hd]
    if qt is None:
        return out_v, None
    out_t = out[:, Lsub:]  # [k*B, Lt, H, hd]
    if sparse_k > 1:  # mean over the k replicas of each sample (fp32)
        out_t = out_t.reshape(sparse_k, B, Lt, *out_t.shape[2:]).float().mean(0).to(out.dtype)
    return out_v, out_t.transpose(0, 1)


class JointAttention(nn.Module):
    """``attn1``. ``context_pre_only`` (the model's last block): the text output is unused, so
    ``to_add_out`` is omitted and no text queries are computed; ``add_q_proj`` / ``norm_added_q`` are kept for
    the released key space but frozen (they cannot receive a gradient)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, bias: bool, eps: float, dropout: float,
                 tp: TPContext, config, context_pre_only: bool = False):
        super().__init__()
        if num_heads % tp.size:
            raise ValueError(f"num_heads={num_heads} is not divisible by the TP size {tp.size}")
        self.head_dim = head_dim
        self.local_heads = num_heads // tp.size
        self.context_pre_only = context_pre_only
        dtype = config.params_dtype
        # insertion order as upstream (irrelevant for loading)
        self.norm_q = QKNorm(head_dim, eps, tp, dtype)
        self.norm_k = QKNorm(head_dim, eps, tp, dtype)
        self.to_q = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.to_k = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.to_v = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.add_k_proj = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.add_v_proj = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.add_q_proj = column_parallel(dim, dim, bias=bias, tp=tp, config=config)
        self.to_out = nn.ModuleList([row_parallel(dim, dim, bias=True, tp=tp, config=config), nn.Dropout(dropout)])
        self.to_add_out = None if context_pre_only else row_parallel(dim, dim, bias=True, tp=tp, config=config)
        self.norm_added_q = QKNorm(head_dim, eps, tp, dtype)
        self.norm_added_k = QKNorm(head_dim, eps, tp, dtype)
        if context_pre_only:
            for p in (*self.add_q_proj.parameters(), *self.norm_added_q.parameters()):
                p.requires_grad_(False)

    def _heads(self, linear: nn.Module, x_SBE: torch.Tensor) -> torch.Tensor:
        out, _ = linear(x_SBE)  # [S, B, H_local*hd] (full sequence under SP)
        return out.view(*out.shape[:2], self.local_heads, self.head_dim)

    def forward(self, x_SBE: torch.Tensor, y_SBE: torch.Tensor, ctx: AttentionContext, sparse_k: int,
                group: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """video ``[Sv, B, D]``, text ``[St, B, D]`` (sequence shards under SP / CP) -> (video, text or None)."""
        cp = ctx.cp if ctx.cp is not None else CPContext.single()
        layout = skiparse_cp.block_layout(sparse_k, group, cp)
        if layout != skiparse_cp.CHUNK:
            return self._subsequences_local(x_SBE, y_SBE, ctx, layout)
        uly, ring = cp.ulysses, cp.ring
        if self.local_heads % uly.size:
            raise ValueError(f"num_heads/TP = {self.local_heads} is not divisible by the Ulysses degree {uly.size}")

        def heads(linear, x):  # Ulysses: scatter heads, gather the sequence of this ring rank
            return seq_to_heads(self._heads(linear, x), uly)

        q = self.norm_q(heads(self.to_q, x_SBE))
        k = self.norm_k(heads(self.to_k, x_SBE))
        v = heads(self.to_v, x_SBE)
        q = mm.ops.apply_rope(q, ctx.cos, ctx.sin, ctx.chunks)
        k = mm.ops.apply_rope(k, ctx.cos, ctx.sin, ctx.chunks)
        kt = self.norm_added_k(heads(self.add_k_proj, y_SBE))
        vt = heads(self.add_v_proj, y_SBE)
        qt = None if self.context_pre_only else self.norm_added_q(heads(self.add_q_proj, y_SBE))

        B, scale = q.shape[1], self.head_dim ** -0.5
        attend = mask = None
        if ring.size > 1:  # K/V blocks of the ring ranks' chunks circulate; one key bias per source rank
            biases = ctx.ring_key_biases(sparse_k, group, B, ring.size, q.device)
            attend = lambda q_, k_, v_: ring_attention(q_, k_, v_, biases, scale, ring.group)  # noqa: E731
        else:
            mask = ctx.key_mask(sparse_k, group, B, q.device)
        out_v, out_t = joint_attention(q, k, v, qt, kt, vt, sparse_k=sparse_k, group=group, key_mask=mask,
                                       scale=scale, attend=attend)
        # Ulysses: scatter the sequence, gather the heads back
        out_v = heads_to_seq(out_v, uly)
        out_t = heads_to_seq(out_t, uly) if out_t is not None else None
        return self._out(out_v, out_t)

    def _subsequences_local(self, x_SBE, y_SBE, ctx: AttentionContext, layout) -> tuple:
        """Skiparse CP (``mm.distributed.skiparse_cp``): ``x_SBE`` holds this rank's whole sub-sequences
        ``[k/CP * L'/k, B, D]`` (sub-sequence major), ``y_SBE`` its caption chunk ``[Lt'/CP, B, D]``. Video
        attention is local; the caption keys/values/queries are all-gathered over CP and the sum of the
        caption outputs over the k sub-sequences is reduce-scattered back to the chunks (then / k)."""
        cp, k = ctx.cp, layout.k
        cos, sin = ctx.subsequence_rope(layout)
        q = mm.ops.apply_rope(self.norm_q(self._heads(self.to_q, x_SBE)), cos, sin, ctx.chunks)
        k_ = mm.ops.apply_rope(self.norm_k(self._heads(self.to_k, x_SBE)), cos, sin, ctx.chunks)
        v = self._heads(self.to_v, x_SBE)
        kt = skiparse_cp.gather_text(self.norm_added_k(self._heads(self.add_k_proj, y_SBE)), cp)  # [Lt', B, H, hd]
        vt = skiparse_cp.gather_text(self._heads(self.add_v_proj, y_SBE), cp)
        qt = None
        if not self.context_pre_only:
            qt = skiparse_cp.gather_text(self.norm_added_q(self._heads(self.add_q_proj, y_SBE)), cp)
        n, B = q.shape[:2]
        local, Lsub, Lt = k // cp.size, n // (k // cp.size), kt.shape[0]

        def joint(video, text):  # [local*Lsub, B, H, hd] + [Lt, B, H, hd] -> [local*B, Lsub + Lt, H, hd]
            v_ = video.reshape(local, Lsub, B, *video.shape[2:]).transpose(1, 2)
            t_ = text.transpose(0, 1).expand(local, *text.transpose(0, 1).shape)
            return torch.cat([v_, t_], dim=2).flatten(0, 1)

        mask = ctx.key_mask(k, layout.group, B, q.device)  # rows r*B + b of all k sub-sequences
        if mask is not None:
            mask = mask[cp.rank * local * B:(cp.rank + 1) * local * B]
        q_all = joint(q, qt) if qt is not None else q.reshape(local, Lsub, B, *q.shape[2:]).transpose(1, 2).flatten(0, 1)
        out = mm.ops.attention(q_all, joint(k_, kt), joint(v, vt), key_mask=mask, scale=self.head_dim ** -0.5)
        out_v = out[:, :Lsub].reshape(local, B, Lsub, *out.shape[2:]).transpose(1, 2).reshape(n, B, *out.shape[2:])
        out_t = None
        if qt is not None:  # mean over the k sub-sequences of each sample: local fp32 sum, CP reduce-scatter, / k
            part = out[:, Lsub:].reshape(local, B, Lt, *out.shape[2:]).float().sum(0).transpose(0, 1)
            out_t = (skiparse_cp.reduce_scatter_text(part, cp) / k).to(out.dtype)  # [Lt'/CP, B, H, hd]
        return self._out(out_v, out_t)

    def _out(self, out_v: torch.Tensor, out_t: torch.Tensor | None) -> tuple:
        # [L, B, H, hd] -> [L, B, H*hd]; row-parallel out-projections (reduce-scatter the sequence under SP)
        a, _ = self.to_out[0](out_v.reshape(*out_v.shape[:2], -1))
        a = self.to_out[1](a)
        if out_t is None:
            return a, None
        at, _ = self.to_add_out(out_t.reshape(*out_t.shape[:2], -1))
        return a, at
