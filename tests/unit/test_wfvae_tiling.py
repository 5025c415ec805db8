"""WFVAE temporal tiling (exact, spec §4.7), causality, and optional spatial tiling (error bound)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mm.models.vae_spatial_tiling import blend_weights, plan_tiles, tile_starts
from mm.models.vae_streaming import Stream, TemporalCache, decoder_chunks, encoder_chunks
from mm.models.wfvae import WFVAE, WFVAEConfig, tiny_wfvae_config

ATOL = 1e-5  # fp32, tiled vs untiled


def _model(**overrides) -> WFVAE:
    torch.manual_seed(0)
    config = dataclasses.replace(WFVAEConfig.from_upstream_dict(tiny_wfvae_config()), **overrides)
    return WFVAE.from_upstream(config)


@pytest.fixture(scope="module")
def vae() -> WFVAE:
    return _model()


def _video(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def _smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, frames, 8, 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(frames, height, width), mode="trilinear")


def _both(vae: WFVAE, fn, *args):
    vae.use_tiling = False
    untiled = fn(*args)
    vae.use_tiling = True
    return untiled, fn(*args)


def test_chunk_plans():
    assert encoder_chunks(1, 8) == [(0, 1)]
    assert encoder_chunks(17, 8) == [(0, 9), (9, 17)]
    assert encoder_chunks(41, 24) == [(0, 25), (25, 41)]  # balanced: 24 + 16 frames
    assert decoder_chunks(1, 4) == [(0, 1, 0)]
    assert decoder_chunks(5, 1) == [(0, 2, 1), (2, 3, 1), (3, 4, 1), (4, 5, 0)]
    assert decoder_chunks(11, 4) == [(0, 5, 1), (5, 8, 1), (8, 11, 0)]  # no short tail chunk


@pytest.mark.parametrize(
    "encode_bounds,decode_bounds",
    [([0, 1, 9, 17, 33], [0, 1, 2, 4, 5]), ([0, 1, 17, 25, 33], [0, 1, 4, 5])],
)
def test_streaming_is_exact_for_any_chunk_boundaries(vae, encode_bounds, decode_bounds):
    """The per-layer carried context does not depend on the plans (1-frame first chunks included)."""
    x = _video(33)
    stream = Stream(TemporalCache())
    chunks = [vae.encoder(x[:, :, a:b], stream) for a, b in zip(encode_bounds[:-1], encode_bounds[1:])]
    moments = vae.encoder(x)
    torch.testing.assert_close(torch.cat(chunks, dim=2), moments, rtol=0, atol=ATOL)
    z = moments[:, :32]
    cache, parts = TemporalCache(), []
    for a, b in zip(decode_bounds[:-1], decode_bounds[1:]):
        lookahead = 1 if b < z.shape[2] else 0
        y = vae.decoder(z[:, :, a : b + lookahead], Stream(cache, lookahead))
        assert y.shape[2] == 8 * (b - a) - (7 if a == 0 else 0)  # committed latents' frames only
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.decoder(z), rtol=0, atol=ATOL)


@pytest.mark.parametrize("frames", [1, 9, 17, 33])
def test_tiled_equals_untiled(vae, frames):
    """One model instance serves every T: chunk plans are computed per call, never frozen."""
    x = _video(frames)
    z, z_tiled = _both(vae, vae.encode, x)
    assert z.shape == (1, 32, (frames - 1) // 8 + 1, 2, 2)
    torch.testing.assert_close(z_tiled, z, rtol=0, atol=ATOL)
    y, y_tiled = _both(vae, vae.decode, z)
    assert y.shape == x.shape
    torch.testing.assert_close(y_tiled, y, rtol=0, atol=ATOL)


@pytest.mark.parametrize("encode_chunk_frames,decode_chunk_latents", [(16, 1), (24, 3)])
def test_tiled_equals_untiled_for_other_chunk_sizes(encode_chunk_frames, decode_chunk_latents):
    vae = _model(encode_chunk_frames=encode_chunk_frames, decode_chunk_latents=decode_chunk_latents)
    x = _video(33)
    z, z_tiled = _both(vae, vae.encode, x)
    torch.testing.assert_close(z_tiled, z, rtol=0, atol=ATOL)
    y, y_tiled = _both(vae, vae.decode, z)
    torch.testing.assert_close(y_tiled, y, rtol=0, atol=ATOL)


@pytest.mark.parametrize("use_tiling", [False, True])
def test_encoder_is_causal(vae, use_tiling):
    """Changing pixel frame 17 (latent 3 covers frames 17..24) leaves latents 0..2 bit-identical."""
    vae.use_tiling = use_tiling
    x = _video(33)
    x2 = x.clone()
    x2[:, :, 17] += 0.5
    z, z2 = vae.encode(x), vae.encode(x2)
    assert torch.equal(z[:, :, :3], z2[:, :, :3])
    assert (z[:, :, 3] - z2[:, :, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("use_tiling", [False, True])
def test_decoder_reaches_back_one_latent_only(vae, use_tiling):
    """Latent j changes no pixel frame of latents < j - 1 (only the trilinear right-neighbour reach)."""
    vae.use_tiling = use_tiling
    z = torch.randn(1, 32, 5, 2, 2, generator=torch.Generator().manual_seed(2))
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    y, y2 = vae.decode(z), vae.decode(z2)
    last_unchanged = 8 * (3 - 2)  # last pixel frame of latent 1
    assert torch.equal(y[:, :, : last_unchanged + 1], y2[:, :, : last_unchanged + 1])
    assert (y[:, :, 8 * 3] - y2[:, :, 8 * 3]).abs().max() > 1e-3


def test_spatial_tile_geometry():
    assert tile_starts(16, 8, 4) == [0, 4, 8]
    assert tile_starts(8, 8, 4) == [0]
    assert tile_starts(18, 8, 4) == [0, 4, 8, 10]
    assert len(plan_tiles(18, 6, 8, 4)) == 4
    # neighbours overlapping by exactly `overlap` cross-fade to a partition of unity
    a, b = blend_weights(0, 16, 24, 8), blend_weights(8, 16, 24, 8)
    torch.testing.assert_close(a[8:] + b[:8], torch.ones(8))
    assert a[-3:].max() == 0 and a[:11].min() == 1  # 0 within 3/8 of the overlap, ramp over its middle 1/4


def test_spatial_tiling_is_exact_with_enough_overlap():
    """3/8 of the overlap covers the tiny config's receptive radius (decoder 58 px, encoder 24 px)."""
    vae = _model(spatial_tile_size=168, spatial_tile_overlap=160, decode_chunk_latents=1)
    x = _smooth_video(17, 176, 64)  # two tiles along H; two temporal chunks in each direction
    vae.use_spatial_tiling = False
    z = vae.encode(x)
    y = vae.decode(z)
    vae.use_spatial_tiling = True
    torch.testing.assert_close(vae.encode(x), z, rtol=0, atol=ATOL)
    torch.testing.assert_close(vae.decode(z), y, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "tile,overlap,encode_bound,decode_bound",
    # measured max |tiled - untiled| / max |untiled| (seed 0): 2.6e-3 / 0.58 and 0 / 5.8e-2
    [(64, 32, 4e-3, 0.8), (96, 64, 1e-6, 0.1)],
)
def test_spatial_tiling_error_bound(tile, overlap, encode_bound, decode_bound):
    """Below the receptive radius the blend is approximate; the bounds pin the measured error."""
    vae = _model(spatial_tile_size=tile, spatial_tile_overlap=overlap)
    x = _smooth_video(9, 128, 64)
    vae.use_spatial_tiling = False
    z = vae.encode(x)
    y = vae.decode(z)
    vae.use_spatial_tiling = True
    encode_err = (vae.encode(x) - z).abs().max() / z.abs().max()
    decode_err = (vae.decode(z) - y).abs().max() / y.abs().max()
    assert encode_err < encode_bound and decode_err < decode_bound, (encode_err, decode_err)
