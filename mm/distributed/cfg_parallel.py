"""Inference replicas and classifier-free-guidance parallelism (beyond upstream, which runs both CFG
branches as one batch on every rank; spec §9.3).

A *replica* is the set of ranks that sample one micro-batch of prompts together: TP x CP ranks, times 2
with ``--cfg-parallel``. Megatron's groups are built as usual (TP fastest, then CP, then DP); CFG
parallelism pairs the megatron DP ranks ``2j`` and ``2j + 1``: in each pair the first rank runs the DiT on
the unconditional branch, the second on the conditional one, with the same TP/CP ranks. Once per step
:meth:`ReplicaLayout.branch_velocities` all-gathers the two fp32 velocities over the pair, so both ranks
apply the same fp32 CFG + rescale + Euler math (``mm.diffusion.sampler``) to the same numbers and keep
identical latents.

:func:`init_replicas` builds the CFG pair groups and the replica groups from every rank's
``(tp, cp, dp)`` coordinates (gathered once), so it does not depend on megatron's rank order. It is a
collective over the world group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ReplicaLayout:
    """This rank's place among the inference replicas."""

    dp_rank: int  # replica index (prompt micro-batch ``b`` goes to replica ``b % dp_size``)
    dp_size: int  # number of replicas
    cfg_size: int  # 1, or 2 with --cfg-parallel
    cfg_rank: int  # 0 = unconditional branch, 1 = conditional branch
    cfg_group: object  # the pair of ranks that exchange velocities (None when cfg_size is 1)
    cfg_ranks: tuple[int, ...]  # global ranks of the pair: (uncond, cond); () when cfg_size is 1
    replica_group: object  # every rank of this replica (None for a one-rank replica)
    replica_ranks: tuple[int, ...]  # global ranks of this replica, ascending
    writer_rank: int  # global rank that decodes and writes this replica's samples
    rank: int  # this rank's global rank

    @classmethod
    def single(cls) -> "ReplicaLayout":
        return cls(0, 1, 1, 0, None, (), None, (0,), 0, 0)

    @property
    def is_writer(self) -> bool:
        return self.rank == self.writer_rank

    def branch_velocities(self, v_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_uncond, v_cond)`` fp32 from this rank's branch velocity (all-gather over the CFG pair)."""
        assert self.cfg_size == 2, self.cfg_size
        v_local = v_local.float().contiguous()
        parts = [torch.empty_like(v_local) for _ in range(2)]
        dist.all_gather(parts, v_local, group=self.cfg_group)  # parts in the pair's group-rank order
        uncond, cond = (dist.get_group_rank(self.cfg_group, r) for r in self.cfg_ranks)
        return parts[uncond], parts[cond]

    def broadcast_from_writer(self, obj):
        """The writer's ``obj`` on every rank of the replica (collective over the replica group)."""
        if self.replica_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.writer_rank, group=self.replica_group)
        return box[0]


def init_replicas(parallel, cfg_parallel: bool = False) -> ReplicaLayout:
    """The replica layout of this rank; ``parallel`` is ``mm.distributed.init.ParallelState`` (None = one
    process). With ``cfg_parallel`` the megatron DP size must be even (checked by the CLI before anything
    is built; asserted here). Collective over the world group (every rank creates every group)."""
    if parallel is None:
        assert not cfg_parallel, "CFG parallelism needs two ranks"
        return ReplicaLayout.single()
    cfg_size = 2 if cfg_parallel else 1
    assert parallel.pp_size == 1 and parallel.dp_size % cfg_size == 0, (parallel.pp_size, parallel.dp_size)
    coords = [None] * parallel.world_size
    dist.all_gather_object(coords, (parallel.rank, parallel.tp_rank, parallel.cp_rank, parallel.dp_rank))
    replicas: dict[int, list[tuple[int, int, int, int]]] = {}
    for c in coords:
        replicas.setdefault(c[3] // cfg_size, []).append(c)
    my_replica = parallel.dp_rank // cfg_size
    replica_group = cfg_group = None
    cfg_ranks: tuple[int, ...] = ()
    for r in sorted(replicas):  # same creation order on every rank
        members = sorted(c[0] for c in replicas[r])
        group = dist.new_group(members) if len(members) > 1 else None
        if r == my_replica:
            replica_group = group
    if cfg_size == 2:
        pairs: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        for rank, tp, cp, dp in coords:
            pairs.setdefault((dp // 2, tp, cp), []).append((dp % 2, rank))
        for key in sorted(pairs):
            members = [rank for _, rank in sorted(pairs[key])]  # [uncond rank, cond rank]
            group = dist.new_group(members)
            if key == (my_replica, parallel.tp_rank, parallel.cp_rank):
                cfg_group, cfg_ranks = group, tuple(members)
    members = replicas[my_replica]
    writer = min(rank for rank, tp, cp, dp in members if tp == 0 and cp == 0 and dp % cfg_size == 0)
    return ReplicaLayout(
        dp_rank=my_replica, dp_size=parallel.dp_size // cfg_size, cfg_size=cfg_size,
        cfg_rank=parallel.dp_rank % cfg_size, cfg_group=cfg_group, cfg_ranks=cfg_ranks, replica_group=replica_group,
        replica_ranks=tuple(sorted(c[0] for c in members)), writer_rank=writer, rank=parallel.rank,
    )


__all__ = ["ReplicaLayout", "init_replicas"]
