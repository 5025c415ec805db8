"""``ours``: the trainer's megatron ``dist_checkpointing`` (``torch_dist``) checkpoints
(:mod:`mm.training.checkpointing`).

A ``torch_dist`` checkpoint is PyTorch DCP underneath: every tensor is stored with its *global* shape
(each rank wrote its chunks), so reading needs no model and no process group: one tensor at a time is
loaded in full through DCP. Keys: the model under its parameter names (the released key space),
``ema_model.<name>`` for the EMA, ``optimizer.state.{param,exp_avg,exp_avg_sq,ema_params}.<name>`` for the
distributed optimizer (``fully_reshardable``: one global tensor per parameter); the common state holds our
trainer's state and the optimizer's param_groups.

The layout a checkpoint was saved with is read back from it: TP from the chunks of a column-parallel
weight, PP and CP from the trainer's run config in the common state, DP from the saved world size.
Tensors are global (blocks keep their ``transformer_blocks.<stage>.<block>`` names at any PP), so a change
of TP/PP/DP is a plain load and needs no conversion.

Writing goes through megatron's own ``dist_checkpointing.save`` in this one process (a world of one,
gloo): each tensor is one global chunk, which megatron loads at any TP/DP size (resharding happens on
load). It holds the tensors it writes in memory at once (one copy of the output).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader

from checkpoint_tools.keyspace import OPTIMIZER_GROUPS, CheckpointError, Source, TensorInfo, canonical

PREFETCH_BYTES = 64 * 2**20
_EMA = "ema_model."
_OPT = "optimizer.state."


def is_ours(path: Path) -> bool:
    return (path / "metadata.json").is_file() or (
        (path / "latest_checkpointed_iteration.txt").is_file() and resolve_iteration_dir(path)[0].joinpath("metadata.json").is_file())


def resolve_iteration_dir(path: Path) -> tuple[Path, int | None]:
    from mm.training.checkpointing import iter_dir, latest_iteration

    if (path / "metadata.json").is_file():
        name = path.name
        return path, int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None
    try:
        it = latest_iteration(path)
    except ValueError as e:
        raise CheckpointError(str(e))
    if it is None:
        raise CheckpointError(f"no complete checkpoint (iter_NNNNNNN/) under {path}")
    return iter_dir(path, it), it


def _megatron():
    from mm.ops import select_backend

    select_backend()  # megatron-core must be patched for the backend before it is imported


class _CachedReader(FileSystemReader):
    """DCP's file reader with its (pickled, large) metadata read once: the tools load tensor by tensor."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class OursSource(Source):
    def __init__(self, path: Path):
        super().__init__(format="ours", path=path)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        _megatron()
        from megatron.core import dist_checkpointing

        self.iter_dir, self.iteration = resolve_iteration_dir(path)
        meta = json.loads((self.iter_dir / "metadata.json").read_text())
        if meta.get("sharded_backend") != "torch_dist":
            raise CheckpointError(f"{self.iter_dir}: sharded backend {meta.get('sharded_backend')!r}, "
                                  "these tools read torch_dist")
        try:
            self._reader = _CachedReader(str(self.iter_dir))
            self._md = self._reader.read_metadata()
            common = dist_checkpointing.load_common_state_dict(str(self.iter_dir))
        except Exception as e:  # a damaged .metadata or common state
            raise CheckpointError(f"{self.iter_dir}: unreadable ({e})")
        self.common = dict(common.get("common", {}))
        opt = common.get("optimizer")
        self.optimizer_common = opt.get("optimizer") if isinstance(opt, dict) else None
        if self.common.get("iteration") is not None:
            self.iteration = self.common["iteration"]
        world = common.get("content_metadata", {}).get("world_size")
        tensors = {k: v for k, v in self._md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        groups: dict[str, dict[str, TensorInfo]] = {g: {} for g in ("raw", "ema", *OPTIMIZER_GROUPS)}
        self._names: dict[tuple[str, str], str] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._order: dict[str, dict[str, int]] = {}
        for name, m in tensors.items():
            if name.startswith(_EMA):
                group, key = "ema", name[len(_EMA):]
            elif name.startswith(_OPT):
                group, _, key = name[len(_OPT):].partition(".")
                if group not in OPTIMIZER_GROUPS:
                    raise CheckpointError(f"{self.iter_dir}: unknown optimizer state {name!r}")
            else:
                group, key = "raw", name
            groups[group][key] = TensorInfo(tuple(m.size), m.properties.dtype)
            self._names[(group, key)] = name
        self.infos = {g: {k: v[k] for k in canonical(v)} for g, v in groups.items() if v}
        tp = self._saved_tp(tensors)
        # PP and CP leave no trace in global tensors: the trainer's run config records them
        parallel = (self.common.get("config") or {}).get("parallel") or {}
        pp = int(parallel.get("pipeline_model_parallel_size", 1))
        cp = int(parallel.get("context_parallel_size", 1))
        self.layout = {"tp": tp, "pp": pp}
        if cp > 1:
            self.layout["cp"] = cp
        if world:
            self.layout["dp"] = world // (tp * pp * cp)
        self.extra["samples_seen"] = self.common.get("samples_seen")
        cfg = self.common.get("config", {})
        pred = cfg.get("model", {}).get("predictor") if isinstance(cfg.get("model"), dict) else None
        if isinstance(pred, dict):
            self.config = pred
        rng_dir = self.iter_dir / "rng"
        rng_files = sorted(rng_dir.glob("rank_*.pt")) if rng_dir.is_dir() else []
        self.rng = [torch.load(f, weights_only=False) for f in rng_files] or None

    @staticmethod
    def _saved_tp(tensors) -> int:
        from mm.models.sparse_ummdit import tp_split_dim

        for name, m in tensors.items():
            dim = tp_split_dim(name)
            if dim == 0 and not name.startswith((_EMA, _OPT)) and m.chunks:
                return len({c.offsets[0] for c in m.chunks})
        return 1

    def read(self, group: str, key: str) -> torch.Tensor:
        """The full tensor. DCP loads have a fixed cost each, so a miss loads this key and the uncached keys
        after it in the group's order, up to ``PREFETCH_BYTES`` (or this one tensor if larger), in one call;
        every tensor leaves the cache when it is read."""
        from torch.distributed.checkpoint import load

        infos = self.keys(group)
        hit = self._cache.pop((group, key), None)
        if hit is not None:
            return hit
        order = self._order.setdefault(group, {k: i for i, k in enumerate(infos)})
        names = list(infos)
        batch, size = {}, 0
        for k in names[order[key]:]:
            if k != key and (group, k) in self._cache:
                continue
            info = infos[k]
            if batch and size + info.nbytes > PREFETCH_BYTES:
                break
            batch[k] = torch.empty(info.shape, dtype=info.dtype)
            size += info.nbytes
        try:
            load({self._names[(group, k)]: t for k, t in batch.items()}, storage_reader=self._reader, no_dist=True)
        except Exception as e:  # DCP wraps a short read of a damaged .distcp file
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"{self.iter_dir}: cannot read {group} tensors from {key!r} on (truncated or "
                                  f"corrupt file?): {lines[-1] if lines else type(e).__name__}")
        out = batch.pop(key)
        self._cache.update({(group, k): t for k, t in batch.items()})
        return out

    def files(self) -> list[Path]:
        return sorted(p for p in self.iter_dir.rglob("*") if p.is_file())


