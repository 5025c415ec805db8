"""Shape-grouped, resumable, distributed batch sampler (spec §8.5, §7.3, §7.9).

**Global order.** For epoch ``e`` one generator seeded with ``(seed, e)``: indices are grouped by shape
key (groups in descending size, ties by key), shuffled inside each group, and cut into blocks of
``global_batch_size`` samples (a short last block is filled with random repeats of its own group);
then the block order is shuffled. The order depends on ``(seed, epoch, shape keys,
global_batch_size)`` only, **not** on the number of replicas, so every optimizer step reads one
shape-homogeneous block whatever the data-parallel size.

**Sharding.** Each micro-step consumes ``num_replicas × batch_size`` consecutive positions; replica ``r``
takes positions ``[r·b, (r+1)·b)`` of that span. ``num_replicas`` is the data-parallel size, or
DP x TP x CP with encoder-DP (§7.3: every rank of a pipeline stage reads its own sample; a TP×CP group
shares them; every stage reads the same ones).
``num_replicas × batch_size`` must divide ``global_batch_size``.

**State.** ``consumed_samples`` counts positions of the current epoch's global order that have been
consumed by all replicas together; the loader advances it per yielded micro-batch. Resuming at another
data-parallel size continues the same global order from ``consumed_samples`` (which must then be a
multiple of the new ``num_replicas × batch_size``; saving at optimizer-step boundaries guarantees it).
The state also keeps the bad samples seen so far and per-reason skip counts. Upstream's
``initial_global_step_for_sampler`` maps to ``consumed_samples = step × global_batch_size``.

**Memory.** The sampler works on index arrays: the shape groups are arrays (slices of the memory-mapped
on-disk index at scale, ``mm.data.index_store``), each group is shuffled in place inside one epoch buffer
of 4 bytes per sample (8 beyond 2^31 samples), and the blocks are visited through their permutation, so
no per-sample Python object exists; micro-batches are produced lazily. ``rng.shuffle`` of a group array
applies exactly the swaps ``rng.permutation(len(group))`` draws, so the order is the same as indexing the
group with that permutation. With ``order_dir`` (the on-disk index's ``orders/``) the epoch buffer is
computed by the first process that needs it, under a file lock, written there and memory-mapped by every
rank: one page-cache copy per node (or per cluster on shared storage) instead of 4 bytes per sample in
each rank; the files of epochs older than the previous one are deleted.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import zlib
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mm.data.index import group_order
from mm.data.index_store import file_lock

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def groups_from_keys(shape_keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Shape key -> ascending indices of the samples with that key (for small in-memory datasets)."""
    keys = np.asarray(shape_keys)
    uniq, inverse = np.unique(keys, return_inverse=True)
    by_group = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    return {str(k): g for k, g in zip(uniq, np.split(by_group, bounds))}


