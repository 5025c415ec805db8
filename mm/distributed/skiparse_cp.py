"""Sparsity-aware context parallelism (``--context-parallel-algo skiparse_cp_algo``, spec §2.6).

In a skiparse block with sparsity k, attention never crosses a sub-sequence: sub-sequence r (single-skip:
tokens ``s % k == r``; group-skip: ``(s // k) % k == r``) attends only to itself and the caption. When CP
divides k, each CP rank c holds the whole sub-sequences ``[c*k/CP, (c+1)*k/CP)`` (the *sub-sequence
layout* of that (k, pattern)), so the block's video attention needs no communication; only the caption
(short) is all-gathered for the keys, and the mean of the k caption outputs is a reduce-scatter.

The video hidden state stays in a layout from block to block and is re-sharded (one all-to-all of
``[L'/CP, B, D]`` per rank; under sequence parallelism between a TP all-gather and a split) only where the
layout changes: single <-> group inside a stage, stage ends
(skips and pipeline boundaries use the contiguous *chunk layout*), dense stages and stages where CP does
not divide k (they run Ulysses or ring attention on contiguous chunks). Ulysses moves q, k, v and the output
(4 tensors of that size) in every block.

Every layout holds exactly ``L'/CP`` tokens per rank, and between any two layouts every rank sends the same
number of tokens to every other (L' is a multiple of CP x k^2), so a re-shard is an index_select, one
equal-split all-to-all (megatron's autograd ``all_to_all``: its backward is the inverse all-to-all) and an
index_select. The index plans are pure functions of (L', CP, layouts), cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mm.distributed.context_parallel import CPContext
from mm.distributed.tp_layers import TPContext, gather_sequence, scatter_sequence
from mm.models import skiparse


@dataclass(frozen=True)
class Layout:
    """Which tokens a CP rank holds: k = 1 the contiguous chunk, k > 1 the sub-sequences of (k, group)."""

    k: int = 1
    group: bool = False


CHUNK = Layout()


def block_layout(k: int, group: bool, cp: CPContext) -> Layout:
    """The layout a block runs in under skiparse CP: its sub-sequences when CP divides k, else chunks."""
    if not cp.skiparse or cp.size == 1 or k == 1 or k % cp.size:
        return CHUNK
    return Layout(k, group)


@functools.cache
def global_ids(length: int, cp_size: int, layout: Layout) -> torch.Tensor:
    """``[CP, length/CP]``: the padded-sequence token index of every local position of every rank."""
    if layout == CHUNK:
        return torch.arange(length).reshape(cp_size, -1)
    # [k, L'/k] sub-sequences in order; rank c holds the contiguous block of k/CP of them
    return skiparse.subsequence_indices(length, layout.k, layout.group).reshape(cp_size, -1)


@functools.cache
def _plan(length: int, cp_size: int, src: Layout, dst: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rank: the local (src) positions to send, grouped by destination rank and in the destination's
    order, and the permutation that puts the received tokens into local (dst) order."""
    src_ids, dst_ids = global_ids(length, cp_size, src), global_ids(length, cp_size, dst)
    n = length // cp_size
    owner = torch.empty(length, dtype=torch.long)
    pos = torch.empty(length, dtype=torch.long)
    owner[dst_ids.reshape(-1)] = torch.arange(cp_size).repeat_interleave(n)
    pos[dst_ids.reshape(-1)] = torch.arange(n).repeat(cp_size)
    send, recv_pos = [], [[] for _ in range(cp_size)]
    for c in range(cp_size):
        g = src_ids[c]
        order = torch.argsort(owner[g] * n + pos[g])  # by destination rank, then destination position
        counts = torch.bincount(owner[g], minlength=cp_size)
        assert bool((counts == n // cp_size).all()), (src, dst, counts)  # equal splits: L' % (CP k^2) == 0
        send.append(order)
        for d, part in enumerate(g[order].split(n // cp_size)):
            recv_pos[d].append(pos[part])
    recv = torch.stack([torch.argsort(torch.cat(parts)) for parts in recv_pos])
    return torch.stack(send), recv


def reshard(x: torch.Tensor, src: Layout, dst: Layout, cp: CPContext, tp: TPContext | None = None) -> torch.Tensor:
    """``[L'/CP, B, ...]`` held in layout ``src`` -> the same tokens held in layout ``dst`` (all-to-all over the
    CP group; differentiable). Under sequence parallelism ``x`` is this TP rank's slice ``[L'/(CP*TP), B, ...]``
    of the rank's token list: it is all-gathered over TP first (replicated downstream: backward splits) and
    sliced again after."""
    if src == dst or cp.size == 1:
        return x
    from megatron.core.tensor_parallel import mappings

    if tp is not None:
        x = gather_sequence(x, tp)
    send, recv = _plan(x.shape[0] * cp.size, cp.size, src, dst)
    out = mappings.all_to_all(cp.group, x.index_select(0, send[cp.rank].to(x.device)))
    out = out.index_select(0, recv[cp.rank].to(x.device))
    return scatter_sequence(out, tp) if tp is not None else out


def gather_text(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """This rank's caption chunk ``[Lt'/CP, ...]`` -> the whole caption (backward: reduce-scatter)."""
    from megatron.core.tensor_parallel import mappings

    return mappings.gather_from_sequence_parallel_region(x.contiguous(), True, cp.group)


def reduce_scatter_text(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """Per-rank partial sums over the whole caption ``[Lt', ...]`` -> this rank's chunk of their sum."""
    from megatron.core.tensor_parallel import mappings

    return mappings.reduce_scatter_to_sequence_parallel_region(x.contiguous(), cp.group)
