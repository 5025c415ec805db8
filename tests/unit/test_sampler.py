"""Inference sampler pieces (spec §6.2): sigma grids, CFG + rescale, Euler step, NaN check."""

from __future__ import annotations

import pytest
import torch

from mm.diffusion.flow_matching import dynamic_shift
from mm.diffusion.sampler import NonFinitePredictionError, cfg, check_finite, euler_step, sigmas, timesteps


def test_release_grid_50_steps_shift_7():
    grid = sigmas(50, schedule="static_shift", shift=7.0)
    assert grid.dtype == torch.float32 and grid.shape == (51,)
    expected_head = torch.tensor([1.0, 0.99709, 0.99408, 0.99096, 0.98773, 0.98437])
    expected_tail = torch.tensor([0.30882, 0.22581, 0.125, 0.0])
    # the spec prints 5 decimals (e.g. 0.984375 as .98437)
    torch.testing.assert_close(grid[:6], expected_head, rtol=0, atol=1e-5)
    torch.testing.assert_close(grid[-4:], expected_tail, rtol=0, atol=1e-5)
    assert grid[-1] == 0.0 and (grid[1:] < grid[:-1]).all()


def test_shift_one_is_linspace():
    torch.testing.assert_close(sigmas(10, shift=1.0), torch.linspace(1, 0, 11))


def test_dynamic_shift_grid():
    grid = sigmas(20, schedule="dynamic_shift", latent_hw=(72, 128))
    s = torch.linspace(1, 0, 21, dtype=torch.float64)
    shift = dynamic_shift(72, 128)
    torch.testing.assert_close(grid, (shift * s / (1 + (shift - 1) * s)).float())
    with pytest.raises(ValueError, match="latent_hw"):
        sigmas(20, schedule="dynamic_shift")


def test_linear_quadratic_grid():
    n_steps = 50
    grid = sigmas(n_steps, schedule="linear_quadratic").double()
    assert grid.shape == (51,) and grid[0] == 1.0 and grid[-1] == 0.0
    assert (grid[1:] < grid[:-1]).all()
    # A = 500, a = 250, n = 25: linear part 1 - i/500, joining the quadratic at i = n continuously
    value = 1 - grid
    torch.testing.assert_close(value[:25], torch.arange(25, dtype=torch.float64) / 500, rtol=0, atol=1e-7)
    a, n = 250.0, 25
    qa, qb, qc = (a - n) / (a * n * n), (5 * n - 4 * a) / (2 * a * n), (a - n) / a
    i = torch.arange(25, 50, dtype=torch.float64)
    torch.testing.assert_close(value[25:50], qa * i**2 + qb * i + qc, rtol=0, atol=1e-6)
    assert value[25].item() == pytest.approx(n / (2 * a), abs=1e-7)
    with pytest.raises(ValueError, match="even"):
        sigmas(7, schedule="linear_quadratic")


def test_grid_validation():
    with pytest.raises(ValueError, match="schedule"):
        sigmas(10, schedule="karras")
    with pytest.raises(ValueError, match="num_steps"):
        sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        sigmas(10, shift=-1.0)


def test_timesteps():
    grid = sigmas(4, shift=3.0)
    t = timesteps(grid)
    assert t.shape == (4,) and t[0] == 1000.0
    torch.testing.assert_close(t, 1000 * grid[:-1])


def _reference_cfg(v_u, v_c, g, phi):
    v_u, v_c = v_u.double(), v_c.double()
    v = v_u + g * (v_c - v_u)
    b = v.shape[0]

    def std(x):
        flat = x.reshape(b, -1)
        mean = flat.mean(1, keepdim=True)
        return ((flat - mean) ** 2).sum(1).div(flat.shape[1] - 1).sqrt()

    ratio = (std(v_c) / std(v)).view(b, *([1] * (v.dim() - 1)))
    return phi * v * ratio + (1 - phi) * v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale, rescale", [(8.0, 0.7), (4.5, 0.0), (1.0, 1.0)])
