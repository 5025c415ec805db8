"""Shared helpers for the SUV tests: tiny configs, random released-key-space weights, random inputs."""

from __future__ import annotations

import math

import torch

from mm.models.suv_config import SUVConfig, tiny_suv_config


def tiny_config(**overrides) -> SUVConfig:
    return SUVConfig.from_upstream({**tiny_suv_config(), **overrides})


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every key of ``model.state_dict()`` (full key space of a TP = 1 model), scaled so
    activations stay O(1): norm weights ~1, biases small, matrices ~1/sqrt(fan_in). Skip linears are not
    [I|0], so the long skips really mix in the encoder streams."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        if len(shape) == 1 and key.endswith("weight"):  # every 1-D weight is a norm weight
            v = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            v = 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[key] = v.to(t.dtype)
    return out


def random_inputs(cfg: SUVConfig, *, B=2, T=2, H=6, W=10, L=6, seed=0, masks=True):
    """(latents, timestep, text_hidden, text_mask, pooled, video_mask). Default grid 2x3x5 = 30 tokens
    (padded for k = 2 and 4, divisible by TP = 2)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    timestep = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, cfg.caption_channels, generator=g)
    text_mask = torch.ones(B, L)
    video_mask = None
    if masks:
        text_mask[1, L // 2:] = 0
        video_mask = torch.ones(B, T, H, W)
        video_mask[1, :, :, W - 4:] = 0  # last two patch columns of sample 1 invalid
    pooled = torch.randn(B, cfg.pooled_projection_dim, generator=g)
    return latents, timestep, text, text_mask, pooled, video_mask
