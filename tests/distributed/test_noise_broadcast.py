"""Noise and sigma are identical on the ranks that share a sample (spec §6.1 last bullet)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from harness import run_distributed
from mm.diffusion.flow_matching import broadcast_from_group_src, q_sample

SHAPE = (2, 4, 3, 4, 4)


def _q_sample_on_rank(rank, group):
    z0 = torch.full(SHAPE, 0.5, dtype=torch.bfloat16)
    # every rank deliberately seeds differently: only the broadcast can make them agree
    return q_sample(z0, shift=2.0, generator=torch.Generator().manual_seed(100 + rank), sync_groups=(group,))


def _world_group(rank, world):
    synced = _q_sample_on_rank(rank, dist.group.WORLD)
    unsynced = _q_sample_on_rank(rank, None)
    return synced.x, synced.eps, synced.sigma, unsynced.eps


def test_two_ranks_share_rank0_noise_and_sigma():
    results = run_distributed(_world_group, 2)
    (x0, eps0, sig0, own0), (x1, eps1, sig1, own1) = results
    assert torch.equal(eps0, eps1) and torch.equal(sig0, sig1) and torch.equal(x0, x1)
    assert torch.equal(eps0, own0)  # the source keeps its own draw
    assert not torch.equal(own0, own1)  # without a group, each rank keeps its own draw


def _subgroups(rank, world):
    # two groups {0, 1} and {2, 3} (e.g. TP groups); the second one's source is global rank 2
    groups = [dist.new_group(ranks=[0, 1]), dist.new_group(ranks=[2, 3])]
    singles = [dist.new_group(ranks=[r]) for r in range(world)]
    mine = groups[rank // 2]
    t = torch.tensor([float(rank)])
    broadcast_from_group_src([t], singles[rank])  # size-1 group: no-op
    assert t.item() == rank
    return _q_sample_on_rank(rank, mine).eps, _q_sample_on_rank(rank, None).eps


def test_subgroups_broadcast_from_their_first_global_rank():
    results = run_distributed(_subgroups, 4)
    synced = [r[0] for r in results]
    own = [r[1] for r in results]
    assert torch.equal(synced[0], own[0]) and torch.equal(synced[1], own[0])
    assert torch.equal(synced[2], own[2]) and torch.equal(synced[3], own[2])
    assert not torch.equal(synced[0], synced[2])
