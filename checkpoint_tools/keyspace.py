"""The released SUV key space (spec §2.11) as the tools see it, and the checkpoint abstractions shared by
every layout.

A checkpoint is read through a :class:`Source`: named *groups* of tensors, each group a dict in the
released key space with full (TP-merged, PP-merged) tensors, read one tensor at a time:

* ``raw`` / ``ema``: the trained weights and their EMA;
* ``param`` / ``exp_avg`` / ``exp_avg_sq`` / ``ema_params``: the optimizer's fp32 state per parameter
  (megatron's distributed optimizer: master weights, Adam moments, the EMA kept by the fused EMA-AdamW).

Keys are canonical: megatron's ``_extra_state`` entries and the six tensors of the last block's dead text
modules (present in TP > 1 upstream checkpoints, spec §2.11) are not part of any group. Writers put them
back where the target layout has them. The TP split dims come from the model
(:func:`mm.models.sparse_ummdit.tp_split_dim`), never from here.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

WEIGHT_GROUPS = ("raw", "ema")
OPTIMIZER_GROUPS = ("param", "exp_avg", "exp_avg_sq", "ema_params")
GROUPS = WEIGHT_GROUPS + OPTIMIZER_GROUPS

_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked (bad path, layout, shard set or file)."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Source(abc.ABC):
    """A checkpoint opened for reading. Subclasses fill the metadata and implement :meth:`read`."""

    format: str
    path: Path
    iteration: int | None = None
    layout: dict = field(default_factory=dict)  # e.g. {"tp": 2, "pp": 1, "dp": 1}
    infos: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # group -> key -> info
    common: dict = field(default_factory=dict)  # our trainer's common state (scheduler, sampler, ...)
    optimizer_common: dict | None = None  # megatron optimizer param_groups (non-tensor state)
    rng: list | None = None  # per-rank RNG states of our trainer, in rank order
    extra: dict = field(default_factory=dict)  # layout-specific facts for `inspect`
    config: dict | None = None  # upstream predictor (or VAE "ae") dict, when the checkpoint carries one
    model: str = "SUV"  # or "WFVAE"

    def groups(self) -> list[str]:
        return [g for g in GROUPS if self.infos.get(g)]

    def keys(self, group: str) -> dict[str, TensorInfo]:
        if group not in self.infos or not self.infos[group]:
            raise CheckpointError(f"{self.path} ({self.format}) has no {group!r} tensors "
                                  f"(it has: {', '.join(self.groups()) or 'none'})")
        return self.infos[group]

    @abc.abstractmethod
    def read(self, group: str, key: str) -> torch.Tensor:
        """The full tensor ``key`` of ``group`` in the released key space."""

    def files(self) -> list[Path]:
        return sorted(p for p in ([self.path] if self.path.is_file() else self.path.rglob("*")) if p.is_file())

    def close(self) -> None:
        """Release open files or memory maps; sources that hold none keep this default."""


def weights_group(source: Source, ema: bool | None) -> str:
    """The weight group to convert: ``ema`` when asked (error if absent), ``raw`` when asked; by default
    the EMA where there is one (what inference and the release use), else the raw weights."""
    have = source.groups()
    if ema is None:
        return "ema" if "ema" in have else "raw"
    want = "ema" if ema else "raw"
    if want not in have:
        raise CheckpointError(f"{source.path} ({source.format}) has no {'EMA' if ema else 'raw'} weights "
                              f"(it has: {', '.join(have) or 'none'})")
    return want


def last_block(keys: Iterable[str]) -> tuple[int, int]:
    """(stage, block) of the model's last block, from the keys."""
    stages: dict[int, int] = {}
    for k in keys:
        m = _BLOCK_RE.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            stages[s] = max(stages.get(s, -1), b)
    if not stages:
        raise CheckpointError("no transformer_blocks.<stage>.<block> tensors: not an SUV predictor checkpoint")
    s = max(stages)
    return s, stages[s]


def num_layers_of(keys: Iterable[str]) -> list[int]:
    """Blocks per U stage, from the keys (``transformer_blocks.<stage>.<block>.``)."""
    stages: dict[int, int] = {}
    for k in keys:
        m = _BLOCK_RE.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            stages[s] = max(stages.get(s, 0), b + 1)
    if sorted(stages) != list(range(len(stages))):
        raise CheckpointError(f"U stages {sorted(stages)} are not 0..{len(stages) - 1}: a stage is missing")
    return [stages[s] for s in range(len(stages))]


def dead_prefixes(keys: Iterable[str]) -> tuple[str, ...]:
    """Key prefixes of the last block's dead text modules (present only in TP > 1 upstream files)."""
    from mm.models.sparse_ummdit import DEAD_LAST_BLOCK_MODULES

    s, b = last_block(keys)
    return tuple(f"transformer_blocks.{s}.{b}.{m}" for m in DEAD_LAST_BLOCK_MODULES)


def model_kind(keys: Iterable[str]) -> str:
    """``SUV`` (the denoiser) or ``WFVAE`` (the VAE, spec §4.8), from the keys."""
    keys = list(keys)
    if any(_BLOCK_RE.match(k) for k in keys):
        return "SUV"
    if keys and all(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "WFVAE"
    raise CheckpointError(f"neither SUV (transformer_blocks.*) nor WFVAE (encoder.*/decoder.*) keys: {keys[:5]}")


def canonical(keys: Iterable[str]) -> list[str]:
    """The keys that belong to the released key space of our model: no ``_extra_state``, no dead tensors."""
    from mm.models.sparse_ummdit import EXTRA_STATE_SUFFIX

    keys = [k for k in keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if model_kind(keys) == "WFVAE":
        return keys
    dead = dead_prefixes(keys)
    return [k for k in keys if not k.startswith(dead)]


def dead_tensors(keys: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Shapes of the six dead last-block tensors upstream writes at TP > 1 (full shapes): those of the same
    modules in the block before it, which are live."""
    s, b = last_block(keys)
    if b == 0:
        raise CheckpointError("the last U stage has one block: no live block to take the dead tensors' shapes from")
    out = {}
    for prefix in dead_prefixes(keys):
        live = prefix.replace(f"transformer_blocks.{s}.{b}.", f"transformer_blocks.{s}.{b - 1}.", 1)
        for k, info in keys.items():
            if k.startswith(live):
                out[prefix + k[len(live):]] = info
    return out


def megatron_linear_modules(keys: Iterable[str]) -> list[str]:
    """Module names of the megatron (column/row parallel) linears, which carry an ``_extra_state`` entry:
    the modules whose weight has a TP split dim."""
    from mm.models.sparse_ummdit import tp_split_dim

    return [k[: -len(".weight")] for k in keys if k.endswith(".weight") and tp_split_dim(k) is not None]


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)
