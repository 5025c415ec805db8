"""3-D Haar transform and inverse (spec §4.3): constants, channel order, causal frame arithmetic, round trip."""

import pytest
import torch

from mm.models.vae_streaming import Stream, TemporalCache
from mm.models.wavelet import (
    HAAR_SCALE,
    SUBBANDS,
    HaarWaveletTransform3D,
    InverseHaarWaveletTransform3D,
    haar_kernel,
)

ROUND_TRIP_SCALE = 8 * 0.3536**2  # 1.000264, reproduced on purpose (spec §12 item 7)


def test_kernels_are_the_spec_table():
    assert HAAR_SCALE == 0.3536
    assert list(SUBBANDS) == ["h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v"]
    gh_v = haar_kernel("gh_v")[0, 0]
    assert gh_v.shape == (2, 2, 2)
    assert gh_v[0, 0, 0] == pytest.approx(0.3536) and gh_v[1, 1, 1] == pytest.approx(-0.3536)
    assert gh_v[1, 0, 0] == pytest.approx(-0.3536) and gh_v[0, 1, 1] == pytest.approx(0.3536)
    g = haar_kernel("g")[0, 0]
    assert g[:, :, 0].min() > 0 and g[:, :, 1].max() < 0  # g: (+, -) along w only
    stacked = torch.stack([haar_kernel(n).flatten() for n in SUBBANDS])  # [8, 8]
    torch.testing.assert_close(stacked @ stacked.T, torch.eye(8) * ROUND_TRIP_SCALE, rtol=0, atol=1e-7)


def test_subband_major_channel_order_and_shapes():
    x = torch.ones(2, 3, 9, 8, 8) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1)
    y = HaarWaveletTransform3D()(x)
    assert y.shape == (2, 24, 5, 4, 4)
    # a constant video has only the LLL band: channels 0..2 = LLL of R, G, B
    torch.testing.assert_close(y[:, :3], 8 * HAAR_SCALE * x[:, :, :5, :4, :4])
    assert y[:, 3:].abs().max() < 1e-6


@pytest.mark.parametrize("frames", [1, 3, 9, 17])
def test_round_trip_scales_by_1_000264(frames):
    x = torch.randn(1, 3, frames, 8, 16, dtype=torch.float64)
    forward, inverse = HaarWaveletTransform3D().double(), InverseHaarWaveletTransform3D().double()
    y = forward(x)
    assert y.shape == (1, 24, (frames - 1) // 2 + 1, 4, 8)
    # kernels are stored in fp32, so 0.3536 carries fp32 rounding (relative 3e-8)
    torch.testing.assert_close(inverse(y), x * ROUND_TRIP_SCALE, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(inverse(y), x, rtol=1e-4, atol=0)  # the 1.000264 is really there


def test_streamed_transform_equals_whole():
    x = torch.randn(1, 3, 17, 8, 8, dtype=torch.float64)
    forward, inverse = HaarWaveletTransform3D().double(), InverseHaarWaveletTransform3D().double()
    stream = Stream(TemporalCache())
    chunks = [forward(x[:, :, a:b], stream) for a, b in [(0, 1), (1, 9), (9, 17)]]
    torch.testing.assert_close(torch.cat(chunks, dim=2), forward(x), rtol=0, atol=1e-12)
    stream = Stream(TemporalCache())
    y = forward(x)
    parts = [inverse(y[:, :, a:b], stream) for a, b in [(0, 1), (1, 5), (5, 9)]]
    torch.testing.assert_close(torch.cat(parts, dim=2), inverse(y), rtol=0, atol=1e-12)


def test_parameter_and_buffer_layout():
    forward, inverse = HaarWaveletTransform3D(), InverseHaarWaveletTransform3D()
    params = dict(forward.named_parameters())
    assert sorted(params) == sorted(f"{n}_conv.conv.weight" for n in SUBBANDS)
    assert all(not p.requires_grad and p.shape == (1, 1, 2, 2, 2) for p in params.values())
    assert not list(inverse.parameters())
    assert sorted(inverse.state_dict()) == sorted(SUBBANDS)
