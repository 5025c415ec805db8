"""Image-to-video and transition conditioning of SUV: the input-channel layout and its masks.

Layout (the v1.3 inpainting model of the upstream project, ``PKU-YuanGroup/Open-Sora-Plan``
``opensora/models/diffusion/opensora_v1_3/modeling_inpaint.py`` ``OpenSoraInpaint_v1_3``, and its mask
folding in ``opensora/utils/mask_utils.py``; Open-Sora Plan v1.3 report, "Inpainting"): the denoiser input is
``[noisy latents (C) ; masked conditioning latents (C) ; mask (ft)]`` along channels, where ``ft`` is the VAE's
temporal compression and the mask channel ``s`` of latent frame ``i`` says whether pixel frame
``(i - 1) * ft + 1 + s`` is given (latent frame 0 holds pixel frame 0 repeated ``ft`` times: the causal WFVAE
encodes frame 0 alone into latent frame 0).

Differences from upstream, stated: one ``patch_embed`` convolution over all ``2C + ft`` channels whose extra
input channels start at zero (upstream adds two more patch embeddings, each followed by a zero-initialised
linear) - the same function class, and the model starts exactly as the T2V model it is converted from; the
conditioning latents are cut from the clip's own latents (training) instead of a second VAE pass over a masked
pixel video, which is exact for the first frame by causality and lets the feature cache and encoder-DP feed
I2V training unchanged.

Modes: ``none`` (T2V: zero conditioning, zero mask), ``first`` (pixel frame 0 given), ``transition``
(pixel frames 0 and T - 1 given; the latent frame holding frame T - 1 is kept whole).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

MODES = ("none", "first", "transition")


@dataclass
class I2VConditioning:
    """The model JSON's ``"conditioning": {"type": "i2v", "mask_channels": 8, "rates": {...}}``.

    ``mask_channels``: the VAE's temporal compression (8 for WFVAE 8x8x8). ``rates``: training probability of
    each mode (sum 1)."""

    type: str = "i2v"
    mask_channels: int = 8
    rates: dict = field(default_factory=lambda: {"none": 0.1, "first": 0.6, "transition": 0.3})

    def __post_init__(self):
        if self.type != "i2v":
            raise ValueError(f"conditioning.type={self.type!r}: allowed 'i2v'")
        if not isinstance(self.mask_channels, int) or isinstance(self.mask_channels, bool) or self.mask_channels < 1:
            raise ValueError(f"conditioning.mask_channels={self.mask_channels!r}: allowed an integer >= 1 "
                             "(the VAE's temporal compression)")
        rates = dict(self.rates)
        unknown = sorted(set(rates) - set(MODES))
        if unknown or not all(isinstance(v, (int, float)) and v >= 0 for v in rates.values()):
            raise ValueError(f"conditioning.rates={self.rates!r}: allowed non-negative numbers for {MODES}")
        if abs(sum(rates.values()) - 1.0) > 1e-6:
            raise ValueError(f"conditioning.rates={self.rates!r} sum to {sum(rates.values())}: allowed a sum of 1")
        self.rates = {m: float(rates.get(m, 0.0)) for m in MODES}

    @classmethod
    def parse(cls, value) -> "I2VConditioning | None":
        """None / an ``I2VConditioning`` / its JSON dict (keys checked)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"conditioning must be a dict like {{'type': 'i2v'}}, got {value!r}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown conditioning keys {unknown}: allowed {sorted(allowed)}")
        return cls(**value)

    def input_channels(self, latent_channels: int) -> int:
        """Channels the patch embedding takes: noisy + masked conditioning latents + mask."""
        return 2 * latent_channels + self.mask_channels


def check_frames(num_frames: int, mode: str, ft: int) -> None:
    """A clip of ``num_frames`` pixel frames can carry ``mode`` (ValueError otherwise)."""
    if mode not in MODES:
        raise ValueError(f"conditioning mode {mode!r}: allowed {MODES}")
    if num_frames < 1 or (num_frames - 1) % ft:
        raise ValueError(f"num_frames={num_frames}: allowed 1 + {ft} * k (the causal VAE's frame counts)")
    if mode == "transition" and num_frames == 1:
        raise ValueError("transition conditioning needs at least 1 + "
                         f"{ft} frames (first and last frame in different latent frames), got num_frames=1")


