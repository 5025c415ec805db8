"""Frozen pre-stages of a training step (spec §7.2): WFVAE encode + T5 + CLIP under ``no_grad``.

Each encoder runs in its own dtype (VAE fp32, text encoders bf16 in the released setup) whatever the
DiT's dtype. The features come out on the rank's device (``device``), whatever the encoders or the
feature cache produced them on. With the feature cache (``load_video_features`` / ``load_text_features``) the batch already
carries latents / text features and the matching encoder is not run (and need not be built).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    latents: torch.Tensor  # (B, C, t, h, w) fp32, normalised
    video_mask: torch.Tensor  # (B, t, h, w) 0/1
    text: torch.Tensor  # (B, L, C_text)
    text_mask: torch.Tensor  # (B, L) 0/1
    pooled: torch.Tensor  # (B, P)


class FrozenEncoders:
    def __init__(self, vae=None, t5=None, clip=None, generator: torch.Generator | None = None,
                 sample_posterior: bool = True, device: torch.device | str = "cpu"):
        self.vae, self.t5, self.clip = vae, t5, clip
        self.generator = generator
        self.sample_posterior = sample_posterior
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> Features:
        if "latents" in batch:  # feature cache
            latents = batch["latents"].float()
        else:
            if self.vae is None:
                raise ValueError("batch has raw video but no WFVAE was built (load_video_features is on?)")
            latents = self.vae.encode(batch["video"], sample=self.sample_posterior, generator=self.generator).float()
        B = latents.shape[0]
        if "prompt_embeds" in batch:  # feature cache
            text, text_mask, pooled = batch["prompt_embeds"], batch["prompt_mask"], batch["pooled_embeds"]
        else:
            if self.t5 is None or self.clip is None:
                raise ValueError("batch has token ids but no text encoders were built (load_text_features is on?)")
            ids, mask = batch["prompt_ids"].reshape(B, -1), batch["prompt_mask"].reshape(B, -1)
            text = self.t5.encode(ids, mask)
            pooled = self.clip.encode(batch["prompt_ids_2"].reshape(B, -1))
            text_mask = mask
        video_mask = batch.get("video_mask")
        if video_mask is None:
            video_mask = torch.ones(B, *latents.shape[2:], dtype=torch.int64)
        dev = dict(device=self.device, non_blocking=True)
        return Features(latents=latents.to(**dev), video_mask=video_mask.to(**dev),
                        text=text.reshape(B, text.shape[-2], -1).to(**dev),
                        text_mask=text_mask.reshape(B, -1).to(**dev), pooled=pooled.reshape(B, -1).to(**dev))
