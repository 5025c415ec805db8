"""Training checkpoints with megatron ``dist_checkpointing`` (torch_dist), written atomically.

Layout under ``--save``::

    iter_0000004/                 one complete checkpoint (dist_checkpointing files + common state)
      rng/rank_00000.pt           per-rank RNG states (restored only at the same world size)
      meta.json                   small facts readable before anything is built (optimizer kind, ...)
      manifest.json               size + SHA-256 of every file above (mm.training.checkpoint_manifest)
    iter_0000006.tmp/             a save in progress (or one that crashed): never loaded
    iter_0000004.old/             the previous copy during a re-save of iteration 4 (deleted after it)
    latest_checkpointed_iteration.txt   written last, atomically (tmp file + rename)

A save goes to ``iter_N.tmp`` on all ranks; the ranks checksum its files (each a share) and rank 0
writes the manifest, renames it to ``iter_N``, updates the pointer and prunes to the last ``keep_last``
checkpoints. A crash anywhere before the rename leaves the previous checkpoint as the latest; a re-save
of an existing iteration moves the old copy aside and deletes it only after the new one is in place.
A load verifies the manifest first (every rank checksums a share of the files) and, when the newest
checkpoint is damaged, names the bad file and falls back to the newest one that verifies. The model and the distributed optimizer are saved in megatron's
``fully_reshardable`` format, so a checkpoint loads at another TP or DP size. Explicit generators
(noise, posterior sampling) are saved per rank next to the global RNG states.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import json

import torch
import torch.distributed as dist

from mm.training import checkpoint_manifest as manifest

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
META = "meta.json"
OPT_META = {"distrib_optim_sharding_type": "fully_reshardable"}
_ITER_RE = re.compile(r"^iter_(\d{7})(\.old)?$")


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """Complete checkpoints under ``root`` by iteration: ``iter_N``, or ``iter_N.old`` when a re-save of N
    was interrupted between its two renames (the old copy is then the good one)."""
    out: dict[int, Path] = {}
    for p in Path(root).glob("iter_*"):
        m = _ITER_RE.match(p.name)
        if m and p.is_dir() and (not m.group(2) or int(m.group(1)) not in out):
            out[int(m.group(1))] = p
    return out


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    """The directory holding iteration ``iteration`` (see ``complete_dirs``)."""
    return complete_dirs(root).get(iteration, iter_dir(root, iteration))


def model_sharded_state_dict(module: torch.nn.Module, prefix: str = "", metadata: dict | None = None) -> dict:
    """Sharded state dict of a plain ``nn.Module`` tree that contains megatron TP layers.

    Modules with their own ``sharded_state_dict`` (megatron layers) describe their TP sharding;
    everything else is replicated over TP and DP.
    """
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict(prefix=prefix, metadata=metadata)
    own: dict[str, Any] = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    if own:
        out = dict(make_sharded_tensors_for_checkpoint(own, prefix, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]))
    for name, child in module.named_children():
        out.update(model_sharded_state_dict(child, f"{prefix}{name}.", metadata))
    return out


def _rng_state(generators: dict[str, torch.Generator] | None) -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "generators": {k: g.get_state() for k, g in (generators or {}).items()}}


def _set_rng_state(state: dict, generators: dict[str, torch.Generator] | None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def latest_iteration(root: str | os.PathLike) -> int | None:
    """Iteration of the latest *complete* checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    ptr = root / LATEST
    if ptr.is_file():
        text = ptr.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"corrupt checkpoint pointer {ptr}: {text!r} is not an iteration number")
        it = int(text)
        if it in complete_dirs(root):
            return it
        logger.warning("checkpoint pointer %s names a missing iter_%07d; scanning %s", ptr, it, root)
    its = sorted(complete_dirs(root))
    return its[-1] if its else None


