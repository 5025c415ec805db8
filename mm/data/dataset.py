"""Map-style text-to-video dataset over a sample index (spec §8.3, §8.4): the in-memory ``DataIndex`` or the
memory-mapped ``IndexStore`` (entries are read per access; the dataset keeps no per-sample lists).

``dataset[i]`` reads sample ``i`` (decode -> crop -> transforms -> caption -> tokens). Bad input never
raises: a ``SampleError`` (missing file, corrupt or truncated video, too few frames, unreadable image)
makes the dataset try a replacement of the **same shape**, chosen deterministically from
``(seed, epoch, i, attempt)``, and the returned sample lists every skip with its reason under
``"skipped"`` (the loader logs them and counts them in the sampler state). Samples already known to be
bad (``known_bad``, restored from the sampler state) are not read again but follow the same replacement
chain, so a resumed run loads exactly what an uninterrupted one would.

All randomness of a sample (window start, caption choice, aesthetic phrase, CFG drop) comes from a
generator seeded with ``(seed, epoch, index, attempt)``: results do not depend on worker count or order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mm.data.config import DataConfig
from mm.data.decode import read_image, read_video, resolve_video_backend
from mm.data.errors import SampleError
from mm.data.frames import window_start
from mm.data.index import DataIndex, SampleEntry
from mm.data.index_store import IndexStore
from mm.data.text import TextProcessor
from mm.data.transforms import apply_crop, apply_pipeline

_REPLACE_STREAM = 0x5EED  # separates the replacement draws from the per-sample draws


class VideoTextDataset(Dataset):
    """Samples: ``video`` float32 ``[3, T, H, W]`` in [-1, 1], ``caption`` str, token ids/masks ``[1, L]``
    (when tokenizers are given), ``sample_index`` (the index actually loaded) and ``skipped``."""

    def __init__(self, index: DataIndex | IndexStore, cfg: DataConfig, text: TextProcessor | None = None) -> None:
        if len(index) == 0:
            raise ValueError(f"the data index is empty after filtering (dropped: {dict(index.dropped)})")
        self.index = index
        self.cfg = cfg
        self.text = text if text is not None else TextProcessor(cfg_rate=cfg.cfg, use_aesthetic=cfg.use_aesthetic)
        self.video_backend = resolve_video_backend(cfg.video_reader_type)
        self.epoch = 0
        self.known_bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------------
    def load_pixels(self, entry: SampleEntry, rng: np.random.Generator) -> torch.Tensor:
        """Decode + crop + transforms -> ``[3, T, H, W]``; raises ``SampleError`` on bad input."""
        if entry.kind == "image":
            frames = read_image(entry.path)
        else:
            cand = entry.candidate_indices()
            if len(cand) != entry.num_candidates:
                raise AssertionError(f"candidate count changed for {entry.path}")
            s = window_start(len(cand), entry.num_frames, rng) if len(cand) > entry.num_frames else 0
            frames = read_video(entry.path, cand[s:s + entry.num_frames].tolist(), self.video_backend)
        if entry.crop is not None:
            x0, x1, y0, y1 = entry.crop
            if frames.shape[1] < y1 or frames.shape[2] < x1:
                raise SampleError("bad_crop", entry.path, f"crop {entry.crop} outside {tuple(frames.shape[1:3])}")
            frames = apply_crop(frames, entry.crop)
        return apply_pipeline(frames, self.cfg.train_pipeline, (entry.height, entry.width))

    def load(self, i: int, attempt: int) -> dict[str, Any]:
        entry = self.index.entry(i)
        rng = np.random.default_rng((self.cfg.seed, self.epoch, i, attempt))
        video = self.load_pixels(entry, rng)
        return {"video": video, **self.text(entry.captions, entry.aesthetic, rng), "sample_index": i}

    def replacement(self, i: int, attempt: int, tried: set[int]) -> int | None:
        """A same-shape index not tried yet, deterministic in ``(seed, epoch, i, attempt)``: element ``k`` of
        the shape group without the tried indices (``tried`` only holds members of that group)."""
        group = self.index.group(self.index.entry(i).shape_key)  # ascending
        skip = np.sort(np.searchsorted(group, np.fromiter(tried, dtype=np.int64)))
        if len(group) <= len(skip):
            return None
        rng = np.random.default_rng((self.cfg.seed, self.epoch, i, attempt, _REPLACE_STREAM))
        k = int(rng.integers(len(group) - len(skip)))
        for pos in skip:  # the k-th untried position
            if pos <= k:
                k += 1
        return int(group[k])

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped: list[dict[str, Any]] = []
        tried: set[int] = set()
        current = int(i)
        for attempt in range(self.cfg.max_replacement_tries):
            tried.add(current)
            try:
                if current in self.known_bad:
                    raise SampleError(self.known_bad[current], self.index.entry(current).path, "known bad")
                sample = self.load(current, attempt)
                sample["skipped"] = skipped
                return sample
            except SampleError as e:
                skipped.append({"index": current, "path": e.path, "reason": e.reason, "detail": e.detail})
                if e.detail != "known bad":
                    # remembered in this worker; the replacement chain does not depend on it. Logged once,
                    # by the loader in the main process, and counted there (not here: once per sample)
                    self.known_bad[current] = e.reason
                nxt = self.replacement(i, attempt, tried)
                if nxt is None:
                    break
                current = nxt
        shape = self.index.entry(i).shape_key
        raise RuntimeError(f"no loadable sample of shape {shape} after {len(skipped)} tries starting at index "
                           f"{i}; skipped: {[(s['index'], s['reason']) for s in skipped]}")
