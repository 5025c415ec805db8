"""Flow-matching (rectified-flow) training math: sigma sampling, noising, velocity target, masked loss.

Follows spec §6.1 (the "OpenSoraPlan" scheduler used for v1.5 training):

* ``u ~ N(0, 1)`` drawn on the CPU, ``s = sigmoid(u)`` (logit-normal, mean 0, std 1);
* dynamic (resolution-dependent) shift, Flux-style linear in the number of spatial patches per frame:
  ``seq = (h_lat * w_lat) // 4``, ``mu = 0.5 + 0.65 * (seq - 256) / (4096 - 256)``, ``shift = e^mu``;
* ``sigma = shift * s / (1 + (shift - 1) * s)``, clamped below by ``sigma_min`` (0 in the release);
* ``x_sigma = sigma * eps + (1 - sigma) * z0`` computed in fp32 and cast back to the latent dtype;
* model timestep ``1000 * sigma``; target velocity ``eps - z0``;
* loss: mean squared error in fp32, or, with a latent validity mask, the mean over the valid elements.

Everything here is pure tensor math; the training loop lives in the trainer (ARCHITECTURE.md principle 6).
Randomness comes only from explicit ``torch.Generator`` arguments, never from the global RNG, and
:func:`broadcast_from_group_src` makes noise and sigma identical on all ranks that hold pieces of one
sample (the TP group and the CP group, spec §6.1 last bullet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

# Flux-style dynamic shift constants (spec §6.1): mu is linear in the spatial token count between
# (base_seq_len, base_shift) and (max_seq_len, max_shift).
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15
# Spatial patch area of the SUV patch embedding (2 x 2): tokens per frame = h_lat * w_lat // 4.
PATCH_AREA = 4
# Timestep scale: the denoiser is conditioned on 1000 * sigma.
NUM_TRAIN_TIMESTEPS = 1000


def dynamic_shift(
    latent_height: int,
    latent_width: int,
    *,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """Resolution-dependent shift ``e^mu`` for a latent of spatial size ``latent_height x latent_width``.

    Frames are ignored (spec §6.1). Examples: 72x128 latent (576x1024 video) -> 2.33186;
    36x64 (288x512) -> 1.74049; 32x32 (256x256 image) -> 1.64872.
    """
    if latent_height < 1 or latent_width < 1:
        raise ValueError(
            f"latent size must be positive, got {latent_height}x{latent_width} (accepted: >= 1 each)"
        )
    if max_seq_len <= base_seq_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be > base_seq_len ({base_seq_len})")
    seq = (latent_height * latent_width) // PATCH_AREA
    mu = base_shift + (max_shift - base_shift) * (seq - base_seq_len) / (max_seq_len - base_seq_len)
    return math.exp(mu)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift ``shift * s / (1 + (shift - 1) * s)``: maps [0, 1] onto itself, pushing mass to 1 for shift > 1."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(
    batch_size: int,
    *,
    shift: float,
    generator: torch.Generator,
    sigma_min: float = 0.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Shifted logit-normal sigmas, fp32 ``[batch_size]``.

    ``u`` is drawn on the generator's device (a CPU generator reproduces upstream, which samples on the
    CPU), then moved to ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    u = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float32)
    s = torch.sigmoid(u * logit_std + logit_mean)
    sigma = shift_sigmas(s, shift).clamp_min(sigma_min)
    return sigma.to(device if device is not None else generator.device)


def sample_noise(
    like: torch.Tensor, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise with the shape of ``like``, drawn on the generator's device, moved to ``like``'s."""
    eps = torch.randn(like.shape, generator=generator, device=generator.device, dtype=dtype)
    return eps.to(like.device)


