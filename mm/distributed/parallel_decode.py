"""Parallel WFVAE decode: the spatial tiles of each decode chunk spread over the ranks of a replica.

The WFVAE's spatial tiling (``mm.models.vae_spatial_tiling``) runs the decoder's latent-resolution part
(mid attention over the whole frame) untiled and its local part on overlapping tiles, which are blended
with fixed weights. Every rank of the replica runs the latent part (replicated, small) and the local part
of the tiles ``k`` with ``k % R == rank`` (``R`` ranks, round-robin; a tile keeps its owner for every
temporal chunk, so each rank's causal caches hold its own tiles only). The tile outputs, all of one
shape, are all-gathered round by round over the replica group and every rank blends all of them in tile
order, which is the one-rank tiled decode's arithmetic in the same order: the result is bitwise equal.

Memory per rank: the local part's activations of ``ceil(num_tiles / R)`` tiles instead of all of them
(the local part dominates at high resolution), plus, for one temporal chunk, the gathered RGB outputs of
every tile (about the chunk's frames times the tiles' overlap factor) and the blended chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


class TileParallelDecode:
    """``WFVAE.tile_executor`` over ``group`` (this rank is ``rank`` of ``size``)."""

    def __init__(self, group, size: int, rank: int):
        assert size >= 2 and 0 <= rank < size, (size, rank)
        self.group, self.size, self.rank = group, size, rank

    def __call__(self, num_tiles: int, run_tile: Callable[[int], torch.Tensor],
                 blend: Callable[[list], torch.Tensor]) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for first in range(0, num_tiles, self.size):  # one round: tiles first .. first + size - 1
            mine = first + self.rank
            if mine < num_tiles:
                y = run_tile(mine)
            elif outputs:  # last round, no tile left for this rank: a placeholder of the common tile shape
                y = torch.empty_like(outputs[0])
            else:  # fewer tiles than ranks: compute a peer's tile (this rank never owns it) for its shape
                y = run_tile(mine % num_tiles)
            parts = [torch.empty_like(y) for _ in range(self.size)]
            dist.all_gather(parts, y.contiguous(), group=self.group)  # the replica group, in group-rank order
            outputs += parts[: num_tiles - first]
        return blend(outputs)


def apply_parallel_decode(vae, replica) -> bool:
    """Spread ``vae``'s spatial decode tiles over the ranks of ``replica`` (a
    ``mm.distributed.cfg_parallel.ReplicaLayout``). Returns False (nothing changed) for a one-rank replica."""
    if replica.replica_group is None:
        return False
    ranks = replica.replica_ranks
    vae.tile_executor = TileParallelDecode(replica.replica_group, len(ranks), ranks.index(replica.rank))
    return True


__all__ = ["TileParallelDecode", "apply_parallel_decode"]
