"""Measured peak tensor memory of real training steps: the planner's calibration source (``mm.tools.plan``).

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that counts the bytes of every tensor storage created
while it is active and subtracts them when the storage is freed (a weak reference per storage), so on
any device, CPU included, it reports the live and peak bytes of tensors (not allocator caches, not the
Python heap). :func:`measure_training_memory` builds the real :class:`~mm.training.trainer.Trainer` under
it and runs optimizer steps on latents of a chosen shape, returning the static bytes (weights, grad
buffers, optimizer and EMA state, frozen encoders) and the activation peak above them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _see(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse or t.is_nested:
            return
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        old = self._live.get(key)
        if old is None:
            weakref.finalize(storage, self._free, key)
            old = 0
        self._live[key] = size
        self.current += size - old
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out


@dataclass(frozen=True)
class MeasuredMemory:
    static_bytes: int  # after the steps: weights, grads, optimizer + EMA state, frozen encoders, inputs
    peak_bytes: int  # highest live bytes during the steps
    build_bytes: int  # after building the trainer (before any optimizer state exists)

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.static_bytes


def synthetic_features(batch: int, latent_channels: int, latent_thw: tuple[int, int, int], text_len: int,
                       caption_channels: int, pooled_dim: int, seed: int = 0):
    """One micro-batch of encoder outputs with every token valid (what the frozen encoders would hand over)."""
    from mm.training.frozen import Features

    g = torch.Generator().manual_seed(seed)
    t, h, w = latent_thw
    return Features(latents=torch.randn(batch, latent_channels, t, h, w, generator=g),
                    video_mask=torch.ones(batch, t, h, w, dtype=torch.int64),
                    text=torch.randn(batch, text_len, caption_channels, generator=g),
                    text_mask=torch.ones(batch, text_len, dtype=torch.int64),
                    pooled=torch.randn(batch, pooled_dim, generator=g))


def measure_training_memory(spec, data_cfg, run, latent_thw: tuple[int, int, int], text_len: int,
                            steps: int = 2) -> MeasuredMemory:
    """Build the trainer for ``run`` (process group and megatron groups initialised by it) and run
    ``steps`` optimizer steps on synthetic features of ``latent_thw`` latents and ``text_len`` tokens."""
    from mm.training.trainer import Trainer

    with LiveTensorBytes() as mem:
        trainer = Trainer(spec, data_cfg, run, data_num_workers=0)
        build = mem.current
        cfg = trainer.model.suv_config
        n = trainer.num_microbatches * steps
        feats = [synthetic_features(run.training.micro_batch_size, cfg.in_channels, latent_thw, text_len,
                                    cfg.caption_channels, cfg.pooled_projection_dim, seed=i) for i in range(n)]
        mem.reset_peak()
        stream = iter(feats)
        for _ in range(steps):
            trainer.train_step(stream)
        feats.clear()
        static = mem.current
        peak = mem.peak
        trainer.close()
    return MeasuredMemory(static_bytes=static, peak_bytes=peak, build_bytes=build)