def _expand_like(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``x`` (fp32)."""
    if sigma.dim() != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must have shape [B] = [{x.shape[0]}] to match the latent batch, got {tuple(sigma.shape)}"
        )
    return sigma.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))


def add_noise(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = sigma * eps + (1 - sigma) * z0`` in fp32, returned in ``z0``'s dtype. ``sigma``: ``[B]``."""
    if eps.shape != z0.shape:
        raise ValueError(f"noise shape {tuple(eps.shape)} != latent shape {tuple(z0.shape)}")
    s = _expand_like(sigma, z0)
    x = s * eps.float() + (1.0 - s) * z0.float()
    return x.to(z0.dtype)


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity of the straight path from data to noise, ``eps - z0``, in fp32."""
    return eps.float() - z0.float()


def model_timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """Timestep fed to the denoiser: ``1000 * sigma`` (float)."""
    return sigma.float() * NUM_TRAIN_TIMESTEPS


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared velocity error in fp32 (a scalar).

    ``pred``/``target``: ``[B, C, T, H, W]``. ``mask``: latent validity ``[B, T, H, W]`` (1 valid, 0 padding),
    broadcast over channels. With a mask, the loss is the mean over the valid elements,
    ``sum(mask * err^2) / (C * sum(mask))``, so an all-ones mask gives exactly the unmasked mean
    (the normaliser counts every channel of every valid position).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err2 = (pred.float() - target.float()).square()
    if mask is None:
        return err2.mean()
    expected = (pred.shape[0], *pred.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be [B, *spatial] = {expected} for prediction {tuple(pred.shape)}"
        )
    m = mask.to(device=pred.device, dtype=torch.float32).unsqueeze(1)  # [B, 1, T, H, W]
    # No host sync to validate the mask: an all-zero mask gives 0/0 = NaN, which the trainer's
    # non-finite loss check reports.
    # where(), not a bare product: a non-finite prediction on padding must not leak in as 0 * inf = NaN.
    masked = torch.where(m > 0, err2 * m, torch.zeros((), dtype=err2.dtype, device=err2.device))
    return masked.sum() / (m.sum() * pred.shape[1])


def broadcast_from_group_src(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None
) -> Sequence[torch.Tensor]:
    """Overwrite ``tensors`` in place with the copies held by the first rank of ``group``.

    Used for the flow-matching noise and sigma so every rank of a TP (or CP) group corrupts its shard
    of the sample identically. A no-op when ``group`` is None, torch.distributed is not initialised, or
    the group has a single rank. Tensors must live on a device the group's backend supports.
    """
    if group is None or not dist.is_available() or not dist.is_initialized():
        return tensors
    if dist.get_world_size(group) == 1:
        return tensors
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
    return tensors


@dataclass(frozen=True)
class NoisedSample:
    """One flow-matching corruption of a latent batch (spec §7.2 ``scheduler.q_sample``)."""

    x: torch.Tensor  # x_sigma, latent dtype, [B, C, T, H, W]
    eps: torch.Tensor  # noise, fp32, same shape
    sigma: torch.Tensor  # fp32 [B]
    timesteps: torch.Tensor  # fp32 [B], 1000 * sigma


def q_sample(
    z0: torch.Tensor,
    *,
    shift: float,
    generator: torch.Generator,
    sigma_min: float = 0.0,
    sync_groups: Sequence[dist.ProcessGroup | None] = (),
) -> NoisedSample:
    """Draw sigma (shifted logit-normal) and noise, then corrupt ``z0``.

    ``sigma`` is drawn before the noise from the same generator. Each group in ``sync_groups`` (e.g. the
    TP group and the CP group) then gets the first rank's noise and sigma via :func:`broadcast_from_group_src`.
    """
    sigma = sample_sigmas(z0.shape[0], shift=shift, generator=generator, sigma_min=sigma_min, device=z0.device)
    eps = sample_noise(z0, generator=generator)
    for group in sync_groups:
        broadcast_from_group_src([eps, sigma], group)
    return NoisedSample(x=add_noise(z0, eps, sigma), eps=eps, sigma=sigma, timesteps=model_timesteps(sigma))
