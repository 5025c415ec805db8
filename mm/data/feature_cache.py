"""Feature cache: sharded safetensors of frozen-encoder outputs, and a dataset that trains from them
(upstream ``load_video_features`` / ``load_text_features``; spec §7.2 frozen pre-stages).

Layout of ``feature_dir`` (written by ``python -m mm.data.extract_features``):

* ``part-w{world}-r{rank}-{k}.safetensors`` — up to ``shard_size`` samples each; tensor keys
  ``{i}/latents`` ``[C, t, h, w]`` (normalised WFVAE posterior **mean**), ``{i}/prompt_embeds``
  ``[1, L, D]`` (T5 last hidden state, padded positions included), ``{i}/prompt_mask`` ``[1, L]``,
  ``{i}/pooled_embeds`` ``[1, P]`` (CLIP); metadata ``indices`` (JSON list of data-index positions),
  ``bad`` (samples that could not be read, with the reason), ``captions`` and ``fingerprint``.
  A shard is written to a temporary name and renamed, so a shard either exists whole or not at all;
  that is what makes extraction resumable.
* ``null_text.safetensors`` — the T5/CLIP features of the empty prompt, used for the CFG drop.
* ``index.json`` — written last by rank 0: fingerprint, per-sample shard, latent shape and caption.

What the cache fixes compared with on-the-fly loading (documented trade-offs): the temporal window and
the caption are those of epoch 0, and the latent is the posterior mean (on the fly draws a posterior
sample). The CFG drop still happens per access (``cfg`` rate, seeded like the pixel dataset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from mm.data.config import DataConfig
from mm.data.text import TextProcessor

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
NULL_TEXT_FILE = "null_text.safetensors"
CACHE_VERSION = 1
TEXT_KEYS = ("prompt_embeds", "prompt_mask", "pooled_embeds")
# DataConfig fields that change what is cached
_CONTENT_FIELDS = (
    "data_path", "num_frames", "frame_interval", "train_fps", "speed_factor", "drop_short_ratio", "min_num_frames",
    "allow_fps_upsampling", "max_height", "max_width", "max_hxw", "min_hxw", "force_resolution",
    "max_h_div_w_ratio", "min_h_div_w_ratio", "force_5_ratio", "hw_stride", "ae_stride_t", "train_pipeline",
    "use_aesthetic", "enable_text_preprocess", "keep_chinese", "model_max_length", "model_max_length_2", "seed",
    "min_samples_per_shape",
)


def fingerprint(cfg: DataConfig, model_id: str) -> str:
    """Hash of the content-relevant data settings and the encoders' identity."""
    d = asdict(cfg)
    payload = json.dumps({k: d[k] for k in _CONTENT_FIELDS} | {"model_id": model_id}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shard_metadata(path: str) -> dict[str, Any]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {"indices": json.loads(meta.get("indices", "[]")), "bad": json.loads(meta.get("bad", "{}")),
            "captions": json.loads(meta.get("captions", "[]")), "fingerprint": meta.get("fingerprint", "")}


def list_shards(feature_dir: str) -> list[str]:
    if not os.path.isdir(feature_dir):
        return []
    return sorted(f for f in os.listdir(feature_dir) if f.startswith("part-") and f.endswith(".safetensors"))


class FeatureCache:
    """Read access to a finished cache directory (``index.json`` present); with ``cfg`` the cache must
    have been extracted with the same content-relevant data settings."""

    def __init__(self, feature_dir: str, cfg: DataConfig | None = None) -> None:
        path = os.path.join(feature_dir, INDEX_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"feature_dir {feature_dir!r} has no {INDEX_FILE}: run python -m mm.data.extract_features "
                             "first (or let it finish)")
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"feature cache version {meta.get('version')!r} != supported {CACHE_VERSION}")
        if cfg is not None and meta["data_fingerprint"] != fingerprint(cfg, ""):
            raise ValueError(f"feature cache {feature_dir} was extracted with other data settings (fingerprint "
                             f"{meta['data_fingerprint']}, this config {fingerprint(cfg, '')}); re-extract or fix the "
                             "config")
        self.dir = feature_dir
        self.meta = meta
        self.samples: list[dict[str, Any]] = meta["samples"]  # one per cached sample, sorted by data index

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape_keys(self) -> list[str]:
        return [s["shape"] for s in self.samples]

    def read(self, j: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        s = self.samples[j]
        with safe_open(os.path.join(self.dir, s["shard"]), framework="pt") as f:
            return {k: f.get_tensor(f"{s['index']}/{k}") for k in keys}

    def null_text(self) -> dict[str, torch.Tensor]:
        with safe_open(os.path.join(self.dir, NULL_TEXT_FILE), framework="pt") as f:
            return {k: f.get_tensor(k) for k in TEXT_KEYS}


class FeatureDataset(Dataset):
    """Samples from the cache: ``latents`` ``[C, t, h, w]`` plus either cached text features
    (``load_text_features``) or T5/CLIP token ids of the cached caption (``text`` processor), with the CFG
    drop applied per access."""

    def __init__(self, cache: FeatureCache, cfg: DataConfig, text: TextProcessor | None = None) -> None:
        if not cfg.load_video_features:
            raise ValueError("FeatureDataset needs load_video_features=true (caching only the text while decoding "
                             "pixels is not supported), got False")
        if not cfg.load_text_features and text is None:
            raise ValueError("FeatureDataset needs a TextProcessor when load_text_features is false, got None")
        self.cache = cache
        self.cfg = cfg
        self.text = text
        self.epoch = 0
        self._null: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def shape_keys(self) -> list[str]:
        return self.cache.shape_keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, j: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.cfg.seed, self.epoch, j, 0))
        s = self.cache.samples[j]
        keys = ("latents",) + (TEXT_KEYS if self.cfg.load_text_features else ())
        out: dict[str, Any] = self.cache.read(j, keys)
        if self.cfg.load_text_features:
            if rng.random() < self.cfg.cfg:
                if self._null is None:
                    self._null = self.cache.null_text()
                out.update(self._null)
                out["caption"] = ""
            else:
                out["caption"] = s["caption"]
        else:
            caption = "" if rng.random() < self.cfg.cfg else s["caption"]
            out.update(self.text.encode(caption))
            out["caption"] = caption
        out["sample_index"] = int(s["index"])
        out["skipped"] = []
        return out


class FeatureCollator:
    """Batch of cached features: ``latents`` ``[B, C, t, h, w]``, ``video_mask`` int64 ``[B, t, h, w]`` (ones),
    ``prompt_embeds`` ``[B, 1, L, D]``, ``prompt_mask`` ``[B, 1, L]``, ``pooled_embeds`` ``[B, 1, P]`` (or token
    ids/masks ``[B, 1, L]`` when text is tokenised on the fly), ``caption``, ``sample_index``, ``skipped``."""

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("collate needs at least one sample, got 0")
        shapes = {tuple(s["latents"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"cached latents in one batch must share a shape, got {sorted(shapes)}")
        latents = torch.stack([s["latents"] for s in samples])
        batch: dict[str, Any] = {
            "latents": latents,
            "video_mask": torch.ones(latents.shape[0], *latents.shape[2:], dtype=torch.long),
        }
        for k in TEXT_KEYS + ("prompt_ids", "prompt_ids_2", "prompt_mask_2"):
            if k in samples[0]:
                batch[k] = torch.stack([s[k] for s in samples])
        batch["caption"] = [s["caption"] for s in samples]
        batch["sample_index"] = torch.tensor([s["sample_index"] for s in samples], dtype=torch.long)
        batch["skipped"] = []
        return batch
