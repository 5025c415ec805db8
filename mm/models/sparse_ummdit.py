"""SUV: the Sparse U-shaped MMDiT denoiser of Open-Sora Plan v1.5 (spec §2, §3.2, §10).

Patchify -> conditioning (timestep + pooled CLIP) and caption projection -> (SP scatter) -> encoder stages
push long skips -> middle stage -> decoder stages pop and fuse them -> two-LayerNorm output head ->
(SP gather) -> ``proj_out`` -> unpatchify. Everything between the scatter and the gather runs
sequence-first ``[S, B, E]``. Under context parallelism (spec §3.3, Ulysses / ring / hybrid) the flattened
video and caption token sequences are padded with masked tokens and split over the CP group after the
embeddings, attention gathers what it needs (``mm.distributed.context_parallel``), and the output tokens are
all-gathered at the end.

Parameter names are the released key space (§2.11): one key set for every TP size (the last block's dead
text modules are omitted; they and megatron's ``_extra_state`` entries are dropped on load, every other
key is strict). Tensor parallelism uses megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear``
(also at TP = 1); the TP group, the SP flag and the CP group are handed in through a ``ParallelState``.

Public API::

    model = SparseUMMDiT.from_upstream(config, checkpoint=None, device=None)   # one process, fp32, eval
    model = SparseUMMDiT(SUVConfig(...), parallel_state_or_None, params_dtype=torch.bfloat16)
    out = model(latents, timestep, text_hidden, text_mask, pooled, video_mask=None)
    load_upstream_state_dict(model, full_state_dict)        # full (TP-merged) dict -> this rank's shards
    full = gather_upstream_state_dict(model)                 # this rank's shards -> full released key space
    model.set_sparsity([1, 2, 4, 8, 4, 2, 1]); model.set_sparsity(dense=True)

Pipeline chunks (``mm.distributed.pipeline`` builds them and packs what crosses a stage boundary)::

    chunk = SparseUMMDiT(config, parallel, block_range=(b0, b1), pipeline_replica=i)
    state = chunk(latents, timestep, text_hidden, text_mask, pooled, video_mask, stage_input=state_in)

A chunk holds the global blocks ``[b0, b1)`` under their released names, the replicated conditioning
embedder ``time_text_embed``, the long-skip merges of the decoder stages that start inside it, patchify and
the caption projection if it is first (``pre_process``), the output head if it is last (``post_process``).
It takes a :class:`StageState` (the two streams and the live skips) unless it is first and returns one
unless it is last. Conditioning, masks and RoPE are recomputed from the micro-batch on every chunk.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mm.distributed import skiparse_cp
from mm.distributed.context_parallel import CPContext, gather_output, pad_seq, padded_lengths, split_input
from mm.distributed.tp_layers import (
    TPContext,
    allreduce_sequence_parallel_grads,
    build_megatron_config,
    copy_to_tp,
    gather_sequence,
    mark_sequence_parallel,
    scatter_sequence,
)
from mm.models.attention import AttentionContext
from mm.models.layers import AdaNormOut, LayerNorm, PatchEmbed, TimestepTextEmbedding
from mm.models.mmdit_block import SparseMMDiTBlock
from mm.models.rope import rope_chunks, rope_tables
from mm.models.suv_config import SUVConfig, released_suv_config, tiny_suv_config

__all__ = [
    "SUVConfig",
    "SparseUMMDiT",
    "StageState",
    "block_positions",
    "live_skips_at",
    "released_suv_config",
    "tiny_suv_config",
    "tp_split_dim",
    "normalize_upstream_state_dict",
    "split_tp_state_dict",
    "merge_tp_state_dicts",
    "load_upstream_state_dict",
    "gather_upstream_state_dict",
    "load_upstream_checkpoint",
    "allreduce_sequence_parallel_grads",
]

EXTRA_STATE_SUFFIX = "_extra_state"
# Modules of the last block that upstream instantiates only at TP > 1 and never uses (spec §2.7, §12.2).
DEAD_LAST_BLOCK_MODULES = ("attn1.to_add_out.", "norm2.norm_enc.", "ff_enc.")

# TP split rules of the released key space (spec §10.1): key suffix -> split dim.
_COLUMN_SUFFIXES = tuple(
    f"attn1.{m}.{p}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    for p in ("weight", "bias")
) + ("net.0.proj.weight", "net.0.proj.bias", ".linear.weight", ".linear.bias")
_ROW_SUFFIXES = ("attn1.to_out.0.weight", "attn1.to_add_out.weight", "net.2.weight")


@dataclass
class StageState:
    """What crosses a pipeline-stage boundary: video ``x [Lv', B, D]``, text ``y [Lt', B, D]`` (this rank's
    SP/CP chunks) and the live long skips ``[(xs, ys), ...]`` (oldest first, the stack's order)."""

    x: torch.Tensor
    y: torch.Tensor
    skips: list


def block_positions(cfg: SUVConfig) -> list[tuple[int, int]]:
    """Global block index -> (U stage, index in the stage), spec §2.8 order."""
    return [(s, i) for s, n in enumerate(cfg.num_layers) for i in range(n)]


def live_skips_at(cfg: SUVConfig, boundary: int) -> int:
    """Long skips alive between global blocks ``boundary - 1`` and ``boundary``: an encoder stage pushes after
    its last block, a decoder stage pops before its first block."""
    mid, start, live = cfg.num_stages // 2, 0, 0
    for s, n in enumerate(cfg.num_layers):
        if s < mid and start + n <= boundary:
            live += 1
        if s > mid and start < boundary:
            live -= 1
        start += n
    return live


class IndexedModules(nn.Module):
    """A ``ModuleList`` that may hold only some of its indices, each under its global index name (a pipeline
    chunk keeps ``transformer_blocks.3.1`` named so). Indexing is by that index; iteration is in index order."""

    def __init__(self, modules: Mapping[int, nn.Module]):
        super().__init__()
        for i in sorted(modules):
            self.add_module(str(i), modules[i])

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __contains__(self, index: int) -> bool:
        return str(index) in self._modules

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class SparseUMMDiT(nn.Module):
    """The SUV denoiser. ``parallel=None`` builds a TP = 1 model that needs no process group.

    ``model.config`` is the megatron ``TransformerConfig`` (what megatron DDP / ``finalize_model_grads``
    read); ``model.suv_config`` the :class:`SUVConfig`. Under SP, replicated parameters fed by sequence
    shards carry ``sequence_parallel = True``; QK-norm weights reduce their grads inside autograd.
    """

    def __init__(self, config: SUVConfig, parallel=None, params_dtype: torch.dtype = torch.float32, *,
                 device: torch.device | str | None = None, block_range: tuple[int, int] | None = None,
                 pipeline_replica: int = 0, init_seed: int | None = None):
        super().__init__()
        from mm.ops import current_backend

        current_backend()  # megatron must be patched (cpu/npu) before it is imported
        if not isinstance(config, SUVConfig):
            raise ValueError(f"config must be an SUVConfig, got {type(config).__name__} (use SUVConfig.from_upstream)")
        self.suv_config = cfg = config
        b0, b1 = block_range if block_range is not None else (0, cfg.num_blocks)
        if not 0 <= b0 < b1 <= cfg.num_blocks:
            raise ValueError(f"block_range={block_range!r}: allowed 0 <= first < end <= {cfg.num_blocks} blocks")
        self.block_range = (b0, b1)
        self.pre_process, self.post_process = b0 == 0, b1 == cfg.num_blocks
        # index of this chunk among all pipeline chunks: which copy of the replicated embedder saves and counts
        self.pipeline_replica = pipeline_replica
        # init_seed: every module draws its initial weights from its own stream (seed, module), so a pipeline
        # chunk is initialised exactly like the same modules of the whole model; None: the global stream
        self.init_seed = init_seed
        self.tp = tp = TPContext.from_parallel_state(parallel)
        self.cp = cp = CPContext.from_parallel_state(parallel)
        if cp.skiparse:  # its blocks that cannot keep whole sub-sequences: Ulysses if the heads allow, else ring
            self.cp = cp = cp.with_ulysses_size(cp.size if cfg.num_heads % (tp.size * cp.size) == 0 else 1)
        cfg.validate_tp(tp.size)
        if cfg.num_heads % (tp.size * cp.ulysses.size):
            raise ValueError(f"num_heads={cfg.num_heads} is not divisible by TP x Ulysses-CP = {tp.size} x "
                             f"{cp.ulysses.size} (Ulysses context parallelism splits the heads of each TP rank; "
                             "ring attention, --context-parallel-algo megatron_cp_algo, does not)")
        device = torch.device(device) if device is not None else None
        on_meta = device is not None and device.type == "meta"
        self.config = build_megatron_config(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                                            num_layers=cfg.num_blocks, tp=tp, params_dtype=params_dtype,
                                            perform_initialization=not on_meta)
        self.params_dtype = params_dtype
        with torch.device("meta") if on_meta else torch.device("cpu"):
            self._build(cfg, tp, params_dtype)
        if device is not None and not on_meta and device.type != "cpu":
            self.to(device)
        self.set_sparsity()
        self._rope_cache: dict = {}
        self.register_state_dict_post_hook(_drop_extra_state_hook)

    def _build(self, cfg: SUVConfig, tp: TPContext, dtype: torch.dtype) -> None:
        D, Dt, eps = cfg.hidden_size, cfg.timestep_embed_dim, cfg.norm_eps
        p = cfg.patch_size
        b0, b1 = self.block_range
        seeded = self._init_stream
        if self.pre_process:
            with seeded(1):
                self.patch_embed = PatchEmbed(cfg.patch_in_channels, D, p, dtype=dtype)
        with seeded(2):
            self.time_text_embed = TimestepTextEmbedding(Dt, cfg.pooled_projection_dim, dtype=dtype)
        if self.pre_process:
            with seeded(3):
                self.caption_projection = nn.Linear(cfg.caption_channels, D, dtype=dtype)
        last = (cfg.num_stages - 1, cfg.num_layers[-1] - 1)
        held = block_positions(cfg)[b0:b1]
        blocks: list[dict] = [{} for _ in cfg.num_layers]
        for b, (s, i) in enumerate(held, start=b0):
            with seeded(1000 + b):
                blocks[s][i] = SparseMMDiTBlock(cfg, tp, self.config, group_skip=i % 2 == 1,
                                                context_pre_only=(s, i) == last)
        self.transformer_blocks = nn.ModuleList(IndexedModules(stage) for stage in blocks)
        # the merge of decoder stage mid+1+j lives with that stage's first block
        mid = cfg.num_stages // 2
        merges = [j for j in range(cfg.num_stages // 2) if (mid + 1 + j, 0) in held]
        with seeded(4):
            self.skip_norm_linear = IndexedModules({j: self._skip_module(cfg, dtype) for j in merges})
        with seeded(5):
            self.skip_norm_linear_enc = IndexedModules({j: self._skip_module(cfg, dtype) for j in merges})
        seq_parallel = [*self.skip_norm_linear, *self.skip_norm_linear_enc]
        if self.post_process:
            with seeded(6):
                self.norm_final = LayerNorm(D, eps, dtype=dtype)
                self.norm_out = AdaNormOut(D, Dt, eps, tp, self.config)
                self.proj_out = nn.Linear(D, cfg.patch_size_t * p * p * cfg.out_channels, dtype=dtype)
            seq_parallel += [self.norm_final, self.norm_out.norm]
        # Replicated modules that see sequence shards under SP: TP-sum their grads.
        for m in seq_parallel:
            mark_sequence_parallel(m, tp)

    @contextlib.contextmanager
    def _init_stream(self, module_id: int):
        """With ``init_seed``: build under the CPU generator seeded for this module (restored afterwards)."""
        if self.init_seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed * 100_003 + module_id)
            yield

    @staticmethod
    def _skip_module(cfg: SUVConfig, dtype) -> nn.Sequential:
        """Long-skip merge ``[x ; x_skip] (2D) -> D``: ``.0`` Identity (zero-init) or LayerNorm(2D), ``.1`` Linear."""
        D = cfg.hidden_size
        linear = nn.Linear(2 * D, D, dtype=dtype)
        if cfg.skip_connection_zero_init:
            with torch.no_grad():  # [I | 0], bias 0: identity on the current stream at init
                linear.weight.zero_()
                linear.weight[:, :D].copy_(torch.eye(D, dtype=dtype))
                linear.bias.zero_()
            return nn.Sequential(nn.Identity(), linear)
        return nn.Sequential(LayerNorm(2 * D, cfg.norm_eps, dtype=dtype), linear)

    # ------------------------------------------------------------------ run-time sparsity
    def set_sparsity(self, sparse_n: Sequence[int] | None = None, *, dense: bool = False) -> None:
        """Per-stage skiparse k, changeable between calls (weights untouched). ``None`` restores the config
        (all 1 if ``sparse1d`` is off); ``dense=True`` makes every stage dense."""
        cfg = self.suv_config
        if dense:
            sparse_n = [1] * cfg.num_stages
        elif sparse_n is None:
            sparse_n = cfg.effective_sparse_n()
        sparse_n = list(sparse_n)
        if len(sparse_n) != cfg.num_stages or not all(isinstance(k, int) and k >= 1 for k in sparse_n):
            raise ValueError(f"invalid sparsity sparse_n={sparse_n!r}: allowed {cfg.num_stages} integers >= 1")
        for stage, k in zip(self.transformer_blocks, sparse_n):
            for block in stage:
                block.sparse_k = k
        self.sparse_n = sparse_n

    def to_empty(self, *, device, recurse: bool = True) -> "SparseUMMDiT":
        """Materialise a meta-built model (``device="meta"``) without initialising it, e.g. before loading a
        checkpoint. Unlike ``nn.Module.to_empty`` this keeps the parameters' Python attributes (megatron's
        ``tensor_model_parallel`` / ``partition_dim`` / ``sequence_parallel`` / ``allreduce`` tags), which
        the meta -> device move would otherwise drop."""
        saved = {name: dict(p.__dict__) for name, p in self.named_parameters()}
        super().to_empty(device=device, recurse=recurse)
        for name, p in self.named_parameters():
            p.__dict__.update(saved[name])
        return self

    # ------------------------------------------------------------------ forward
    def _rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            cfg = self.suv_config
            scale = (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w)
            cos, sin = rope_tables(grid, cfg.head_dim, scale, device=device)
            # [Lv, hd] -> [Lv, 1, 1, hd] (broadcast over batch and heads)
            self._rope_cache = {key: (cos[:, None, None], sin[:, None, None])}
        return self._rope_cache[key]

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        pooled: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        stage_input: StageState | None = None,
    ) -> torch.Tensor | StageState:
        """latents ``(B, C, t, h, w)``, timestep ``(B,)`` = 1000*sigma, text_hidden ``(B, L, C_text)``,
        text_mask ``(B, L)`` in {0, 1}, pooled ``(B, P)``, video_mask ``(B, t, h, w)`` in {0, 1} or None
        (all valid) -> velocity ``(B, C_out, t, h, w)`` in the dtype of ``latents``.
        Upstream's extra singleton dims (``(B,1,L,C)``, ``(B,1,L)``, ``(B,1,P)``) are accepted.

        A pipeline chunk that is not first reads the streams from ``stage_input`` (``latents`` and
        ``text_hidden`` then only give the shapes); one that is not last returns a :class:`StageState`."""
        cfg, tp = self.suv_config, self.tp
        if latents.dim() != 5:
            raise ValueError(f"latents must be (B, C, t, h, w), got shape {tuple(latents.shape)}")
        if latents.shape[1] != cfg.patch_in_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels, the model takes {cfg.patch_in_channels} "
                             "(I2V: noisy + conditioning latents + mask, mm.models.conditioning)")
        if text_hidden.dim() == 4:
            text_hidden = text_hidden.squeeze(1)
        if text_mask.dim() == 3:
            text_mask = text_mask.squeeze(1)
        if pooled.dim() == 3:
            pooled = pooled.squeeze(1)
        cp = self.cp
        B, _, T, H, W = latents.shape
        timestep = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height/width {H}x{W} must be divisible by patch_size={p}")
        grid = (T, H // p, W // p)
        Lv, Lt = T * grid[1] * grid[2], text_hidden.shape[1]
        # CP: the flattened sequences are padded with masked tokens so that any shape splits (context_parallel)
        Lvp, Ltp = self.padded_lengths(Lv, Lt)
        if tp.sequence_parallel and (Lvp % tp.size or Ltp % tp.size):
            raise ValueError(f"sequence parallel needs video tokens ({Lv}) and text tokens ({Lt}) divisible by "
                             f"TP = {tp.size}")

        # key validity masks (None = all valid)
        video_keep = None
        if video_mask is not None:
            vm = F.max_pool3d(video_mask.float()[:, None], kernel_size=(1, p, p), stride=(1, p, p))
            video_keep = vm.reshape(B, Lv) > 0  # (B, t, hp, wp) flattened like the tokens
            video_keep = None if bool(video_keep.all()) else video_keep
        text_keep = text_mask.reshape(B, Lt).bool()
        text_keep = None if bool(text_keep.all()) else text_keep
        if (Lvp, Ltp) != (Lv, Lt):  # CP padding: never attended
            ones = torch.ones(B, 1, dtype=torch.bool, device=text_mask.device)
            video_keep = pad_seq(ones.expand(B, Lv) if video_keep is None else video_keep, Lvp, 1, False)
            text_keep = pad_seq(ones.expand(B, Lt) if text_keep is None else text_keep, Ltp, 1, False)

        dtype = self.params_dtype
        c = self.time_text_embed(timestep, pooled)  # [B, Dt] fp32
        # SiLU(c) feeds every adaLN GEMM; its grad is TP-summed once here (each rank owns different rows).
        cond = copy_to_tp(F.silu(c), tp)
        if self.pre_process:
            # CP: this rank's frames / caption tokens (masks, RoPE and lengths above stay full-sequence). Split in
            # eval too (upstream splits only when training; its eval at CP > 1 would mis-gather in attention).
            x = pad_seq(self.patch_embed(latents), Lvp, 0)  # [Lv', B, D]
            y = pad_seq(self.caption_projection(text_hidden.to(dtype)).transpose(0, 1), Ltp, 0)  # [Lt', B, D]
            x = split_input(x, 0, cp, "video tokens")  # [Lv'/CP, B, D]
            y = split_input(y.contiguous(), 0, cp, "caption tokens")  # [Lt'/CP, B, D]
            x, y = scatter_sequence(x, tp), scatter_sequence(y, tp)  # SP: this rank's sequence chunk
            skips = []
        else:
            if stage_input is None:
                raise ValueError(f"pipeline chunk of blocks {self.block_range} needs stage_input (it is not first)")
            x, y, skips = stage_input.x, stage_input.y, list(stage_input.skips)

        # RoPE of the (padded) sequence this rank attends with: all of it, or its ring rank's chunk (the padded
        # positions get zeros: they are never attended and their outputs are dropped)
        r, n = cp.ring.rank, Lvp // cp.ring.size
        full_cos, full_sin = (pad_seq(t, Lvp, 0) for t in self._rope(grid, x.device))
        ctx = AttentionContext(cos=full_cos[r * n:(r + 1) * n], sin=full_sin[r * n:(r + 1) * n],
                               chunks=rope_chunks(cfg.head_dim), video_len=Lvp, text_len=Ltp,
                               video_keep=video_keep, text_keep=text_keep, cp=cp, full_cos=full_cos,
                               full_sin=full_sin)
        layout = skiparse_cp.CHUNK  # skiparse CP: which video tokens this rank holds (skips: always chunks)
        mid = cfg.num_stages // 2
        for s, i in block_positions(cfg)[slice(*self.block_range)]:
            if s > mid and i == 0:  # decoder: fuse the mirrored encoder stage's output (stage mid+j+1 <-> mid-j-1)
                j = s - mid - 1
                xs, ys = skips.pop()
                x, layout = skiparse_cp.reshard(x, layout, skiparse_cp.CHUNK, cp, tp), skiparse_cp.CHUNK
                x = self.skip_norm_linear[j](torch.cat([x, xs], dim=-1))
                y = self.skip_norm_linear_enc[j](torch.cat([y, ys], dim=-1))
            block = self.transformer_blocks[s][i]
            want = skiparse_cp.block_layout(block.sparse_k, block.group_skip, cp)
            x, layout = skiparse_cp.reshard(x, layout, want, cp, tp), want
            x, y = block(x, y, cond, ctx)
            if s < mid and i == cfg.num_layers[s] - 1:
                x, layout = skiparse_cp.reshard(x, layout, skiparse_cp.CHUNK, cp, tp), skiparse_cp.CHUNK
                skips.append((x, y))
        x = skiparse_cp.reshard(x, layout, skiparse_cp.CHUNK, cp, tp)  # stage boundaries and the output: chunks
        if not self.post_process:
            return StageState(x, y, skips)

        x = self.norm_out(self.norm_final(x), cond)  # two LayerNorms in a row, as released
        x = gather_sequence(x, tp)  # [Lv'/CP, B, D]
        x = self.proj_out(x)  # [Lv'/CP, B, pt*p*p*C]
        x = gather_output(x, 0, cp)[:Lv]  # CP: all tokens, padding dropped (backward: own tokens x CP)
        return self._unpatchify(x, B, grid).to(latents.dtype)

    def padded_lengths(self, video_len: int, text_len: int) -> tuple[int, int]:
        """Full video / text token counts after the context-parallel padding (unchanged at CP = 1)."""
        sp = self.tp.size if self.tp.sequence_parallel else 1
        return padded_lengths(video_len, text_len, self.cp, self.sparse_n, sp)

    def _unpatchify(self, x: torch.Tensor, B: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[t*hp*wp, B, (o a b c)] -> (B, C, t*pt, hp*p, wp*p)`` with channel fastest in the features."""
        cfg = self.suv_config
        t, hp, wp = grid
        p, pt, C = cfg.patch_size, cfg.patch_size_t, cfg.out_channels
        x = x.reshape(t, hp, wp, B, pt, p, p, C)
        x = x.permute(3, 7, 0, 4, 1, 5, 2, 6)  # [B, C, t, pt, hp, a, wp, b]
        return x.reshape(B, C, t * pt, hp * p, wp * p)

    # ------------------------------------------------------------------ state dict (released key space)
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load this rank's tensors in the released key space. ``_extra_state`` entries, the last block's
        dead text modules and (for a pipeline chunk) the keys of other chunks are dropped; any other missing/unexpected key or shape mismatch raises
        ``RuntimeError`` naming it (with ``strict``). For a full (TP-merged) dict on a TP > 1 model use
        :func:`load_upstream_state_dict`."""
        sd = normalize_upstream_state_dict(state_dict, self.suv_config)
        if self.block_range != (0, self.suv_config.num_blocks):  # a pipeline chunk takes its part of a full dict
            sd = {k: v for k, v in sd.items() if self.holds_key(k)}
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        mism = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
        if mism:
            problems.append(f"shape mismatches (TP size {self.tp.size}): {mism}")
        if problems:
            raise RuntimeError("SUV state dict does not match the model: " + "; ".join(problems))
        return super().load_state_dict(sd, strict=strict, assign=assign)

    def holds_key(self, key: str) -> bool:
        """Whether a key of the full released key space belongs to this model (always, unless a pipeline chunk)."""
        parts = key.split(".")
        try:
            if parts[0] in ("patch_embed", "caption_projection"):
                return self.pre_process
            if parts[0] in ("norm_final", "norm_out", "proj_out"):
                return self.post_process
            if parts[0] == "transformer_blocks":
                return int(parts[2]) in self.transformer_blocks[int(parts[1])]
            if parts[0] in ("skip_norm_linear", "skip_norm_linear_enc"):
                s = self.suv_config.num_stages // 2 + 1 + int(parts[1])
                return (s, 0) in block_positions(self.suv_config)[slice(*self.block_range)]
        except (IndexError, ValueError):  # not an SUV key: the strict check names it
            return True
        return True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: dict | None = None) -> dict:
        """megatron ``dist_checkpointing`` view: TP-sharded tensors for the megatron linears (their own
        method), replicated ShardedTensors for everything else. Needs real process groups (``parallel``).
        Keys are global (a block keeps its released name in every pipeline layout), so a checkpoint reshards
        across PP layouts; the embedder replicated on every pipeline chunk is saved by chunk 0 only."""
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out: dict = {}
        for name, module in self.named_modules():
            mprefix = f"{prefix}{name}." if name else prefix
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                out.update(module.sharded_state_dict(prefix=mprefix, sharded_offsets=sharded_offsets, metadata=metadata))
            elif any(True for _ in module.parameters(recurse=False)):
                local = {n: p for n, p in module.named_parameters(recurse=False)}
                out.update(make_sharded_tensors_for_checkpoint(local, mprefix, {}, sharded_offsets,
                                                               tp_group=self.tp.group, dp_cp_group=metadata["dp_cp_group"]))
        for key, sh in out.items():
            if key.startswith(f"{prefix}time_text_embed."):
                sh.replica_id = (self.pipeline_replica, *sh.replica_id[1:])
        return out

    # ------------------------------------------------------------------ construction from upstream
    @classmethod
    def from_upstream(
        cls,
        config: str | os.PathLike | Mapping[str, Any] | SUVConfig,
        checkpoint: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> "SparseUMMDiT":
        """One-process fp32 model in eval mode from an upstream model JSON (or predictor dict) and an
        optional flat, TP-merged predictor state dict (``model.pt`` / ``model_ema.pt`` / ``.safetensors``).

        No process group is needed (TP = 1 megatron linears run on a stand-in group). ``device="meta"``
        builds without allocating (with a checkpoint: allocated on the CPU and loaded). With a checkpoint
        the model is built on the meta device and materialised once, so no random init is spent.
        """
        cfg = config if isinstance(config, SUVConfig) else SUVConfig.from_upstream(config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if checkpoint is None:
            model = cls(cfg, None, torch.float32, device=device)
        else:
            state = load_upstream_checkpoint(checkpoint)
            model = cls(cfg, None, torch.float32, device="meta")
            model.to_empty(device="cpu" if device.type == "meta" else device)
            model.load_state_dict(state)
        return model.eval()


def _drop_extra_state_hook(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict()`` returns exactly the released key space (megatron's ``_extra_state`` is always None)."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(EXTRA_STATE_SUFFIX)]:
        del state_dict[key]


# ---------------------------------------------------------------------------------------- key space + TP
def tp_split_dim(key: str) -> int | None:
    """TP split dim of a released key (spec §10.1): 0 column-parallel, 1 row-parallel weight, None replicated."""
    if key.endswith(_ROW_SUFFIXES):
        return 1
    if key.endswith(_COLUMN_SUFFIXES):
        return 0
    return None


def _dead_prefixes(cfg: SUVConfig) -> tuple[str, ...]:
    last = f"transformer_blocks.{cfg.num_stages - 1}.{cfg.num_layers[-1] - 1}."
    return tuple(last + m for m in DEAD_LAST_BLOCK_MODULES)


def normalize_upstream_state_dict(state_dict: Mapping[str, Any], cfg: SUVConfig) -> dict[str, torch.Tensor]:
    """Drop ``*_extra_state`` entries and the last block's dead text tensors (present in TP > 1 trained
    checkpoints); everything else is passed through. Non-tensor values elsewhere raise."""
    dead = _dead_prefixes(cfg)
    out = {}
    for key, value in state_dict.items():
        if key.endswith(EXTRA_STATE_SUFFIX) or key.startswith(dead):
            continue
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[key] = value
    return out


def split_tp_state_dict(state_dict: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """Full released-key-space dict -> the tensors of TP rank ``tp_rank`` (equal contiguous chunks along the
    §10.1 dims). Pure function (no model, no process group)."""
    out = {}
    for key, value in state_dict.items():
        dim = tp_split_dim(key) if isinstance(value, torch.Tensor) else None
        if dim is None or tp_size == 1:
            out[key] = value
            continue
        if value.shape[dim] % tp_size:
            raise ValueError(f"{key}: dim {dim} of shape {tuple(value.shape)} is not divisible by TP size {tp_size}")
        out[key] = value.chunk(tp_size, dim=dim)[tp_rank]
    return out


def merge_tp_state_dicts(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`split_tp_state_dict` (rank order): concatenate split keys, take replicated ones from
    rank 0 (they are identical). Non-tensor entries are kept from rank 0."""
    out = {}
    for key, value in shards[0].items():
        dim = tp_split_dim(key) if isinstance(value, torch.Tensor) else None
        out[key] = value if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out


def load_upstream_state_dict(model: SparseUMMDiT, state_dict: Mapping[str, Any], strict: bool = True):
    """Load a full (TP-merged) released-key-space dict into a possibly TP-sharded model (this rank's slices)."""
    sd = normalize_upstream_state_dict(state_dict, model.suv_config)
    return model.load_state_dict(split_tp_state_dict(sd, model.tp.size, model.tp.rank), strict=strict)


def gather_upstream_state_dict(model: SparseUMMDiT, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """All-gather a TP-sharded model into the full released key space (every rank gets the whole dict).
    ``grads=True`` gathers ``.grad`` instead (keys whose grad is None are left out). Collective over the TP group."""
    tp = model.tp
    out = {}
    for key, param in model.named_parameters():
        t = param.grad if grads else param.detach()
        if t is None:
            continue
        dim = tp_split_dim(key)
        if dim is not None and tp.size > 1:
            parts = [torch.empty_like(t) for _ in range(tp.size)]
            dist.all_gather(parts, t.contiguous(), group=tp.group)
            t = torch.cat(parts, dim=dim)
        out[key] = t if dim is not None and tp.size > 1 else t.clone()
    return out


DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"


def diffusers_weight_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Safetensors files of a diffusers-style model folder and the keys each holds according to its index
    (``{file: keys}``; a single unsharded file maps to ``None``). ValueError naming what is missing."""
    import json

    index = os.path.join(folder, DIFFUSERS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
    elif os.path.isfile(os.path.join(folder, DIFFUSERS_SINGLE)):
        files = {DIFFUSERS_SINGLE: None}
    else:
        raise ValueError(f"{folder}: neither {DIFFUSERS_INDEX} nor {DIFFUSERS_SINGLE} (not a diffusers model folder)")
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"{folder}: shard files {missing} listed in {DIFFUSERS_INDEX} are missing")
    return files


def load_upstream_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat predictor state dict (``torch.save`` file, ``.safetensors`` or a diffusers-style folder of
    sharded safetensors) onto the CPU. A dict wrapped under ``model`` / ``ema_model`` / ``state_dict`` /
    ``module`` is unwrapped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for name in diffusers_weight_files(path):
            state.update(load_file(os.path.join(path, name), device="cpu"))
        return state
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:  # memory-map: every rank reads the ~17 GB release lazily, slicing only its TP shard
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and "patch_embed.proj.weight" not in state:
        for wrapper in ("model", "ema_model", "state_dict", "module"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
        else:
            raise RuntimeError(f"{path}: no SUV predictor state dict found (top-level keys {list(state)[:10]})")
    return dict(state)
