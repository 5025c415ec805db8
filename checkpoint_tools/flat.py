"""Flat layouts: ``released`` (one file, the released key space: ``model_ema.pt`` / ``.safetensors``; for the
WFVAE the ``wfvae_888_dim32.ckpt`` layouts) and ``diffusers`` (a folder: ``config.json``, sharded
``*.safetensors`` and ``*.safetensors.index.json``), for the SUV and for the WFVAE.

Both hold one set of weights (no optimizer state). A released file says which in its safetensors metadata
(``"weights": "ema"|"raw"``, written by these tools) or, failing that, by its name (``*ema*`` -> EMA, as
the release's ``model_ema.pt``); a diffusers folder says it in ``config.json`` (``"_mm_weights"``, with ``"_mm_iteration"``; diffusers ignores ``_``-prefixed keys and so does our
config reader).
Reading is lazy: ``.pt`` files are memory-mapped, safetensors are read one tensor at a time. Writing
streams: safetensors files are written tensor by tensor from the header of known shapes, so a
conversion never holds more than one tensor of the output (``.pt`` output is the exception: ``torch.save``
needs the whole dict).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch

from checkpoint_tools.keyspace import CheckpointError, Source, TensorInfo, canonical, model_kind

from mm.models.sparse_ummdit import DIFFUSERS_INDEX, DIFFUSERS_SINGLE
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ------------------------------------------------------------------------------------------ safetensors
def safetensors_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Shapes and dtypes of a safetensors file from its header (no tensor is read), and its metadata."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})")
    meta = header.pop("__metadata__", {}) or {}
    infos = {}
    end = 0
    for k, v in header.items():
        infos[k] = TensorInfo(tuple(v["shape"]), _ST_NAMES[v["dtype"]])
        end = max(end, v["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header describes {8 + n + end})")
    return infos, meta


def read_safetensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})")


def write_safetensors(path: Path, infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None, progress=None) -> None:
    """Write a safetensors file tensor by tensor: the header comes from ``infos``, then each tensor is read
    with ``read(key)``, checked against its info and appended. Written to ``path.tmp``, then renamed."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, info in infos.items():
        header[k] = {"dtype": _ST_DTYPES[info.dtype], "shape": list(info.shape),
                     "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, info in infos.items():
            t = read(k)
            if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise CheckpointError(f"{k}: got {tuple(t.shape)} {t.dtype}, expected {info.shape} {info.dtype}")
            f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
            if progress is not None:
                progress.update(1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- released
def _weights_name(path: Path, meta: Mapping[str, str]) -> str:
    w = meta.get("weights")
    if w in ("ema", "raw"):
        return w
    return "ema" if "ema" in path.name.lower() else "raw"


class ReleasedSource(Source):
    """One flat file of the released key space (``.pt`` torch pickle or ``.safetensors``)."""

    def __init__(self, path: Path):
        super().__init__(format="released", path=path)
        if path.suffix == ".safetensors":
            infos, meta = safetensors_infos(path)
            self._tensors = None
            if meta.get("iteration", "").isdigit():
                self.iteration = int(meta["iteration"])
        else:
            self._tensors = _released_pt_groups(path)
            infos = None
            meta = {}
        if self._tensors is None:
            groups = {_weights_name(path, meta): infos}
        else:
            groups = {g: {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in sd.items()}
                      for g, sd in self._tensors.items()}
        self.model = model_kind(next(iter(groups.values())))
        self.infos = {g: {k: gi[k] for k in canonical(gi)} for g, gi in groups.items()}
        if meta.get("config"):
            self.config = json.loads(meta["config"])

    def read(self, group: str, key: str) -> torch.Tensor:
        self.keys(group)
        if self._tensors is None:
            return read_safetensor(self.path, key)
        return self._tensors[group][key]


def _released_pt_groups(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Weight groups of a released torch pickle, memory-mapped: an SUV predictor dict (one group, named as
    :func:`_weights_name` says), or a WFVAE ``.ckpt`` in any of its layouts (spec §4.8: ``ema_state_dict``
    is the EMA, ``state_dict[.gen_model]`` or a flat dict the trained weights), unwrapped by the loaders'
    own rules."""
    from mm.models.sparse_ummdit import load_upstream_checkpoint
    from mm.models.wfvae import unwrap_upstream_state_dict

    try:
        state = load_upstream_checkpoint(path)
        return {_weights_name(path, {}): {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}}
    except RuntimeError as e:
        if "no SUV predictor state dict found" not in str(e):
            raise CheckpointError(f"{path}: unreadable (truncated or corrupt: {e})")
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt: {e})")
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    groups = {}
    ema = obj.get("ema_state_dict")
    if isinstance(ema, Mapping) and len(ema) > 0:
        groups["ema"] = unwrap_upstream_state_dict(obj)[0]
    rest, _ = unwrap_upstream_state_dict({k: v for k, v in obj.items() if k != "ema_state_dict"})
    rest = {k: v for k, v in rest.items() if isinstance(v, torch.Tensor)}
    if rest:
        groups["raw" if groups or "state_dict" in obj else _weights_name(path, {})] = rest
    if not groups:
        raise CheckpointError(f"{path}: neither an SUV predictor nor a WFVAE state dict "
                              f"(top-level keys {list(obj)[:10]})")
    return groups


def write_released(path: Path, infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor], *,
                   weights: str, iteration: int | None, config: dict | None, progress=None) -> list[Path]:
    if path.suffix not in (".pt", ".pth", ".ckpt", ".safetensors"):
        raise CheckpointError(f"released output must end in .pt, .pth, .ckpt or .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        meta = {"format": "released", "weights": weights}
        if iteration is not None:
            meta["iteration"] = str(iteration)
        if config is not None:
            meta["config"] = json.dumps(config)
        write_safetensors(path, infos, read, meta, progress)
    else:  # torch.save needs the whole dict: one copy of the output in memory
        state = {}
        for k in infos:
            state[k] = read(k)
            if progress is not None:
                progress.update(1)
        if model_kind(infos) == "WFVAE":  # the layout of wfvae_888_dim32.ckpt (spec §4.8)
            state = {"ema_state_dict": state} if weights == "ema" else {"state_dict": {"gen_model": state}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return [path]


# ------------------------------------------------------------------------------------------- diffusers
class DiffusersSource(Source):
    """A diffusers-style model folder: ``config.json`` + one or several safetensors files (+ index)."""

    def __init__(self, path: Path):
        super().__init__(format="diffusers", path=path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json (not a diffusers model folder)")
        cfg = json.loads(cfg_path.read_text())
        from mm.models.sparse_ummdit import diffusers_weight_files

        self._where: dict[str, Path] = {}
        infos: dict[str, TensorInfo] = {}
        for name, listed in diffusers_weight_files(path).items():
            file_infos, _ = safetensors_infos(path / name)
            if listed is not None and set(listed) != set(file_infos):
                raise CheckpointError(f"{path / name}: holds other tensors than {DIFFUSERS_INDEX} lists "
                                      f"({sorted(set(listed) ^ set(file_infos))[:5]})")
            for k, info in file_infos.items():
                infos[k] = info
                self._where[k] = path / name
        weights = cfg.get("_mm_weights", "raw")
        if cfg.get("_mm_iteration") is not None:
            self.iteration = int(cfg["_mm_iteration"])
        self.config = {k: v for k, v in cfg.items() if not k.startswith("_")}
        self.model = model_kind(infos)
        self.infos = {weights: {k: infos[k] for k in canonical(infos)}}

    def read(self, group: str, key: str) -> torch.Tensor:
        self.keys(group)
        return read_safetensor(self._where[key], key)


def shard_plan(infos: Mapping[str, TensorInfo], max_bytes: int) -> list[list[str]]:
    """Keys split into consecutive shards of at most ``max_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, info in infos.items():
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += info.nbytes
    return shards


def write_diffusers(path: Path, infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor], *,
                    weights: str, iteration: int | None, config: dict, class_name: str, max_shard_bytes: int,
                    progress=None) -> list[Path]:
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": class_name, "_mm_weights": weights, **config}
    if iteration is not None:
        cfg["_mm_iteration"] = iteration
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    plan = shard_plan(infos, max_shard_bytes)
    weight_map = {}
    written = [path / "config.json"]
    for i, keys in enumerate(plan):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(path / name, {k: infos[k] for k in keys}, read, {"format": "pt"}, progress)
        weight_map.update({k: name for k in keys})
        written.append(path / name)
    total = sum(info.nbytes for info in infos.values())
    (path / DIFFUSERS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    written.append(path / DIFFUSERS_INDEX)
    return written


def is_diffusers_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / DIFFUSERS_INDEX).is_file() or (path / DIFFUSERS_SINGLE).is_file())