def _checksum_share(ckpt: Path) -> None:
    """Write ``ckpt``'s manifest, every rank checksumming a share of the files (rank 0 writes it)."""
    files = [manifest.checkpoint_files(ckpt) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(files, src=0)
    share = manifest.file_entries(ckpt, files[0][_rank()::_world()])
    shares = [share]
    if dist.is_initialized():
        shares = [None] * _world()
        dist.all_gather_object(shares, share)
    if _rank() == 0:
        manifest.write_manifest(ckpt, {k: v for s in shares for k, v in s.items()})


def verify_checkpoint(ckpt: str | os.PathLike) -> list[str]:
    """``verify_manifest`` with the checksums spread over the ranks; the same problem list on every rank."""
    ckpt = Path(ckpt)
    if not dist.is_initialized() or _world() == 1:
        return manifest.verify_manifest(ckpt)
    local: list[str] = []
    if not ckpt.is_dir():
        local = [f"{ckpt}: checkpoint directory does not exist"] if _rank() == 0 else []
    else:
        try:
            files = manifest.read_manifest(ckpt)
        except ValueError as e:
            local = [str(e)] if _rank() == 0 else []
        else:
            local = manifest.check_entries(ckpt, files, sorted(files)[_rank()::_world()])
            if _rank() == 0:
                local += manifest.unlisted_files(ckpt, files)
    gathered = [None] * _world()
    dist.all_gather_object(gathered, local)
    return sorted(p for g in gathered for p in g)


class CheckpointError(ValueError):
    """No checkpoint that verifies could be loaded (the message names the bad files)."""


def candidate_iterations(root: str | os.PathLike) -> list[int]:
    """Complete checkpoints to try, best first: the latest (pointer, else newest), then older ones, newest first."""
    root = Path(root)
    latest = latest_iteration(root)
    if latest is None:
        return []
    its = sorted(complete_dirs(root), reverse=True)
    return [latest] + [it for it in its if it < latest]


def read_meta(ckpt: str | os.PathLike) -> dict | None:
    """A checkpoint's ``meta.json`` when present and matching its manifest entry (else None)."""
    ckpt = Path(ckpt)
    try:
        files = manifest.read_manifest(ckpt)
    except ValueError:
        return None
    if META not in files or manifest.check_entries(ckpt, files, [META]):
        return None
    return json.loads((ckpt / META).read_text())


def resume_problems(load: str | None, save: str | None, use_distributed_optimizer: bool, load_optim: bool) -> list[str]:
    """What stops ``--load`` before anything is built: a path with no checkpoint that is not ``--save``
    (the auto-resume pattern), or an optimizer kind that differs from the checkpoint's."""
    if not load:
        return []
    candidates = candidate_iterations(load)
    if not candidates:
        if save and Path(load).resolve() == Path(save).resolve():
            return []  # --load = --save: the first start of a run that resumes itself
        if not Path(load).exists():
            return [f"--load {load}: no such directory (a typo? to start a run that resumes itself later, "
                    "pass the same directory to --save and --load)"]
        return [f"--load {load}: no checkpoint (iter_NNNNNNN/ with {LATEST}) in this directory"]
    if not load_optim:
        return []
    for it in candidates:  # the one a load would use (damaged ones are skipped there too)
        meta = read_meta(checkpoint_dir(load, it))
        if meta is None or "use_distributed_optimizer" not in meta:
            continue
        if bool(meta["use_distributed_optimizer"]) != use_distributed_optimizer:
            kind = {True: "the distributed optimizer (--use-distributed-optimizer)", False: "the plain optimizer"}
            return [f"--load {load}: {checkpoint_dir(load, it).name} was saved with {kind[meta['use_distributed_optimizer']]}"
                    f", this run uses {kind[use_distributed_optimizer]}; their states do not convert. Use the "
                    f"checkpoint's optimizer, or add --no-load-optim to keep the weights, iteration and data order "
                    f"with a fresh optimizer"]
        break
    return []


def _with_data(sharded: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """The model's sharded state dict re-keyed under ``prefix`` with other tensors of the same layout."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out = {}
    for k, v in sharded.items():
        if isinstance(v, ShardedTensor):
            if k not in tensors:
                raise KeyError(f"no EMA tensor for parameter {k!r}")
            out[prefix + k] = replace(v, key=prefix + v.key, data=tensors[k])
        elif isinstance(v, ShardedObject):
            out[prefix + k] = replace(v, key=prefix + v.key)
    return out


def save_checkpoint(root: str | os.PathLike, iteration: int, model: torch.nn.Module, optimizer,
                    common: dict, keep_last: int = 3, ema_weights: dict[str, torch.Tensor] | None = None,
                    generators: dict[str, torch.Generator] | None = None, meta: dict | None = None) -> Path:
    """Save model + optimizer (sharded) and ``common`` (plain picklable state, from rank 0).

    ``meta`` (JSON-able, from rank 0) goes to ``meta.json``, readable by ``read_meta`` without megatron.

    ``ema_weights`` (model-space EMA, e.g. ``ema_adamw.ema_model_state_dict``) are stored as a second
    model under ``ema_model.`` so inference can load them without building an optimizer.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # empty: megatron refuses to write into a non-empty directory quietly
    _barrier()
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd, "common": common}
    if ema_weights is not None:
        sharded["ema_model"] = _with_data(model_sd, "ema_model.", ema_weights)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPT_META)
    t0 = time.time()
    if _rank() == 0:
        logger.info("saving checkpoint %s ...", final)
    dist_checkpointing.save(sharded, str(tmp), content_metadata={"world_size": _world(), **OPT_META})
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(generators), tmp / "rng" / f"rank_{_rank():05d}.pt")
    if _rank() == 0 and meta is not None:
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    _barrier()
    _checksum_share(tmp)
    _barrier()
    if _rank() == 0:
        old = final.with_name(final.name + ".old")
        if final.exists():  # a re-save of the same iteration: keep the good copy until the new one is in place
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        ptr_tmp = root / (LATEST + ".tmp")
        ptr_tmp.write_text(f"{iteration}\n")
        os.replace(ptr_tmp, root / LATEST)
        if old.exists():
            shutil.rmtree(old)
        _prune(root, keep_last)
    _barrier()
    if _rank() == 0:
        logger.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
    return final


