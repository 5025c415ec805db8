"""Collate samples into a training batch (spec §8.5, "GroupLength" collate).

Batch keys and shapes (B = micro-batch size):

* ``video``        float32 ``[B, 3, T', H', W']`` in [-1, 1]; zero-padded to ``T' = s_t·⌈(T−1)/s_t⌉ + 1``
  (whole latent frames, a multiple of ``patch_size_t`` of them) and ``H', W'`` multiples of
  ``ae_stride·patch_size``;
* ``video_mask``   int64 ``[B, (T'−1)/s_t + 1, H'/ae_stride, W'/ae_stride]``: 1 on the valid latent region,
  0 on padding (all ones for shape-grouped batches);
* ``prompt_ids`` / ``prompt_mask``     int64 ``[B, 1, 512]`` (T5), when a T5 tokenizer is used;
* ``prompt_ids_2`` / ``prompt_mask_2`` int64 ``[B, 1, 77]`` (CLIP), when a CLIP tokenizer is used;
* ``caption``      list[str] (after cleaning and CFG drop; ``""`` when dropped);
* ``sample_index`` int64 ``[B]``, the dataset indices actually loaded;
* ``skipped``      list of ``{index, path, reason, detail}`` for bad samples replaced in this batch
  (the loader removes it before the batch reaches the trainer).

The group sampler makes every batch one shape; mixed shapes are still handled (pad to the largest, mask)
instead of upstream's silent replacement by repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

TOKEN_KEYS = ("prompt_ids", "prompt_mask", "prompt_ids_2", "prompt_mask_2")


def padded_frames(num_frames: int, ae_stride_t: int, patch_size_t: int = 1) -> int:
    latent = math.ceil((num_frames - 1) / ae_stride_t) + 1
    latent = math.ceil(latent / patch_size_t) * patch_size_t
    return (latent - 1) * ae_stride_t + 1


@dataclass(frozen=True)
class Collator:
    """Picklable collate function (DataLoader workers)."""

    ae_stride: int = 8
    ae_stride_t: int = 8
    patch_size: int = 2
    patch_size_t: int = 1

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("collate needs at least one sample, got 0")
        mult = self.ae_stride * self.patch_size
        t_max = max(s["video"].shape[1] for s in samples)
        h_max = max(s["video"].shape[2] for s in samples)
        w_max = max(s["video"].shape[3] for s in samples)
        tp = padded_frames(t_max, self.ae_stride_t, self.patch_size_t)
        hp, wp = math.ceil(h_max / mult) * mult, math.ceil(w_max / mult) * mult
        lt, lh, lw = (tp - 1) // self.ae_stride_t + 1, hp // self.ae_stride, wp // self.ae_stride
        videos, masks = [], []
        for s in samples:
            v = s["video"]  # [3, T, H, W]
            _, t, h, w = v.shape
            videos.append(F.pad(v, (0, wp - w, 0, hp - h, 0, tp - t)))
            m = torch.zeros(lt, lh, lw, dtype=torch.long)
            m[:math.ceil((t - 1) / self.ae_stride_t) + 1, :math.ceil(h / self.ae_stride),
              :math.ceil(w / self.ae_stride)] = 1
            masks.append(m)
        batch: dict[str, Any] = {
            "video": torch.stack(videos),
            "video_mask": torch.stack(masks),
        }
        for key in TOKEN_KEYS:
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])  # [B, 1, L]
        batch["caption"] = [s.get("caption", "") for s in samples]
        batch["sample_index"] = torch.tensor([s["sample_index"] for s in samples], dtype=torch.long)
        batch["skipped"] = [sk for s in samples for sk in s.get("skipped", ())]
        return batch