def test_cfg_against_direct_formula(dtype, scale, rescale):
    g = torch.Generator().manual_seed(0)
    v_u = torch.randn(2, 4, 3, 4, 5, generator=g).to(dtype)
    v_c = (torch.randn(2, 4, 3, 4, 5, generator=g) * 2 + 0.5).to(dtype)
    out = cfg(v_u, v_c, scale, rescale)
    assert out.dtype == torch.float32  # guidance arithmetic is always fp32
    torch.testing.assert_close(out.double(), _reference_cfg(v_u, v_c, scale, rescale), rtol=1e-5, atol=1e-5)


def test_cfg_full_rescale_matches_cond_std():
    g = torch.Generator().manual_seed(1)
    v_u, v_c = torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g) * 3
    out = cfg(v_u, v_c, 8.0, 1.0)
    torch.testing.assert_close(out.reshape(3, -1).std(1), v_c.reshape(3, -1).std(1))
    torch.testing.assert_close(cfg(v_u, v_c, 1.0), v_c)
    torch.testing.assert_close(cfg(v_u, v_c, 0.0), v_u)


def test_cfg_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rescale"):
        cfg(x, x, 8.0, 1.5)
    with pytest.raises(ValueError, match="shape"):
        cfg(x, torch.zeros(2, 4), 8.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_euler_step_fp32_math(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=g).to(dtype)
    v = torch.randn(2, 4, 8, generator=g).to(dtype)
    out = euler_step(x, v, 0.9, torch.tensor(0.7))
    assert out.dtype == dtype
    expected = (x.float() + (torch.tensor(0.7) - torch.tensor(0.9)) * v.float()).to(dtype)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="velocity shape"):
        euler_step(x, v[:1], 0.9, 0.7)


def _gaussian_velocity(x, sigma, mu, s):
    """Exact marginal velocity E[eps - z0 | x_sigma = x] for z0 ~ N(mu, s^2), eps ~ N(0, 1)."""
    mean = (1 - sigma) * mu
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return -mu + (sigma - (1 - sigma) * s**2) / var * (x - mean)


@pytest.mark.parametrize("schedule, shift", [("static_shift", 7.0), ("static_shift", 1.0), ("linear_quadratic", 1.0)])
def test_sampler_integrates_toy_flow(schedule, shift):
    """The flow ODE maps x(1) = xi to x(0) = mu + s * xi exactly; Euler error must fall as steps grow."""
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(4, 2, 64, generator=g)
    mu, s = 1.5, 0.5
    exact = mu + s * xi
    errors = []
    for n in (8, 16, 32, 64):
        grid = sigmas(n, schedule=schedule, shift=shift)
        x = xi.clone().to(torch.float16)  # model-dtype latents, fp32 step math
        x32 = xi.clone()
        for i in range(n):
            v = _gaussian_velocity(x32, grid[i].double(), mu, s).float()
            check_finite(v, i)
            x32 = euler_step(x32, v, grid[i], grid[i + 1])
            x = euler_step(x, v.to(torch.float16), grid[i], grid[i + 1])
        errors.append((x32 - exact).abs().max().item())
        assert (x.float() - exact).abs().max().item() < errors[-1] + 0.05  # fp16 storage adds only rounding
    # first-order method: the error roughly halves each time the step count doubles
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors


def test_cfg_in_the_loop_with_unit_scale_follows_the_cond_flow():
    xi = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    grid = sigmas(128, shift=3.0)
    x = xi.clone()
    for i in range(128):
        v_u = _gaussian_velocity(x, grid[i].double(), -2.0, 1.0).float()
        v_c = _gaussian_velocity(x, grid[i].double(), 1.0, 0.5).float()
        x = euler_step(x, cfg(v_u, v_c, 1.0, 0.0), grid[i], grid[i + 1])
    torch.testing.assert_close(x, 1.0 + 0.5 * xi, rtol=0, atol=0.05)


def test_check_finite_names_the_step():
    check_finite(torch.ones(3), 0)
    v = torch.ones(2, 3)
    v[1, 2] = float("nan")
    with pytest.raises(NonFinitePredictionError, match="step 17") as err:
        check_finite(v, 17)
    assert err.value.step == 17
    with pytest.raises(FloatingPointError, match="step 3"):
        check_finite(torch.tensor([float("inf")], dtype=torch.float16), 3)
