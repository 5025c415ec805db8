"""Run the frozen WFVAE + T5 + CLIP over a dataset once and write the feature cache (layout in
``mm/data/feature_cache.py``); resumable, sharded over ranks.

``[torchrun --nproc_per_node N] python -m mm.data.extract_features --data data.json --out DIR
--vae-config model.json [--vae-checkpoint wfvae.ckpt] --t5 DIR --clip DIR [--shard-size 64]``

Rank ``r`` of ``W`` encodes the data-index positions ``i ≡ r (mod W)`` that no existing shard holds yet
(any world size: a restart at another ``W`` only does what is missing). Samples that cannot be read are
recorded in the shard metadata with their reason and left out of the cache. After a barrier rank 0
writes ``index.json``. Training then sets ``load_video_features`` (and ``load_text_features``) and
``feature_dir`` in the data config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mm.data.config import DataConfig, load_data_config
from mm.data.dataset import VideoTextDataset
from mm.data.errors import SampleError
from mm.data.feature_cache import (CACHE_VERSION, INDEX_FILE, NULL_TEXT_FILE, fingerprint, list_shards,
                                   shard_metadata)
from mm.data.build_index import open_index
from mm.data.index import DataIndex
from mm.data.index_store import IndexStore
from mm.data.text import TextProcessor, caption_cleaner

logger = logging.getLogger(__name__)


def encode_text(t5: Any, clip: Any, ids: torch.Tensor, mask: torch.Tensor, ids_2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids ``[1, L]`` -> ``prompt_embeds [1, L, D]``, ``prompt_mask [1, L]``, ``pooled_embeds [1, P]``."""
    return {"prompt_embeds": t5.encode(ids, mask).cpu().contiguous(), "prompt_mask": mask.cpu().contiguous(),
            "pooled_embeds": clip.encode(ids_2).cpu().contiguous()}