class GroupedDistributedSampler:
    """Yields this replica's micro-batches (lists of ``batch_size`` dataset indices, one shape each): the
    ``batch_sampler`` of a DataLoader (an iterable with a length; no torch import needed).

    ``groups`` is either the shape key of every sample or a mapping shape key -> ascending sample indices
    (``index.shape_groups()``)."""

    def __init__(self, groups: Sequence[str] | Mapping[str, np.ndarray], *, batch_size: int,
                 global_batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 42,
                 initial_global_step: int = 0, order_dir: str | None = None) -> None:
        if not isinstance(groups, Mapping):
            groups = groups_from_keys(groups) if len(groups) else {}
        self.num_samples = sum(len(g) for g in groups.values())
        if self.num_samples == 0:
            raise ValueError("GroupedDistributedSampler needs at least one sample, got 0")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got rank={rank}")
        step = num_replicas * batch_size
        if global_batch_size < step or global_batch_size % step:
            raise ValueError(f"global_batch_size must be a positive multiple of num_replicas*batch_size={step}, "
                             f"got {global_batch_size}")
        if initial_global_step < 0:
            raise ValueError(f"initial_global_step must be >= 0, got {initial_global_step}")
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.consumed_samples = 0
        self.skipped: Counter = Counter()
        self.bad_samples: dict[int, str] = {}
        self._groups = [groups[k] for k in group_order({k: len(g) for k, g in groups.items()}) if len(groups[k])]
        self._dtype = np.int32 if self.num_samples < 2 ** 31 else np.int64
        self._epoch_blocks: tuple[int, np.ndarray, np.ndarray] | None = None
        self.order_dir = order_dir
        if initial_global_step:
            self.consumed_samples = min(initial_global_step * global_batch_size, self.epoch_length)

    # ------------------------------------------------------------------------------------------------
    @property
    def micro_step_size(self) -> int:
        """Positions of the global order consumed per micro-step by all replicas together."""
        return self.num_replicas * self.batch_size

    @property
    def epoch_length(self) -> int:
        g = self.global_batch_size
        return sum(-(-len(grp) // g) * g for grp in self._groups)

    def _blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(blocks, visit)``: the epoch's shuffled, padded groups as ``[num_blocks, global_batch_size]``
        and the order in which the blocks are visited (one epoch kept cached)."""
        if self._epoch_blocks is None or self._epoch_blocks[0] != epoch:
            blocks, visit = self._shuffle(epoch) if self.order_dir is None else self._shared_blocks(epoch)
            self._epoch_blocks = (epoch, blocks, visit)
        return self._epoch_blocks[1], self._epoch_blocks[2]

    def _shuffle(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, epoch))
        g = self.global_batch_size
        buf = np.empty(self.epoch_length, dtype=self._dtype)
        pos = 0
        for grp in self._groups:
            n = len(grp)
            part = buf[pos:pos + n]
            part[:] = grp
            rng.shuffle(part)  # == grp[rng.permutation(n)], in place
            pos += n
            short = (-n) % g
            if short:
                buf[pos:pos + short] = grp[rng.integers(0, n, size=short)]
                pos += short
        blocks = buf.reshape(-1, g)
        return blocks, rng.permutation(len(blocks))

    def _shared_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch order from ``order_dir``: written once (under a lock) by the first process, mapped by all."""
        sizes = np.asarray([len(grp) for grp in self._groups], dtype=np.int64)
        tag = f"order-s{self.seed}-g{self.global_batch_size}-n{self.num_samples}-c{zlib.crc32(sizes.tobytes()):08x}"
        stem = os.path.join(self.order_dir, f"{tag}-e{epoch}")
        if not os.path.exists(stem + ".blocks.npy"):
            with file_lock(os.path.join(self.order_dir, ".lock")):
                if not os.path.exists(stem + ".blocks.npy"):
                    blocks, visit = self._shuffle(epoch)
                    for name, arr in (("visit", visit), ("blocks", blocks)):  # blocks last: its presence = done
                        np.save(f"{stem}.{name}.tmp-{os.getpid()}.npy", arr)
                        os.replace(f"{stem}.{name}.tmp-{os.getpid()}.npy", f"{stem}.{name}.npy")
                    del blocks
                    for old in glob.glob(os.path.join(self.order_dir, f"{tag}-e*.npy")):
                        m = re.search(r"-e(\d+)\.(blocks|visit)\.npy$", old)
                        if m and int(m.group(1)) < epoch - 1:
                            os.remove(old)  # ranks still mapping it keep their pages until they unmap
        blocks = np.load(stem + ".blocks.npy", mmap_mode="r")
        visit = np.load(stem + ".visit.npy", mmap_mode="r")  # N / global_batch_size entries: mapped too
        assert blocks.shape == (self.epoch_length // self.global_batch_size, self.global_batch_size), stem
        return blocks, visit

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global sequence of dataset indices (length ``epoch_length``; materialised)."""
        blocks, visit = self._blocks(self.epoch if epoch is None else epoch)
        return blocks[visit].reshape(-1)

    def _iter_batches(self, rank: int, start: int) -> Iterator[list[int]]:
        blocks, visit = self._blocks(self.epoch)
        g, b = self.global_batch_size, self.batch_size
        for p in range(start, self.epoch_length, self.micro_step_size):
            off = p % g + rank * b  # a micro-step never crosses a block: micro_step_size divides g
            yield blocks[visit[p // g], off:off + b].tolist()

    def rank_batches(self, rank: int | None = None, start: int | None = None) -> list[list[int]]:
        """Micro-batches replica ``rank`` reads from position ``start`` (default: consumed) to epoch end."""
        rank = self.rank if rank is None else rank
        start = self.consumed_samples if start is None else start
        return list(self._iter_batches(rank, start))

    def __iter__(self) -> Iterator[list[int]]:
        if self.consumed_samples % self.micro_step_size:
            raise ValueError(f"consumed_samples={self.consumed_samples} is not a multiple of "
                             f"num_replicas*batch_size={self.micro_step_size}; resume from an optimizer-step "
                             "boundary")
        return self._iter_batches(self.rank, self.consumed_samples)

    def __len__(self) -> int:
        return max(0, -(-(self.epoch_length - self.consumed_samples) // self.micro_step_size))

    # ------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def advance(self, micro_steps: int = 1) -> None:
        """Mark ``micro_steps`` micro-steps (all replicas) as consumed; wraps to the next epoch at the end."""
        self.consumed_samples += micro_steps * self.micro_step_size
        if self.consumed_samples >= self.epoch_length:
            self.epoch += 1
            self.consumed_samples = 0

    def record_skips(self, skipped: Sequence[dict[str, Any]]) -> None:
        for s in skipped:
            self.skipped[s["reason"]] += 1
            self.bad_samples[int(s["index"])] = s["reason"]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; identical on every rank except for skip bookkeeping."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "skipped": dict(self.skipped),
            "bad_samples": {str(k): v for k, v in sorted(self.bad_samples.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("num_samples", self.num_samples)):
            if state.get(key) != mine:
                raise ValueError(f"sampler state {key}={state.get(key)!r} does not match this run's {mine!r}; "
                                 "the global order would differ")
        self.epoch = int(state["epoch"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped = Counter(state.get("skipped", {}))
        self.bad_samples = {int(k): v for k, v in state.get("bad_samples", {}).items()}
        logger.info("sampler resumed at epoch %d, consumed %d/%d samples, %d known bad samples",
                    self.epoch, self.consumed_samples, self.epoch_length, len(self.bad_samples))
