"""Upstream megatron legacy layouts: ``upstream-legacy`` (Open-Sora Plan / MindSpeed-MM training saves) and
``mindspeed-mm`` (the key space of MindSpeed-MM's OSP v1.5 converter), spec §7.9 and §10.1.

Directory layout (both)::

    SAVE/latest_checkpointed_iteration.txt          "N" or "release"
    SAVE/iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt     PP = 1
    SAVE/iter_NNNNNNN/mp_rank_TT_PPP/model_optim_rng.pt PP > 1

``model_optim_rng.pt`` holds ``model`` (this rank's TP/PP shard of the predictor state dict), ``ema_model``
(same keys, EMA weights), ``iteration``, ``checkpoint_version`` 3.0 and ``args``.

Merge rules (spec §10.1, upstream ``convert_mm_to_ckpt.py``): pipeline stages are merged first by
renumbering the first index after ``transformer_blocks.`` (for the SUV, the U stage) by the number of
distinct such indices held by the earlier pipeline ranks; other keys are taken from whichever pipeline rank
holds them. TP shards are then merged with the model's split rules
(:func:`mm.models.sparse_ummdit.merge_tp_state_dicts`), ``_extra_state`` entries are skipped.

Writing follows the same rules backwards. The U stages are split over the pipeline ranks in contiguous
runs balanced by block count; ``patch_embed`` and ``caption_projection`` go to the first rank,
``time_text_embed`` to every rank (each stage conditions its blocks on it), ``skip_norm_linear*.j`` to the
rank holding decoder stage ``mid + 1 + j`` (its consumer) and the output head to the last rank. Every
megatron linear gets its ``_extra_state`` entry (None), and at TP > 1 the last block carries the six dead
text tensors upstream instantiates there (written as zeros: no forward reads them).

Optimizer state and our trainer's state, which upstream keeps in megatron's flat distributed-optimizer
buffers, are written in a per-parameter form that these tools read back: ``distrib_optim.pt`` next to each
``model_optim_rng.pt`` holds ``{"format": "mm-per-parameter", "param"|"exp_avg"|"exp_avg_sq"|"ema_params":
{key: this rank's TP/PP shard}}``; ``model_optim_rng.pt`` adds ``optimizer`` (megatron param_groups),
``mm_common`` (scheduler, sampler, clipper state) and ``rng_state`` (per-rank RNG states). A
``distrib_optim.pt`` in megatron's flat-buffer form is reported and its optimizer state dropped.

``mindspeed-mm``: the same directory layout with the attention keys renamed as MindSpeed-MM's converter
does (``examples/opensoraplan1.5/convert_ckpt_to_mm.py``: ``replace_dit_state_dict`` / ``split_by_tp``,
and ``checkpoint/sora_model/opensoraplan_converter.py``: ``OpenSoraPlanConverter("v1.5").str_replace_mapping``,
read in the shanshuo/MindSpeed-MM mirror of Ascend/MindSpeed-MM): ``attn1.norm_q -> attn1.norm_proj_q``,
``norm_k -> norm_proj_k``, ``to_q/k/v -> proj_q/k/v``, ``add_{q,k,v}_proj -> added_proj_{q,k,v}``,
``to_out.0 -> proj_out``, ``to_add_out -> added_proj_out``, ``norm_added_{q,k} -> norm_added_proj_{q,k}``;
``_extra_state`` dropped; TP split with the same dims; saved as ``release/mp_rank_TT/model_optim_rng.pt``
holding only ``model``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from checkpoint_tools.keyspace import (
    OPTIMIZER_GROUPS,
    CheckpointError,
    Source,
    TensorInfo,
    canonical,
    dead_tensors,
    megatron_linear_modules,
    num_layers_of,
)

LATEST = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
PER_PARAMETER = "mm-per-parameter"
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_STAGE_RE = re.compile(r"^transformer_blocks\.(\d+)\.")

# MindSpeed-MM OSP v1.5 renames (released name -> MindSpeed-MM name), in the converter's order.
MINDSPEED_RENAMES = (
    ("attn1.norm_q", "attn1.norm_proj_q"), ("attn1.norm_k", "attn1.norm_proj_k"),
    ("attn1.to_q", "attn1.proj_q"), ("attn1.to_k", "attn1.proj_k"), ("attn1.to_v", "attn1.proj_v"),
    ("attn1.add_q_proj", "attn1.added_proj_q"), ("attn1.add_k_proj", "attn1.added_proj_k"),
    ("attn1.add_v_proj", "attn1.added_proj_v"), ("attn1.to_out.0", "attn1.proj_out"),
    ("attn1.to_add_out", "attn1.added_proj_out"), ("attn1.norm_added_q", "attn1.norm_added_proj_q"),
    ("attn1.norm_added_k", "attn1.norm_added_proj_k"),
)


def to_mindspeed(key: str) -> str:
    for old, new in MINDSPEED_RENAMES:
        if f".{old}." in f".{key}":
            return key.replace(old, new, 1)
    return key


def from_mindspeed(key: str) -> str:
    for old, new in MINDSPEED_RENAMES:
        if f".{new}." in f".{key}":
            return key.replace(new, old, 1)
    return key


def find_iteration_dir(path: Path) -> tuple[Path, int | None]:
    """The directory holding ``mp_rank_*`` and its iteration (None for ``release``)."""
    latest = path / LATEST
    if latest.is_file():
        text = latest.read_text().strip()
        if text == "release":
            return path / "release", None
        if not text.isdigit():
            raise CheckpointError(f"{latest}: {text!r} is neither an iteration number nor 'release'")
        return path / f"iter_{int(text):07d}", int(text)
    m = re.fullmatch(r"iter_(\d{7})", path.name)
    return path, (int(m.group(1)) if m else None)


def is_legacy_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    d, _ = find_iteration_dir(path)
    return d.is_dir() and any(_RANK_RE.match(p.name) for p in d.iterdir())


def _load(path: Path) -> dict:
    """One ``model_optim_rng.pt`` / ``distrib_optim.pt``, memory-mapped (tensors are paged in when read).
    These files pickle ``args`` (an argparse Namespace) and other objects: open only checkpoints you trust."""
    if not path.is_file():
        raise CheckpointError(f"missing shard file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for a damaged file
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt: {e})")


class LegacySource(Source):
    """A megatron legacy save of the SUV (upstream-legacy or mindspeed-mm key space), any TP and PP."""

    def __init__(self, path: Path):
        super().__init__(format="upstream-legacy", path=path)
        d, self.iteration = find_iteration_dir(path)
        if not d.is_dir():
            raise CheckpointError(f"{d} does not exist (named by {path / LATEST})")
        ranks = {}
        for p in d.iterdir():
            m = _RANK_RE.match(p.name)
            if m and p.is_dir():
                ranks[(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))] = p
        if not ranks:
            raise CheckpointError(f"no mp_rank_* directories under {d}")
        pp_forms = {pp is None for _, pp in ranks}
        if len(pp_forms) > 1:
            raise CheckpointError(f"{d} mixes mp_rank_TT and mp_rank_TT_PPP directories (two saves of different "
                                  "pipeline sizes in one directory)")
        named_pp = None not in {q for _, q in ranks}
        tp = 1 + max(t for t, _ in ranks)
        pp = 1 + max(q for _, q in ranks) if named_pp else 1

        def rank_key(t: int, p: int) -> tuple[int, int | None]:
            return (t, p if named_pp else None)

        def rank_name(t: int, p: int) -> str:
            return f"mp_rank_{t:02d}" + (f"_{p:03d}" if named_pp else "")

        missing = [rank_name(t, p) for p in range(pp) for t in range(tp) if rank_key(t, p) not in ranks]
        if missing:
            raise CheckpointError(f"{d}: missing shard directories {missing} (TP {tp} x PP {pp} expected)")
        self.iter_dir = d
        self.layout = {"tp": tp, "pp": pp}
        self._dirs = [[ranks[rank_key(t, p)] for t in range(tp)] for p in range(pp)]
        self._objs = [[_load(self._dirs[p][t] / MODEL_FILE) for t in range(tp)] for p in range(pp)]
        self._read_bytes: dict[Path, int] = {}  # per file, since it was last mapped
        first = self._objs[0][0]
        model_keys = [k for k in first.get("model", {})]
        self.mindspeed = any(".attn1.proj_q." in k for k in model_keys)
        if self.mindspeed:
            self.format = "mindspeed-mm"
        if self.iteration is None and isinstance(first.get("iteration"), int) and d.name != "release":
            self.iteration = first["iteration"]
        args = first.get("args")
        saved = (getattr(args, "tensor_model_parallel_size", tp), getattr(args, "pipeline_model_parallel_size", pp))
        if saved != (tp, pp):
            raise CheckpointError(f"{d}: saved with TP {saved[0]} x PP {saved[1]} (its args) but holds shards for "
                                  f"TP {tp} x PP {pp}: shard directories are missing or left from another save")
        if args is not None:
            world = getattr(args, "world_size", None)
            if world:
                self.layout["dp"] = world // (tp * pp)
            for name in ("consumed_train_samples", "consumed_valid_samples"):
                if getattr(args, name, None) is not None:
                    self.extra[name] = getattr(args, name)
        for key in ("checkpoint_version",):
            if key in first:
                self.extra[key] = first[key]
        # group -> global key -> (pp rank, local key in the file)
        self._where: dict[str, dict[str, tuple[int, str]]] = {}
        for group, entry in (("raw", "model"), ("ema", "ema_model")):
            if entry in first:
                self._index(group, [[o.get(entry) for o in row] for row in self._objs], entry)
        self._optim = None
        optim_files = [[self._dirs[p][t] / OPTIM_FILE for t in range(tp)] for p in range(pp)]
        if optim_files[0][0].is_file():
            objs = [[_load(f) for f in row] for row in optim_files]
            if objs[0][0].get("format") == PER_PARAMETER:
                self._optim = objs
                for group in OPTIMIZER_GROUPS:
                    self._index(group, [[o.get(group) for o in row] for row in objs], f"{OPTIM_FILE}:{group}")
            else:
                self.extra["optimizer"] = (f"{OPTIM_FILE} in megatron's flat-buffer layout: not read "
                                           "(its optimizer state is dropped by convert)")
        self.optimizer_common = first.get("optimizer") if self._optim is not None else None
        self.common = dict(first.get("mm_common") or {})
        self.rng = first.get("rng_state") if isinstance(first.get("rng_state"), list) else None

    def _index(self, group: str, shards: list[list[Mapping | None]], entry: str) -> None:
        where: dict[str, tuple[int, str]] = {}
        offset = 0
        for p, row in enumerate(shards):
            for t, sd in enumerate(row):
                if not isinstance(sd, Mapping):
                    raise CheckpointError(f"{self._dirs[p][t]}: no {entry!r} entry while rank 0 has one")
                if set(sd) != set(row[0]):
                    raise CheckpointError(f"{self._dirs[p][t]}: its {entry!r} keys differ from "
                                          f"{self._dirs[p][0].name}'s: {sorted(set(sd) ^ set(row[0]))[:5]}")
            stages = set()
            for local in row[0]:
                if local.endswith("_extra_state"):
                    continue
                key = from_mindspeed(local) if self.mindspeed else local
                m = _STAGE_RE.match(key)
                if m:  # PP merge: renumber the U stage by the stages of the earlier pipeline ranks
                    stages.add(int(m.group(1)))
                    key = f"transformer_blocks.{int(m.group(1)) + offset}." + key[m.end():]
                where[key] = (p, local)
            offset += len(stages)
        infos = {}
        for key, (p, local) in where.items():
            infos[key] = self._merged_info(group, p, local)
        keys = canonical(infos)
        self._where[group] = {k: where[k] for k in keys}
        self.infos[group] = {k: infos[k] for k in keys}

    def _shards(self, group: str, p: int, local: str) -> list[torch.Tensor]:
        if group in ("raw", "ema"):
            entry = "model" if group == "raw" else "ema_model"
            out = [o[entry][local] for o in self._objs[p]]
        else:
            out = [o[group][local] for o in self._optim[p]]
        bad = [t for t, v in enumerate(out) if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{self._dirs[p][bad[0]]}: entry {local!r} is not a tensor")
        return out

    def _merged_info(self, group: str, p: int, local: str) -> TensorInfo:
        from mm.models.sparse_ummdit import tp_split_dim

        shards = self._shards(group, p, local)
        key = from_mindspeed(local) if self.mindspeed else local
        dim = tp_split_dim(key)
        shape = list(shards[0].shape)
        if dim is not None and len(shards) > 1:
            if any(s.shape[:dim] != shards[0].shape[:dim] or s.shape[dim + 1:] != shards[0].shape[dim + 1:]
                   for s in shards):
                raise CheckpointError(f"{self.iter_dir}: TP shards of {local!r} have mixed shapes "
                                      f"{[tuple(s.shape) for s in shards]}")
            shape[dim] = sum(s.shape[dim] for s in shards)
        elif any(s.shape != shards[0].shape for s in shards):
            raise CheckpointError(f"{self.iter_dir}: replicated {local!r} differs in shape across TP ranks "
                                  f"{[tuple(s.shape) for s in shards]}")
        return TensorInfo(tuple(shape), shards[0].dtype)

    def read(self, group: str, key: str) -> torch.Tensor:
        """The TP-merged tensor (a copy: it does not keep the memory-mapped files alive).

        Pages of a memory-mapped shard stay resident while it is mapped, so a file is mapped afresh
        once ``1 / (2 TP)`` of its size has been read from it: all files together then keep at most half
        a shard's worth of pages resident."""
        from mm.models.sparse_ummdit import merge_tp_state_dicts

        self.keys(group)
        p, local = self._where[group][key]
        shards = self._shards(group, p, local)
        out = merge_tp_state_dicts([{key: s} for s in shards])[key]
        out = out.clone() if len(shards) == 1 or out.data_ptr() == shards[0].data_ptr() else out
        for t, s in enumerate(shards):
            f = self._dirs[p][t] / (MODEL_FILE if group in ("raw", "ema") else OPTIM_FILE)
            self._read_bytes[f] = self._read_bytes.get(f, 0) + s.nbytes
            if self._read_bytes[f] > f.stat().st_size / (2 * len(shards)):
                objs = self._objs if group in ("raw", "ema") else self._optim
                objs[p][t] = _load(f)
                self._read_bytes[f] = 0
        return out

    def files(self) -> list[Path]:
        return sorted(p for p in self.iter_dir.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- writing
def pipeline_plan(num_layers: list[int], pp: int) -> list[list[int]]:
    """U stages per pipeline rank: contiguous runs balanced by block count, at least one stage per rank."""
    if not 1 <= pp <= len(num_layers):
        raise CheckpointError(f"--pp {pp}: the SUV has {len(num_layers)} U stages, so PP must be 1..{len(num_layers)}")
    total = sum(num_layers)
    plan: list[list[int]] = [[]]
    done = 0
    for s, n in enumerate(num_layers):
        ranks_after = pp - len(plan)
        if plan[-1] and ranks_after and (done >= len(plan) * total / pp or len(num_layers) - s == ranks_after):
            plan.append([])
        plan[-1].append(s)
        done += n
    return plan


def _pp_rank_of(key: str, plan: list[list[int]], num_stages: int) -> list[int]:
    """Pipeline ranks that hold ``key`` (global key space)."""
    stage_rank = {s: r for r, stages in enumerate(plan) for s in stages}
    m = _STAGE_RE.match(key)
    if m:
        return [stage_rank[int(m.group(1))]]
    if key.startswith("time_text_embed."):
        return list(range(len(plan)))
    m = re.match(r"^skip_norm_linear(?:_enc)?\.(\d+)\.", key)
    if m:
        return [stage_rank[num_stages // 2 + 1 + int(m.group(1))]]
    if key.startswith(("patch_embed.", "caption_projection.")):
        return [0]
    return [len(plan) - 1]  # norm_final, norm_out, proj_out: the output head


def _local_key(key: str, rank: int, plan: list[list[int]]) -> str:
    m = _STAGE_RE.match(key)
    if not m:
        return key
    return f"transformer_blocks.{int(m.group(1)) - plan[rank][0]}." + key[m.end():]


def write_legacy(path: Path, groups: dict[str, dict[str, TensorInfo]], read: Callable[[str, str], torch.Tensor],
                 *, tp: int, pp: int, iteration: int | None, mindspeed: bool = False,
                 optimizer_common: dict | None = None, common: dict | None = None, rng: list | None = None,
                 consumed_samples: int | None = None, progress=None) -> list[Path]:
    """Write ``groups`` (``raw``/``ema`` and optionally the optimizer groups) as a legacy save with TP ``tp``
    and PP ``pp``, one pipeline stage at a time (its TP shards are held together: 1/PP of the output)."""
    from mm.models.sparse_ummdit import split_tp_state_dict, tp_split_dim

    weights = groups.get("raw") or groups.get("ema")
    num_layers = num_layers_of(weights)
    plan = pipeline_plan(num_layers, pp)
    for key, info in weights.items():
        dim = tp_split_dim(key)
        if dim is not None and info.shape[dim] % tp:
            raise CheckpointError(f"--tp {tp}: {key} has {info.shape[dim]} rows along its TP dim {dim}, "
                                  f"not divisible by {tp}")
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} exists and is not empty")
    d = path / ("release" if iteration is None else f"iter_{iteration:07d}")
    dead = dead_tensors(weights) if tp > 1 and not mindspeed else {}
    extra_modules = [] if mindspeed else megatron_linear_modules([*weights, *dead])
    name = (lambda k: to_mindspeed(k)) if mindspeed else (lambda k: k)
    written = []
    for p in range(pp):
        # one pipeline stage at a time: each full tensor is read once and split into its TP shards
        def shards(group: str) -> list[dict]:
            out: list[dict] = [{} for _ in range(tp)]
            infos = groups[group]
            for key in infos:
                if p in _pp_rank_of(key, plan, len(num_layers)):
                    full = read(group, key)
                    local = name(_local_key(key, p, plan))
                    for t in range(tp):
                        out[t][local] = split_tp_state_dict({key: full}, tp, t)[key].clone()
                    if progress is not None:
                        progress.update(1)
            if group in ("raw", "ema"):
                dtype = next(iter(infos.values())).dtype
                for key, info in dead.items():
                    if p in _pp_rank_of(key, plan, len(num_layers)):
                        zeros = torch.zeros(info.shape, dtype=dtype)
                        for t in range(tp):
                            out[t][_local_key(key, p, plan)] = split_tp_state_dict({key: zeros}, tp, t)[key].clone()
                for module in extra_modules:
                    if p in _pp_rank_of(module + ".weight", plan, len(num_layers)):
                        for t in range(tp):
                            out[t][_local_key(module, p, plan) + "._extra_state"] = None
            return out

        weight_entries = [(g, e) for g, e in (("raw", "model"), ("ema", "ema_model")) if g in groups]
        if mindspeed:  # MindSpeed-MM's converter writes one set of weights, under "model"
            weight_entries = [(weight_entries[0][0], "model")]
        per_entry: dict[str, list[dict]] = {}
        for group, entry in weight_entries:  # a group given twice (one set as weights and EMA) is split once
            same = [e for g, e in weight_entries if e in per_entry and groups[g] is groups[group]]
            per_entry[entry] = per_entry[same[0]] if same else shards(group)
        opt_groups = [] if mindspeed else [g for g in OPTIMIZER_GROUPS if g in groups]
        per_opt = {g: shards(g) for g in opt_groups}
        for t in range(tp):
            rank_dir = d / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            rank_dir.mkdir(parents=True)
            obj: dict = {entry: sd[t] for entry, sd in per_entry.items()}
            if not mindspeed:
                obj.update(checkpoint_version=3.0, iteration=0 if iteration is None else iteration)
                obj["args"] = argparse.Namespace(
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=tp * pp,
                    iteration=obj["iteration"], consumed_train_samples=consumed_samples or 0)
                if optimizer_common is not None:
                    obj["optimizer"] = optimizer_common
                if common:
                    obj["mm_common"] = common
                if rng is not None:
                    obj["rng_state"] = rng
            _save(obj, rank_dir / MODEL_FILE)
            written.append(rank_dir / MODEL_FILE)
            if per_opt:
                _save({"format": PER_PARAMETER, **{g: sd[t] for g, sd in per_opt.items()}}, rank_dir / OPTIM_FILE)
                written.append(rank_dir / OPTIM_FILE)
    (path / LATEST).write_text("release" if iteration is None else f"{iteration}")
    written.append(path / LATEST)
    return written


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
