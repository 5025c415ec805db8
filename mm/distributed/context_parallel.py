"""Context parallelism for the SUV denoiser (spec §3.3): Ulysses, ring and their hybrid.

Algorithms (``--context-parallel-algo``, MindSpeed's names): ``ulysses_cp_algo`` (heads scattered by
all-to-all), ``megatron_cp_algo`` (ring attention, ``mm.distributed.ring_attention``) and
``hybrid_cp_algo`` (CP = Ulysses degree x ring degree, ``--ulysses-degree-in-cp``): Ulysses over an inner
group of consecutive CP ranks, ring over the outer group of the ranks ``U`` apart. One code path runs all
three: Ulysses over ``cp.ulysses`` (size CP, 1 or U) then the ring over ``cp.ring`` (size 1, CP or CP/U).
``skiparse_cp_algo`` (ours, ``mm.distributed.skiparse_cp``) keeps whole skiparse sub-sequences on ranks
in the blocks where CP divides k; its other blocks run Ulysses (when TP x CP divides the heads) or the ring.

* :class:`CPContext` carries the CP group/size/rank into the model (no ``parallel_state`` look-ups inside
  the math); ``CPContext.single()`` (size 1) makes every function here an identity.
* Sequence split for any shape: the model splits the *flattened* token sequences, padded by
  :func:`padded_lengths` with masked tokens to a multiple of CP x (every skiparse k squared) (x TP under
  SP), so every frame count works and every ring block regroups into whole skiparse sub-sequence pieces.
* :func:`split_input` keeps this rank's contiguous chunk along one dim (video tokens, caption tokens);
  backward all-gathers the gradient and divides it by CP.
* :func:`gather_output` all-gathers along one dim (the output tokens); backward keeps this rank's chunk
  of the gradient multiplied by CP. Every CP rank computes the same loss on the full output; the x CP
  compensates the average of the gradients over the DP x CP group (each rank's parameters then hold CP x
  the contribution of its own tokens, whose average over CP is the full gradient).
* :func:`seq_to_heads` / :func:`heads_to_seq`: the attention all-to-alls over the CP group (megatron's
  autograd ``tensor_parallel.mappings.all_to_all``), ``[S/CP, B, nh, hd] <-> [S, B, nh/CP, hd]``; rank order
  is sequence order, so the gathered sequence is in natural (frame) order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CPContext:
    group: object
    size: int
    rank: int
    ulysses_size: int | None = None  # None: all of CP (pure Ulysses)
    inner_group: object = None  # hybrid: the Ulysses group (consecutive CP ranks)
    outer_group: object = None  # hybrid: the ring group (CP ranks ulysses_size apart)
    skiparse: bool = False  # skiparse_cp_algo: skiparse blocks hold whole sub-sequences (mm.distributed.skiparse_cp)

    @classmethod
    def single(cls) -> "CPContext":
        return cls(None, 1, 0)

    @classmethod
    def from_parallel_state(cls, parallel) -> "CPContext":
        """From ``mm.distributed.init.ParallelState`` (or ``None`` = one process)."""
        if parallel is None or getattr(parallel, "cp_size", 1) == 1:
            return cls.single()
        return cls(parallel.cp_group, parallel.cp_size, parallel.cp_rank,
                   getattr(parallel, "cp_ulysses_size", None), getattr(parallel, "cp_inner_group", None),
                   getattr(parallel, "cp_outer_group", None), getattr(parallel, "cp_algo", "") == "skiparse_cp_algo")

    @property
    def ulysses(self) -> "CPContext":
        """The group the head all-to-alls run over (size 1: none)."""
        u = self.size if self.ulysses_size is None else self.ulysses_size
        if u == 1:
            return CPContext.single()
        if u == self.size:
            return CPContext(self.group, self.size, self.rank)
        return CPContext(self.inner_group, u, self.rank % u)

    def with_ulysses_size(self, ulysses_size: int) -> "CPContext":
        return dataclasses.replace(self, ulysses_size=ulysses_size)

    @property
    def ring(self) -> "CPContext":
        """The group K/V blocks circulate over (size 1: none); its rank r holds the sequence chunk r."""
        u = self.size if self.ulysses_size is None else self.ulysses_size
        if u == self.size:
            return CPContext.single()
        if u == 1:
            return CPContext(self.group, self.size, self.rank)
        return CPContext(self.outer_group, self.size // u, self.rank // u)


def padded_lengths(video_len: int, text_len: int, cp: CPContext, sparse_n, sp_size: int = 1) -> tuple[int, int]:
    """Full video / text lengths after the CP padding (unchanged at CP = 1): video to a multiple of
    CP x lcm(k^2 of every stage) x SP, text to a multiple of CP x SP, so every rank's chunk is whole for SP and
    every ring rank's chunk (a multiple of k^2) regroups locally into pieces of the skiparse sub-sequences."""
    if cp.size == 1:
        return video_len, text_len
    kk = math.lcm(*(k * k for k in sparse_n))
    mv, mt = cp.size * kk * sp_size, cp.size * sp_size
    return video_len + (-video_len) % mv, text_len + (-text_len) % mt


