"""Inference sampler pieces for the flow ODE: sigma grids, classifier-free guidance, Euler step.

Follows spec §6.2 (and §12 items 28, 29, 32). The denoising loop itself lives in the inference
pipeline (ARCHITECTURE.md principle 6); a loop over these pieces reads::

    grid = sigmas(50, schedule="static_shift", shift=7.0)
    for i in range(len(grid) - 1):
        v_u, v_c = denoiser([x; x], timesteps(grid)[i], ...).chunk(2)   # batch = [uncond; cond]
        v = cfg(v_u, v_c, scale=8.0, rescale=0.7)
        check_finite(v, i)
        x = euler_step(x, v, grid[i], grid[i + 1])

All arithmetic is fp32 whatever the model dtype (upstream kept latents and CFG math in fp16, §12 item 28);
:func:`euler_step` returns the latent in its input dtype. Note the released inference uses a static
shift of 7 while training uses the dynamic shift (~2.33 at 576x1024), §12 item 32; both are offered.
Guidance scale: the value passed to :func:`cfg` is the one used (upstream's pipeline argument only
toggled CFG while the scheduler's 8.0 was applied, §12 item 29).
"""

from __future__ import annotations

import torch

from mm.diffusion.flow_matching import NUM_TRAIN_TIMESTEPS, dynamic_shift, shift_sigmas

SCHEDULES = ("static_shift", "dynamic_shift", "linear_quadratic")


class NonFinitePredictionError(FloatingPointError):
    """The denoiser returned NaN or Inf at some sampling step."""

    def __init__(self, step: int, num_bad: int, numel: int):
        super().__init__(f"non-finite velocity prediction at sampling step {step}: {num_bad} of {numel} elements are NaN/Inf")
        self.step = step


def _linear_quadratic(num_steps: int) -> torch.Tensor:
    """Linear-then-quadratic grid of spec §6.2 (no shift), fp64 ``[num_steps + 1]`` from 1 down to 0."""
    if num_steps % 2 != 0:
        raise ValueError(f"linear_quadratic needs an even number of steps, got {num_steps}")
    big_a = min(max(10 * num_steps, 250), 1000)
    n = num_steps // 2
    a = big_a / 2
    i_lin = torch.arange(0, n, dtype=torch.float64)
    linear = i_lin / (2 * a)
    qa = (a - n) / (a * n * n)
    qb = (5 * n - 4 * a) / (2 * a * n)
    qc = (a - n) / a
    i_quad = torch.arange(n, 2 * n, dtype=torch.float64)
    quadratic = qa * i_quad.square() + qb * i_quad + qc
    # The quadratic part joins the linear one at i = n (value n / 2a) and reaches 1 at i = 2n.
    values = torch.cat([linear, quadratic, torch.ones(1, dtype=torch.float64)])
    return 1.0 - values


def sigmas(
    num_steps: int,
    *,
    schedule: str = "static_shift",
    shift: float = 1.0,
    latent_hw: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sigma grid, fp32 ``[num_steps + 1]``, decreasing from 1 to exactly 0.

    * ``static_shift``: ``linspace(1, 0, N + 1)`` then the time shift with ``shift`` (no-op for shift 1).
      Release: N = 50, shift = 7.
    * ``dynamic_shift``: same with ``shift = dynamic_shift(*latent_hw)`` (``latent_hw`` = latent (h, w)).
    * ``linear_quadratic``: spec §6.2 linear-then-quadratic grid (N even, no shift applied).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown sigma schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if schedule == "linear_quadratic":
        grid = _linear_quadratic(num_steps)
    else:
        if schedule == "dynamic_shift":
            if latent_hw is None:
                raise ValueError("schedule 'dynamic_shift' needs latent_hw=(latent_height, latent_width)")
            shift = dynamic_shift(*latent_hw)
        elif not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        grid = shift_sigmas(grid, shift)
    return grid.to(dtype=torch.float32, device=device)


def timesteps(sigma_grid: torch.Tensor) -> torch.Tensor:
    """Model timesteps ``1000 * sigma_i`` for i = 0..N-1 (the final sigma 0 is never fed to the model)."""
    return sigma_grid[:-1].float() * NUM_TRAIN_TIMESTEPS


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance with guidance rescale, in fp32 (returns fp32).

    ``v = v_u + scale * (v_c - v_u)``; with ``rescale = phi > 0``:
    ``v <- phi * v * std(v_c) / std(v) + (1 - phi) * v``, std per sample over all non-batch dims
    (unbiased, as torch.std). Release: scale 8.0, rescale 0.7.
    """
    if v_uncond.shape != v_cond.shape:
        raise ValueError(f"uncond shape {tuple(v_uncond.shape)} != cond shape {tuple(v_cond.shape)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    v_u = v_uncond.float()
    v_c = v_cond.float()
    v = v_u + scale * (v_c - v_u)
    if rescale > 0.0:
        dims = tuple(range(1, v.dim()))
        std_c = v_c.std(dim=dims, keepdim=True)
        std_v = v.std(dim=dims, keepdim=True)
        v = rescale * (v * (std_c / std_v)) + (1.0 - rescale) * v
    return v


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """One Euler step of ``dx/dsigma = v``: ``x + (sigma_next - sigma) * v``, fp32 math, returned in ``x``'s dtype."""
    if v.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(v.shape)} != latent shape {tuple(x.shape)}")
    dt = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device) - torch.as_tensor(
        sigma, dtype=torch.float32, device=x.device
    )
    return (x.float() + dt * v.float()).to(x.dtype)


def check_finite(v: torch.Tensor, step: int) -> None:
    """Raise :class:`NonFinitePredictionError` naming ``step`` if ``v`` holds NaN or Inf (one host sync)."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise NonFinitePredictionError(step, int(bad.sum()), v.numel())