def _write_shard(out_dir: str, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = os.path.join(out_dir, f".{name}.tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, os.path.join(out_dir, name))  # atomic: a shard exists whole or not at all


def extract_features(cfg: DataConfig, out_dir: str, *, vae: Any, t5: Any, clip: Any, rank: int = 0,
                     world_size: int = 1, shard_size: int = 64, model_id: str = "",
                     index: DataIndex | IndexStore | None = None, max_samples: int | None = None,
                     barrier: Callable[[], None] | None = None, index_dir: str | None = None) -> int:
    """Encode this rank's missing samples; returns how many it encoded. ``barrier`` (default: no-op)
    must synchronise all ranks; rank 0 writes ``index.json`` once every rank has finished. The sample
    index defaults to the on-disk one (``open_index``: ``index_dir`` or the cache)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    barrier = barrier or (lambda: None)
    index = index if index is not None else open_index(cfg, index_dir)
    fp = fingerprint(cfg, model_id)
    text = TextProcessor(t5.tokenizer, clip.tokenizer, max_length=t5.max_length, max_length_2=clip.max_length,
                         cfg_rate=0.0, cleaner=caption_cleaner(cfg.enable_text_preprocess, cfg.keep_chinese),
                         use_aesthetic=cfg.use_aesthetic)
    dataset = VideoTextDataset(index, cfg, text)  # epoch 0, attempt 0: what on-the-fly loading reads first
    done: set[int] = set()
    prefix = f"part-w{world_size:03d}-r{rank:03d}-"
    next_k = 0
    for name in list_shards(out_dir):
        meta = shard_metadata(os.path.join(out_dir, name))
        if meta["fingerprint"] != fp:
            raise ValueError(f"shard {name} in {out_dir} has fingerprint {meta['fingerprint']}, this run {fp}: "
                             "the data config or encoders changed; use a new --out directory")
        done.update(meta["indices"])
        done.update(int(i) for i in meta["bad"])
        if name.startswith(prefix):
            next_k = max(next_k, int(re.findall(r"-(\d+)\.safetensors$", name)[0]) + 1)
    todo = [i for i in range(rank, len(index), world_size) if i not in done]
    if max_samples is not None:
        todo = todo[:max_samples]
    logger.info("rank %d: %d samples cached already, %d to encode", rank, len(done), len(todo))
    tensors: dict[str, torch.Tensor] = {}
    indices: list[int] = []
    captions: list[str] = []
    bad: dict[str, str] = {}
    encoded = 0

    def flush() -> None:
        nonlocal tensors, indices, captions, bad, next_k
        if not indices and not bad:
            return
        meta = {"indices": json.dumps(indices), "bad": json.dumps(bad), "captions": json.dumps(captions),
                "fingerprint": fp}
        _write_shard(out_dir, f"{prefix}{next_k:06d}.safetensors", tensors, meta)
        next_k += 1
        tensors, indices, captions, bad = {}, [], [], {}

    from tqdm import tqdm

    t0 = time.time()
    for i in tqdm(todo, desc=f"encode rank {rank}", unit="sample", disable=rank != 0 or not sys.stderr.isatty()):
        try:
            s = dataset.load(i, 0)
        except SampleError as e:
            logger.warning("rank %d: sample %d not cached (%s): %s", rank, i, e.reason, e)
            bad[str(i)] = e.reason
            continue
        latents = vae.encode(s["video"].unsqueeze(0))[0].cpu().contiguous()  # [C, t, h, w], posterior mean
        feats = encode_text(t5, clip, s["prompt_ids"], s["prompt_mask"], s["prompt_ids_2"])
        tensors[f"{i}/latents"] = latents
        for k, v in feats.items():
            tensors[f"{i}/{k}"] = v
        indices.append(i)
        captions.append(s["caption"])
        encoded += 1
        if len(indices) >= shard_size:
            flush()
    flush()
    seconds = time.time() - t0
    logger.info("rank %d: encoded %d samples in %.1fs (%.2f samples/s)", rank, encoded, seconds,
                encoded / seconds if seconds > 0 else 0.0)
    if rank == 0 and not os.path.exists(os.path.join(out_dir, NULL_TEXT_FILE)):
        null = text.encode("")
        feats = encode_text(t5, clip, null["prompt_ids"], null["prompt_mask"], null["prompt_ids_2"])
        _write_shard(out_dir, NULL_TEXT_FILE, feats, {"fingerprint": fp})
    barrier()
    if rank == 0:
        write_index(cfg, out_dir, fp, index)
    barrier()
    return encoded


def write_index(cfg: DataConfig, out_dir: str, fp: str, index: DataIndex | IndexStore) -> dict[str, Any] | None:
    """Merge every shard's metadata into ``index.json``; while samples are missing (an interrupted or
    ``max_samples``-limited run) nothing is written and ``None`` is returned."""
    samples, bad = [], {}
    for name in list_shards(out_dir):
        meta = shard_metadata(os.path.join(out_dir, name))
        bad.update(meta["bad"])
        for i, cap in zip(meta["indices"], meta["captions"]):
            samples.append({"index": i, "shard": name, "caption": cap, "shape": None})
    samples.sort(key=lambda s: s["index"])
    from safetensors import safe_open

    by_shard: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_shard.setdefault(s["shard"], []).append(s)
    for name, group in by_shard.items():
        with safe_open(os.path.join(out_dir, name), framework="pt") as f:
            for s in group:
                shape = f.get_slice(f"{s['index']}/latents").get_shape()
                s["shape"] = "x".join(str(d) for d in shape[1:])  # latent t x h x w
    missing = sorted(set(range(len(index))) - {s["index"] for s in samples} - {int(i) for i in bad})
    if missing:
        logger.warning("feature cache %s is incomplete: %d samples missing (first %s); run extract_features "
                       "again to finish", out_dir, len(missing), missing[:5])
        return None
    doc = {"version": CACHE_VERSION, "fingerprint": fp, "data_fingerprint": fingerprint(cfg, ""),
           "data_path": cfg.data_path, "num_index_samples": len(index),
           "bad_samples": bad, "samples": samples}
    tmp = os.path.join(out_dir, f".{INDEX_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    logger.info("feature cache %s: %d samples, %d bad", out_dir, len(samples), len(bad))
    return doc


def _build_encoders(a: argparse.Namespace, cfg: DataConfig, device: torch.device) -> tuple[Any, Any, Any, str]:
    from mm.models.text_encoders import CLIPTextEncoder, T5TextEncoder
    from mm.models.wfvae import WFVAE

    t5_dir = a.t5 or cfg.tokenizer_path
    clip_dir = a.clip or cfg.tokenizer_path_2
    if not t5_dir or not clip_dir:
        raise ValueError(f"--t5 and --clip directories are required (or tokenizer_config[_2] in data.json), "
                         f"got t5={t5_dir!r} clip={clip_dir!r}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.text_dtype]
    vae = WFVAE.from_upstream(a.vae_config, a.vae_checkpoint, device=device)
    t5 = T5TextEncoder.from_pretrained(t5_dir, dtype=dtype, device=device, max_length=cfg.model_max_length)
    clip = CLIPTextEncoder.from_pretrained(clip_dir, dtype=dtype, device=device, max_length=cfg.model_max_length_2)
    model_id = json.dumps([os.path.abspath(a.vae_config), a.vae_checkpoint and os.path.abspath(a.vae_checkpoint),
                           os.path.abspath(t5_dir), os.path.abspath(clip_dir), a.text_dtype])
    return vae, t5, clip, model_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.data.extract_features", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data.json (upstream format) or data.txt")
    p.add_argument("--out", default=None, help="feature directory (default: feature_dir of data.json)")
    p.add_argument("--vae-config", required=True, help="upstream model JSON (its 'ae' block) or an 'ae' block JSON")
    p.add_argument("--vae-checkpoint", default=None, help="released WFVAE checkpoint (omit only for tests)")
    p.add_argument("--t5", default=None, help="local T5 directory (default: tokenizer_config of data.json)")
    p.add_argument("--clip", default=None, help="local CLIP directory (default: tokenizer_config_2 of data.json)")
    p.add_argument("--backend", default=None, choices=["auto", "cpu", "cuda", "npu"],
                   help="device backend (default $MM_BACKEND or auto)")
    p.add_argument("--text-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="T5/CLIP dtype")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many samples per rank")
    p.add_argument("--data-index", default=None, help="sample index directory (default: the cache of this config)")
    p.add_argument("--num-frames", type=int, default=None, help="override num_frames")
    p.add_argument("--height", type=int, default=None, help="override max_height (fixed resolution)")
    p.add_argument("--width", type=int, default=None, help="override max_width (fixed resolution)")
    a = p.parse_args(argv)
    missing = [f"{flag} {path}: not found" for flag, path in (("--data", a.data), ("--vae-config", a.vae_config),
               ("--vae-checkpoint", a.vae_checkpoint), ("--t5", a.t5), ("--clip", a.clip)) if path and not os.path.exists(path)]
    if missing:  # all of them, before anything is built
        p.error("; ".join(missing))
    from mm.logs import setup_logging

    setup_logging()
    overrides: dict[str, Any] = {}
    if a.num_frames is not None:
        overrides.update(num_frames=a.num_frames, min_num_frames=min(a.num_frames, 29))
    if a.height is not None or a.width is not None:
        h, w = a.height or 576, a.width or 1024
        overrides.update(max_height=h, max_width=w, max_hxw=h * w, min_hxw=h * w)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    from mm.ops import select_backend

    select_backend(a.backend)
    from mm.distributed.init import init_device, init_process_group

    device = init_device()  # this rank's device (cuda:LOCAL_RANK / npu:LOCAL_RANK / cpu), made current
    if world_size > 1 and not dist.is_initialized():
        init_process_group()
    try:
        cfg = load_data_config(a.data, **overrides)
        out = a.out or cfg.feature_dir
        if not out:
            raise ValueError("--out is required when data.json has no feature_dir, got nothing")
        vae, t5, clip, model_id = _build_encoders(a, cfg, device)
    except ValueError as e:
        p.error(str(e))
    barrier = dist.barrier if dist.is_initialized() else None
    n = extract_features(cfg, out, vae=vae, t5=t5, clip=clip, rank=rank, world_size=world_size,
                         shard_size=a.shard_size, model_id=model_id, max_samples=a.max_samples, barrier=barrier,
                         index_dir=a.data_index)
    logger.info("rank %d encoded %d samples into %s", rank, n, out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