def pad_seq(x: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    """Pad ``x`` along ``dim`` to ``length`` with ``value`` (autograd-transparent)."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _all_gather(x: torch.Tensor, dim: int, cp: CPContext) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(cp.size)]
    dist.all_gather(parts, x, group=cp.group)
    return torch.cat(parts, dim=dim)


def _chunk(x: torch.Tensor, dim: int, cp: CPContext) -> torch.Tensor:
    return x.chunk(cp.size, dim=dim)[cp.rank].contiguous()


class _SplitInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, cp):
        ctx.dim, ctx.cp = dim, cp
        return _chunk(x, dim, cp)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.cp) / ctx.cp.size, None, None


class _GatherOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, cp):
        ctx.dim, ctx.cp = dim, cp
        return _all_gather(x, dim, cp)

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, ctx.dim, ctx.cp) * ctx.cp.size, None, None


def split_input(x: torch.Tensor, dim: int, cp: CPContext, what: str = "input") -> torch.Tensor:
    """This CP rank's contiguous chunk along ``dim`` (backward: all-gather, / CP). ValueError if
    ``x.shape[dim]`` is not divisible by CP."""
    if cp.size == 1:
        return x
    if x.shape[dim] % cp.size:
        raise ValueError(f"context parallel: {what} size {x.shape[dim]} (dim {dim} of {tuple(x.shape)}) is not "
                         f"divisible by the CP size {cp.size}")
    return _SplitInput.apply(x, dim, cp)


def gather_output(x: torch.Tensor, dim: int, cp: CPContext) -> torch.Tensor:
    """All-gather the CP chunks along ``dim`` in rank order (backward: this rank's chunk, x CP)."""
    if cp.size == 1:
        return x
    return _GatherOutput.apply(x, dim, cp)


def seq_to_heads(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """``[S/CP, B, nh, hd]`` (this rank's sequence chunk, all local heads) -> ``[S, B, nh/CP, hd]`` (full
    sequence, this rank's head group ``[rank*nh/CP, (rank+1)*nh/CP)``)."""
    if cp.size == 1:
        return x
    from megatron.core.tensor_parallel import mappings

    s, b, nh, hd = x.shape
    if nh % cp.size:
        raise ValueError(f"context parallel: {nh} local heads are not divisible by the CP size {cp.size}")
    # [s, b, CP, nh/CP, hd] -> [CP (destination = head group), s, b, nh/CP, hd]
    x = x.reshape(s, b, cp.size, nh // cp.size, hd).permute(2, 0, 1, 3, 4).contiguous()
    out = mappings.all_to_all(cp.group, x.reshape(cp.size * s, b * (nh // cp.size) * hd))
    return out.reshape(cp.size * s, b, nh // cp.size, hd)  # chunk j came from rank j: natural order


def heads_to_seq(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``[S, B, nh/CP, hd] -> [S/CP, B, nh, hd]``."""
    if cp.size == 1:
        return x
    from megatron.core.tensor_parallel import mappings

    S, b, h, hd = x.shape
    if S % cp.size:
        raise ValueError(f"context parallel: sequence length {S} is not divisible by the CP size {cp.size}")
    s = S // cp.size
    out = mappings.all_to_all(cp.group, x.contiguous().reshape(S, b * h * hd))  # chunk j <- rank j's heads
    out = out.reshape(cp.size, s, b, h, hd).permute(1, 2, 0, 3, 4)  # [s, b, CP, h, hd]
    return out.reshape(s, b, cp.size * h, hd)
