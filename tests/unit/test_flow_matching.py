"""Flow-matching training math (spec §6.1)."""

from __future__ import annotations

import math

import pytest
import torch

from mm.diffusion.flow_matching import (
    NoisedSample,
    add_noise,
    broadcast_from_group_src,
    dynamic_shift,
    flow_matching_loss,
    model_timesteps,
    q_sample,
    sample_noise,
    sample_sigmas,
    shift_sigmas,
    velocity_target,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "latent_hw, expected",
    [((72, 128), 2.33186), ((36, 64), 1.74049), ((32, 32), 1.64872)],  # 576x1024, 288x512, 256x256
)
def test_dynamic_shift_closed_form(latent_hw, expected):
    assert dynamic_shift(*latent_hw) == pytest.approx(expected, abs=5e-6)


def test_dynamic_shift_mu_at_release_resolution():
    assert math.log(dynamic_shift(72, 128)) == pytest.approx(0.846667, abs=1e-6)


def test_dynamic_shift_rejects_bad_size():
    with pytest.raises(ValueError, match="0x128"):
        dynamic_shift(0, 128)


def test_shift_sigmas():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    shifted = shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > s[1:-1]).all()
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(s, 0.0)


def test_sample_sigmas_matches_formula_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    sigma = sample_sigmas(1000, shift=2.5, generator=_gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    u = torch.randn(1000, generator=_gen(3))
    s = torch.sigmoid(u)
    torch.testing.assert_close(sigma, 2.5 * s / (1 + 1.5 * s))
    assert sigma.dtype == torch.float32 and sigma.shape == (1000,)
    assert torch.equal(sigma, sample_sigmas(1000, shift=2.5, generator=_gen(3)))


def test_sample_sigmas_distribution_median():
    # median of sigmoid(N(0,1)) is 0.5, so the shifted median is shift / (1 + shift)
    sigma = sample_sigmas(20000, shift=3.0, generator=_gen(1))
    assert sigma.median().item() == pytest.approx(0.75, abs=0.01)
    assert 0 < sigma.min() and sigma.max() < 1


def test_sample_sigmas_min_clamp_and_validation():
    sigma = sample_sigmas(4000, shift=1.0, generator=_gen(0), sigma_min=0.3)
    assert sigma.min().item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="sigma_min"):
        sample_sigmas(2, shift=1.0, generator=_gen(0), sigma_min=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        sample_sigmas(0, shift=1.0, generator=_gen(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_noise_fp32_math_cast_back(dtype):
    z0 = torch.randn(3, 4, 2, 3, 5, generator=_gen(0)).to(dtype)
    eps = torch.randn(3, 4, 2, 3, 5, generator=_gen(1))
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x = add_noise(z0, eps, sigma)
    assert x.dtype == dtype
    ref = (sigma.view(-1, 1, 1, 1, 1) * eps + (1 - sigma.view(-1, 1, 1, 1, 1)) * z0.float()).to(dtype)
    assert torch.equal(x, ref)
    assert torch.equal(x[0], z0[0]) and torch.equal(x[2], eps[2].to(dtype))


def test_add_noise_validates_shapes():
    z0 = torch.zeros(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="sigma"):
        add_noise(z0, z0, torch.zeros(3))
    with pytest.raises(ValueError, match="noise shape"):
        add_noise(z0, torch.zeros(2, 4, 1, 2, 3), torch.zeros(2))


def test_velocity_is_derivative_of_path():
    z0 = torch.randn(2, 4, 1, 2, 2, generator=_gen(0), dtype=torch.float64)
    eps = torch.randn(2, 4, 1, 2, 2, generator=_gen(1), dtype=torch.float64)
    h = 0.1  # the path is linear in sigma, so a wide central difference is exact (add_noise is fp32 math)
    s = torch.full((2,), 0.4, dtype=torch.float64)
    fd = (add_noise(z0, eps, s + h) - add_noise(z0, eps, s - h)) / (2 * h)
    torch.testing.assert_close(velocity_target(z0, eps).double(), fd, rtol=1e-5, atol=1e-5)
    assert velocity_target(z0.half(), eps.half()).dtype == torch.float32


def test_model_timesteps():
    torch.testing.assert_close(model_timesteps(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 500.0, 1000.0]))


def test_loss_unmasked_is_fp32_mean():
    pred = torch.randn(2, 4, 3, 4, 4, generator=_gen(0)).bfloat16()
    target = torch.randn(2, 4, 3, 4, 4, generator=_gen(1))
    loss = flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ((pred.float() - target) ** 2).mean())


def test_loss_all_ones_mask_equals_mean():
    pred = torch.randn(2, 4, 3, 4, 4, generator=_gen(0))
    target = torch.randn(2, 4, 3, 4, 4, generator=_gen(1))
    torch.testing.assert_close(flow_matching_loss(pred, target, torch.ones(2, 3, 4, 4)), flow_matching_loss(pred, target))


def test_loss_mask_ignores_padding_and_broadcasts_over_channels():
    pred = torch.randn(2, 4, 3, 4, 4, generator=_gen(0))
    target = torch.randn(2, 4, 3, 4, 4, generator=_gen(1))
    mask = torch.ones(2, 3, 4, 4)
    mask[0, 2:] = 0  # padded frames of sample 0
    mask[1, :, :, 3:] = 0  # padded column of sample 1
    loss = flow_matching_loss(pred, target, mask)
    valid = torch.cat([(pred[0, :, :2] - target[0, :, :2]).flatten(), (pred[1, ..., :3] - target[1, ..., :3]).flatten()])
    torch.testing.assert_close(loss, valid.square().mean())
    # garbage in the padding, even non-finite, does not change the loss
    corrupted = pred.clone()
    corrupted[0, :, 2:] = 1e6
    corrupted[1, ..., 3:] = float("nan")
    torch.testing.assert_close(flow_matching_loss(corrupted, target, mask), loss)


def test_loss_validates_shapes():
    x = torch.zeros(2, 4, 3, 4, 4)
    with pytest.raises(ValueError, match="mask shape"):
        flow_matching_loss(x, x, torch.ones(2, 4, 3, 4, 4))
    with pytest.raises(ValueError, match="prediction shape"):
        flow_matching_loss(x, x[:1])


def test_q_sample_deterministic_and_consistent():
    z0 = torch.randn(3, 4, 2, 4, 4, generator=_gen(5)).bfloat16()
    state = torch.get_rng_state()
    a = q_sample(z0, shift=dynamic_shift(4, 4), generator=_gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    b = q_sample(z0, shift=dynamic_shift(4, 4), generator=_gen(7))
    assert isinstance(a, NoisedSample)
    assert torch.equal(a.x, b.x) and torch.equal(a.sigma, b.sigma) and torch.equal(a.eps, b.eps)
    assert a.x.dtype == torch.bfloat16 and a.eps.dtype == torch.float32 and a.sigma.shape == (3,)
    torch.testing.assert_close(a.timesteps, 1000 * a.sigma)
    assert torch.equal(a.x, add_noise(z0, a.eps, a.sigma))
    # sigma is drawn first, then the noise, from the same generator
    g = _gen(7)
    sigma = sample_sigmas(3, shift=dynamic_shift(4, 4), generator=g)
    assert torch.equal(sample_noise(z0, generator=g), a.eps) and torch.equal(sigma, a.sigma)


def test_broadcast_is_noop_without_group():
    t = torch.arange(3.0)
    assert broadcast_from_group_src([t], None)[0] is t
    assert q_sample(torch.zeros(1, 2, 1, 2, 2), shift=1.0, generator=_gen(0), sync_groups=(None,)).x.shape == (1, 2, 1, 2, 2)