def write_ours(root: Path, groups: dict[str, dict[str, TensorInfo]], read: Callable[[str, str], torch.Tensor], *,
               iteration: int, common: dict, optimizer_common: dict | None, rng: list | None,
               progress=None) -> list[Path]:
    """Write a ``torch_dist`` checkpoint ``root/iter_NNNNNNN`` (+ the ``latest`` pointer and a manifest)."""
    _megatron()
    import torch.distributed as dist

    from mm.distributed.init import init_process_group

    if root.exists() and any(root.iterdir()):
        raise CheckpointError(f"{root} exists and is not empty")
    created = not dist.is_initialized()
    init_process_group()  # megatron's save runs collectives: a world of one (gloo) in this process
    try:
        return _save(root, groups, read, iteration, common, optimizer_common, rng, progress)
    finally:
        if created:
            dist.destroy_process_group()


def _save(root, groups, read, iteration, common, optimizer_common, rng, progress) -> list[Path]:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from mm.training.checkpoint_manifest import write_manifest
    from mm.training.checkpointing import LATEST, OPT_META, iter_dir

    from checkpoint_tools.keyspace import megatron_linear_modules

    if dist.get_world_size() != 1:
        raise CheckpointError(f"run the tool in one process (world size {dist.get_world_size()})")
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True)

    read_once: dict[tuple[int, str], torch.Tensor] = {}  # one set given as both weights and EMA is read once

    def sharded(group: str, prefix: str) -> dict:
        out = {}
        for key in groups[group]:
            t = read_once.get((id(groups[group]), key))
            if t is None:
                t = read_once[(id(groups[group]), key)] = read(group, key).contiguous()
            out[prefix + key] = ShardedTensor.from_rank_offsets(prefix + key, t, replica_id=0)
            if progress is not None:
                progress.update(1)
        return out

    weights = groups.get("raw") or groups.get("ema")
    state: dict = {"common": common}
    for group, entry, prefix in (("raw", "model", ""), ("ema", "ema_model", _EMA)):
        if group in groups:
            state[entry] = sharded(group, prefix)
            for module in megatron_linear_modules(weights):  # what megatron's linears save besides tensors
                k = f"{prefix}{module}._extra_state"
                state[entry][k] = ShardedObject(k, None, (1,), (0,), replica_id=0)
    opt_groups = [g for g in OPTIMIZER_GROUPS if g in groups]
    if opt_groups:
        if optimizer_common is None:
            raise CheckpointError("optimizer tensors without the optimizer's param_groups")
        state["optimizer"] = {"optimizer": optimizer_common,
                              "param_state_sharding_type": OPT_META["distrib_optim_sharding_type"]}
        for g in opt_groups:
            state["optimizer"][g] = sharded(g, f"{_OPT}{g}.")
    dist_checkpointing.save(state, str(tmp), content_metadata={"world_size": 1, **OPT_META})
    if rng:
        (tmp / "rng").mkdir()
        for r, s in enumerate(rng):
            torch.save(s, tmp / "rng" / f"rank_{r:05d}.pt")
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (root / LATEST).write_text(f"{iteration}\n")
    return sorted(p for p in final.rglob("*") if p.is_file()) + [root / LATEST]
