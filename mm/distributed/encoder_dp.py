"""Encoder data parallelism (spec §7.3): encode once per TP x CP group and share the features.

The loader is sharded over DP x TP x CP (every pipeline stage reads the same samples and has its own
TP x CP group), so every rank of a TP x CP group of size G reads a different sample. Every G micro-steps each rank encodes its own sample with the frozen encoders and
the features are all-gathered inside the group; micro-step j of the round uses entry j on every rank,
so the group still computes on identical inputs (what TP/CP need) without encoding G times.
Shapes must agree inside a group (the group sampler gives one shape per global batch).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Iterator

import torch
import torch.distributed as dist


class EncoderDPFeatures:
    """Iterator of per-micro-step features for one rank of a TP x CP group."""

    def __init__(self, batches: Iterator, encode: Callable, group, group_size: int):
        self.batches, self.encode, self.group, self.size = batches, encode, group, group_size
        self._cache: list = []

    def __iter__(self):
        return self

    def __next__(self):
        if not self._cache:
            feats = self.encode(next(self.batches))
            self._cache = all_gather_features(feats, self.group, self.size)
        return self._cache.pop(0)

    @property
    def pending(self) -> int:
        return len(self._cache)


def all_gather_features(feats, group, size: int) -> list:
    """All-gather every tensor field of a features dataclass within ``group``; rank order = entry order."""
    if size == 1:
        return [feats]
    per_rank = [dict() for _ in range(size)]
    for f in fields(feats):
        t = getattr(feats, f.name)
        if t is None:
            for d in per_rank:
                d[f.name] = None
            continue
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        for d, p in zip(per_rank, parts):
            d[f.name] = p
    return [type(feats)(**d) for d in per_rank]