def _prune(root: Path, keep_last: int) -> None:
    dirs = complete_dirs(root)
    for it in sorted(dirs)[:-keep_last]:
        shutil.rmtree(dirs[it])


def load_checkpoint(root: str | os.PathLike, model: torch.nn.Module, optimizer, iteration: int | None = None,
                    load_rng: bool = True, use_ema: bool = False,
                    generators: dict[str, torch.Generator] | None = None, fallback: bool = True) -> tuple[int, dict]:
    """Load the latest checkpoint that verifies (or exactly ``iteration``) into model + optimizer.

    Returns ``(iteration, common)``. Works at another TP or DP size than the save. ``use_ema`` loads
    the EMA weights into the model instead (inference; pass ``optimizer=None``). A checkpoint whose
    manifest does not verify is skipped with a warning naming the bad files, and the next older one is
    tried; ``fallback=False`` (or an explicit ``iteration``) makes that a ``CheckpointError``.
    """
    root = Path(root)
    if iteration is None:
        candidates = candidate_iterations(root)
        if not candidates:
            raise FileNotFoundError(f"no complete checkpoint (iter_NNNNNNN/) under {root}")
    else:
        if iteration not in complete_dirs(root):
            raise FileNotFoundError(f"checkpoint directory {iter_dir(root, iteration)} does not exist")
        candidates = [iteration]
    rejected = []
    for it in candidates:
        ckpt = checkpoint_dir(root, it)
        problems = verify_checkpoint(ckpt)
        if not problems:
            if rejected and _rank() == 0:
                logger.warning("falling back to %s, the newest checkpoint that verifies", ckpt)
            return it, _load_verified(ckpt, it, model, optimizer, load_rng, use_ema, generators)
        rejected.append(f"{ckpt}: " + "; ".join(problems))
        if iteration is not None or not fallback:
            break
        if _rank() == 0:
            logger.warning("checkpoint %s is damaged, not loaded: %s", ckpt, "; ".join(problems))
    if iteration is not None:
        raise CheckpointError(f"checkpoint is damaged: {rejected[0]}")
    if not fallback:
        raise CheckpointError(f"the latest checkpoint is damaged (no fallback requested, older ones not tried): "
                              f"{rejected[0]}")
    raise CheckpointError(f"no checkpoint under {root} verifies: " + " | ".join(rejected))


def _load_verified(ckpt: Path, iteration: int, model: torch.nn.Module, optimizer, load_rng: bool, use_ema: bool,
                   generators: dict[str, torch.Generator] | None) -> dict:
    from megatron.core import dist_checkpointing

    t0 = time.time()
    model_sd = model_sharded_state_dict(model)
    key = "ema_model" if use_ema else "model"
    if use_ema:
        if optimizer is not None:
            raise ValueError("use_ema loads EMA weights for inference; pass optimizer=None")
        request = {key: _with_data(model_sd, "ema_model.", {k: v.data for k, v in model_sd.items() if hasattr(v, "data")})}
    else:
        request = {key: model_sd}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPT_META)
    common_sd = dist_checkpointing.load_common_state_dict(str(ckpt))
    loaded = dist_checkpointing.load(request, str(ckpt))
    state = loaded[key]
    if use_ema:
        state = {k[len("ema_model."):]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(_strip_extra(state, model), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = ckpt / "rng" / f"rank_{_rank():05d}.pt"
    saved_world = len(list((ckpt / "rng").glob("rank_*.pt")))
    if load_rng and saved_world == _world() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False), generators)
    elif load_rng:
        logger.warning("checkpoint saved with %d ranks, now %d: RNG states not restored", saved_world, _world())
    if _rank() == 0:
        logger.info("loaded checkpoint %s (iteration %d) in %.1fs", ckpt, iteration, time.time() - t0)
    return common_sd.get("common", {})


def _strip_extra(state: dict, model: torch.nn.Module) -> dict:
    """Keep ``_extra_state`` only where the model has such an entry."""
    expected = set(model.state_dict().keys())
    return {k: v for k, v in state.items() if not k.endswith("_extra_state") or k in expected}