def pixel_frame_mask(num_frames: int, mode: str, ft: int) -> torch.Tensor:
    """``[T]`` float: 1 where the pixel frame is given."""
    check_frames(num_frames, mode, ft)
    m = torch.zeros(num_frames)
    if mode in ("first", "transition"):
        m[0] = 1.0
    if mode == "transition":
        m[-1] = 1.0
    return m


def fold_mask(pixel_mask: torch.Tensor, ft: int) -> torch.Tensor:
    """Pixel-frame mask ``[..., T]`` -> latent mask ``[..., ft, t]`` with ``t = 1 + (T - 1) / ft``: latent frame 0
    is frame 0 repeated ``ft`` times (causal first frame), latent frame ``i`` the frames ``(i-1)*ft+1 .. i*ft``."""
    T = pixel_mask.shape[-1]
    assert (T - 1) % ft == 0, (T, ft)
    first = pixel_mask[..., :1].unsqueeze(-2).expand(*pixel_mask.shape[:-1], ft, 1)  # [..., ft, 1]
    rest = pixel_mask[..., 1:].unflatten(-1, ((T - 1) // ft, ft)).transpose(-1, -2)  # [..., ft, t-1]
    return torch.cat([first, rest], dim=-1)


def latent_mask(modes: Sequence[str], num_frames: int, ft: int) -> torch.Tensor:
    """One mode per sample -> ``[B, ft, t]`` float latent mask."""
    return fold_mask(torch.stack([pixel_frame_mask(num_frames, m, ft) for m in modes]), ft)


def conditioning_channels(cond_latents: torch.Tensor, mask_BFt: torch.Tensor) -> torch.Tensor:
    """Conditioning latents ``[B, C, t, h, w]`` (anything in the frames not given) + latent mask ``[B, ft, t]``
    -> the extra input channels ``[B, C + ft, t, h, w]``: the latents zeroed where no pixel frame of the latent
    frame is given, then the mask broadcast over ``h, w``."""
    B, C, t, h, w = cond_latents.shape
    if mask_BFt.shape[0] != B or mask_BFt.shape[-1] != t:
        raise ValueError(f"mask {tuple(mask_BFt.shape)} does not fit latents {tuple(cond_latents.shape)}")
    mask_BFt = mask_BFt.to(device=cond_latents.device, dtype=cond_latents.dtype)
    keep = mask_BFt.amax(dim=1)[:, None, :, None, None]  # [B, 1, t, 1, 1]
    mask = mask_BFt[..., None, None].expand(B, mask_BFt.shape[1], t, h, w)  # [B, ft, t, h, w]
    return torch.cat([cond_latents * keep, mask], dim=1)


def draw_modes(batch: int, rates: Mapping[str, float], generator: torch.Generator) -> list[str]:
    """One mode per sample from ``rates`` (a CPU generator: the same draw on every rank that shares it)."""
    probs = torch.tensor([rates[m] for m in MODES], dtype=torch.float64)
    picks = torch.multinomial(probs, batch, replacement=True, generator=generator)
    return [MODES[int(i)] for i in picks]


def widen_patch_embed(weight: torch.Tensor, conditioning: I2VConditioning) -> torch.Tensor:
    """T2V ``patch_embed.proj.weight [D, C, p, p]`` -> I2V ``[D, 2C + ft, p, p]``, the new input channels zero."""
    D, C, p, q = weight.shape
    out = weight.new_zeros(D, conditioning.input_channels(C), p, q)
    out[:, :C] = weight
    return out


def training_channels(z0: torch.Tensor, conditioning: I2VConditioning, generator: torch.Generator) -> torch.Tensor:
    """Training: one mode per sample drawn at ``conditioning.rates``, the conditioning cut from the clip's own
    latents ``z0 [B, C, t, h, w]`` -> extra input channels ``[B, C + ft, t, h, w]``. A one-latent-frame sample
    (an image) cannot carry a transition and takes ``first`` instead."""
    t, ft = z0.shape[2], conditioning.mask_channels
    modes = draw_modes(z0.shape[0], conditioning.rates, generator)
    modes = [m if m != "transition" or t > 1 else "first" for m in modes]
    return conditioning_channels(z0, latent_mask(modes, 1 + (t - 1) * ft, ft))
