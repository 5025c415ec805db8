"""WFVAE model: config adapter, released key set and parameter count, checkpoint layouts, API, bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mm.models import WFVAE
from mm.models.wavelet import SUBBANDS
from mm.models.wfvae import (
    LATENT_SCALE,
    LATENT_SHIFT,
    WFVAEConfig,
    released_wfvae_config,
    tiny_wfvae_config,
)


@pytest.fixture(scope="module")
def tiny() -> WFVAE:
    torch.manual_seed(0)
    return WFVAE.from_upstream(tiny_wfvae_config())


@pytest.fixture(scope="module")
def released_meta() -> WFVAE:
    return WFVAE.from_upstream(released_wfvae_config(), device="meta")


def _video(frames=9, size=16, seed=0):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------ released structure (spec §4.8)


def _spec_key_set() -> set[str]:
    """The 252 released keys, written out from spec §4.8 independently of the model code."""
    keys: set[str] = set()

    def affine(prefix):
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    def res3d(prefix, shortcut=False):
        for name in ("norm1.norm", "conv1.conv", "norm2.norm", "conv2.conv"):
            affine(f"{prefix}.{name}")
        if shortcut:
            affine(f"{prefix}.nin_shortcut.conv")

    def res2d(prefix):
        for name in ("norm1.norm", "conv1", "norm2.norm", "conv2"):
            affine(f"{prefix}.{name}")

    def attn(prefix):
        for name in ("norm.norm", "q.conv", "k.conv", "v.conv", "proj_out.conv"):
            affine(f"{prefix}.{name}")

    e, d = "encoder", "decoder"
    affine(f"{e}.down1.0"), res2d(f"{e}.down1.1"), res2d(f"{e}.down1.2"), affine(f"{e}.down1.3.conv.conv")
    affine(f"{e}.down2.0"), res3d(f"{e}.down2.1"), res3d(f"{e}.down2.2"), affine(f"{e}.down2.3.conv.conv")
    affine(f"{e}.connect_l1"), affine(f"{e}.connect_l2")
    res3d(f"{e}.mid.0", shortcut=True), attn(f"{e}.mid.1"), res3d(f"{e}.mid.2")
    affine(f"{e}.norm_out.norm"), affine(f"{e}.conv_out.conv")
    keys.update(f"{e}.wavelet_transform_{lvl}.{s}_conv.conv.weight" for lvl in ("in", "l1", "l2") for s in SUBBANDS)

    affine(f"{d}.conv_in.conv")
    res3d(f"{d}.mid.0"), attn(f"{d}.mid.1"), res3d(f"{d}.mid.2", shortcut=True)
    res3d(f"{d}.up2.0"), res3d(f"{d}.up2.1"), affine(f"{d}.up2.2.conv.conv"), res3d(f"{d}.up2.3", shortcut=True)
    res3d(f"{d}.up1.0", shortcut=True), res3d(f"{d}.up1.1"), affine(f"{d}.up1.2.conv.conv"), res3d(f"{d}.up1.3")
    res3d(f"{d}.layer.0", shortcut=True), res3d(f"{d}.layer.1")
    for lvl in ("l1", "l2"):
        res3d(f"{d}.connect_{lvl}.0"), affine(f"{d}.connect_{lvl}.1")
    affine(f"{d}.norm_out.norm"), affine(f"{d}.conv_out")
    keys.update(f"{d}.inverse_wavelet_transform_{lvl}.{s}" for lvl in ("out", "l1", "l2") for s in SUBBANDS)
    return keys


def test_released_key_set(released_meta):
    state = released_meta.state_dict()
    assert len(state) == 252
    assert set(state) == _spec_key_set()


def test_released_shapes(released_meta):
    state = released_meta.state_dict()
    expected = {
        "encoder.down1.0.weight": (160, 24, 3, 3),
        "encoder.down1.1.conv1.weight": (160, 160, 3, 3),
        "encoder.down1.3.conv.conv.weight": (160, 160, 3, 3, 3),
        "encoder.down2.0.weight": (320, 288, 3, 3),
        "encoder.down2.1.conv1.conv.weight": (320, 320, 3, 3, 3),
        "encoder.connect_l1.weight": (128, 24, 3, 3),
        "encoder.mid.0.nin_shortcut.conv.weight": (640, 448, 1, 1, 1),
        "encoder.mid.1.q.conv.weight": (640, 640, 1, 1, 1),
        "encoder.norm_out.norm.weight": (640,),
        "encoder.conv_out.conv.weight": (64, 640, 3, 3, 3),
        "encoder.wavelet_transform_in.h_conv.conv.weight": (1, 1, 2, 2, 2),
        "decoder.conv_in.conv.weight": (640, 32, 3, 3, 3),
        "decoder.mid.2.nin_shortcut.conv.weight": (768, 640, 1, 1, 1),
        "decoder.up2.2.conv.conv.weight": (640, 640, 3, 3, 3),
        "decoder.up1.2.conv.conv.weight": (320, 320, 3, 3, 3),
        "decoder.connect_l1.1.weight": (24, 128, 3, 3),
        "decoder.norm_out.norm.weight": (160,),
        "decoder.conv_out.weight": (24, 160, 3, 3),
        "decoder.inverse_wavelet_transform_out.h": (1, 1, 2, 2, 2),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def test_released_parameter_count(released_meta):
    def count(module, haar):
        return sum(p.numel() for n, p in module.named_parameters() if ("wavelet_transform" in n) == haar)

    assert count(released_meta.encoder, haar=False) == 60_326_272
    assert count(released_meta.encoder, haar=True) == 24 * 8
    assert count(released_meta.decoder, haar=False) == 166_709_352
    assert count(released_meta.decoder, haar=True) == 0
    assert all(b.device.type == "meta" for b in released_meta.buffers())


# ------------------------------------------------------------------ config


def test_config_defaults_are_the_release():
    config = WFVAEConfig.from_upstream_dict(released_wfvae_config())
    assert config == WFVAEConfig()
    assert config.scale == LATENT_SCALE and config.shift == LATENT_SHIFT and len(config.scale) == 32


def test_config_from_json_path(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"frames": 121, "ae": {**tiny_wfvae_config(), "dtype": "fp16"}}))
    vae = WFVAE.from_upstream(path, device="meta")
    assert vae.config.base_channels == 8 and vae.dtype == torch.float16
    (tmp_path / "no_ae.json").write_text(json.dumps({"frames": 121}))
    with pytest.raises(ValueError, match="no 'ae' block"):
        WFVAE.from_upstream(tmp_path / "no_ae.json")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("l1_dowmsample_block", "Downsample", "l1_dowmsample_block.*Spatial2xTime2x3DDownsample"),
        ("l1_downsample_wavelet", "HaarWaveletTransform2D", "supports only 'HaarWaveletTransform3D'"),
        ("norm_type", "groupnorm", "layernorm"),
        ("vae_scale_factor", [4, 8, 8], r"\[8, 8, 8\]"),
        ("mystery", 1, "unknown WFVAE ae key 'mystery'"),
        ("dtype", "fp8", "dtype must be one of"),
        ("base_channels", 0, "base_channels must be an int >= 1, got 0"),
        ("encode_chunk_frames", 12, "multiple of 8"),
        ("scale", [1.0] * 4, "latent_dim=32"),
        ("spatial_tile_overlap", 512, r"spatial_tile_overlap must be in \[0, spatial_tile_size=512\)"),
    ],
)
def test_config_rejects(key, value, match):
    with pytest.raises(ValueError, match=match):
        WFVAEConfig.from_upstream_dict({**released_wfvae_config(), key: value})


# ------------------------------------------------------------------ checkpoint layouts


def _layouts(state):
    return {
        "flat": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "gen_model": {"state_dict": {"gen_model": state, "dis_model": {}}},
        "ema": {"ema_state_dict": {f"module.{k}": v for k, v in state.items()}, "state_dict": {}},
    }


@pytest.mark.parametrize("layout", ["flat", "state_dict", "gen_model", "ema", "safetensors"])
def test_checkpoint_layouts_load(tiny, tmp_path, layout):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    if layout == "safetensors":
        path = tmp_path / "wfvae.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "wfvae.ckpt"
        torch.save(_layouts(state)[layout], path)
    loaded = WFVAE.from_upstream(tiny_wfvae_config(), checkpoint=path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = _video()
    torch.testing.assert_close(loaded.encode(x), tiny.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.latent_scale, torch.tensor(LATENT_SCALE))


def test_checkpoint_is_strict(tiny):
    state = dict(tiny.state_dict())
    missing = dict(state)
    del missing["decoder.up1.1.conv.conv.weight"]
    with pytest.raises(ValueError, match=r"missing \['decoder.up1.1.conv.conv.weight'\]"):
        WFVAE.from_upstream(tiny_wfvae_config(), checkpoint=missing)
    with pytest.raises(ValueError, match=r"unexpected \['decoder.extra.weight'\]"):
        WFVAE.from_upstream(tiny_wfvae_config(), checkpoint={**state, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="encoder.conv_out.conv.bias.*expected"):
        WFVAE.from_upstream(tiny_wfvae_config(), checkpoint={**state, "encoder.conv_out.conv.bias": torch.zeros(3)})


# ------------------------------------------------------------------ API


def test_frozen_eval_and_shapes(tiny):
    assert not tiny.training
    assert all(not p.requires_grad for p in tiny.parameters())
    assert tiny.vae_scale_factor == (8, 8, 8)
    assert tiny.latent_size(121, 576, 1024) == (16, 72, 128)
    z = tiny.encode(_video(17, 24))
    assert z.shape == (1, 32, 3, 3, 3) and z.dtype == torch.float32
    assert tiny.decode(z).shape == (1, 3, 17, 24, 24)


def test_normalisation_and_sampling(tiny):
    x = _video()
    tiny.use_tiling = False
    mean, logvar = tiny.encoder(x).chunk(2, dim=1)
    scale = torch.tensor(LATENT_SCALE).view(1, -1, 1, 1, 1)
    shift = torch.tensor(LATENT_SHIFT).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(tiny.encode(x), (mean - shift) * scale)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(mean.shape, generator=g)
    sample = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise - shift) * scale
    torch.testing.assert_close(sample, expected)
    # decode de-normalises: feeding the raw mean through the decoder gives the same video
    torch.testing.assert_close(tiny.decode(tiny.encode(x)), tiny.decoder(mean), rtol=0, atol=1e-5)
    tiny.use_tiling = True


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_runs_in_its_own_dtype(dtype):
    torch.manual_seed(0)
    vae = WFVAE.from_upstream({**tiny_wfvae_config(), "dtype": dtype})
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert vae.dtype == want and vae.latent_scale.dtype == want
    z = vae.encode(_video())  # fp32 input, cast inside
    assert z.dtype == want
    y = vae.decode(z.float())  # e.g. latents from an fp32 sampler
    assert y.dtype == want and bool(torch.isfinite(y).all())


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 8, 16, 16), r"8n\+1 \(1, 9, 17, 25, \.\.\.\), got T=8"),
        ((1, 3, 10, 16, 16), "got T=10"),
        ((1, 3, 9, 12, 16), "H must be a positive multiple of 8.*got H=12"),
        ((1, 3, 9, 16, 20), "got W=20"),
        ((1, 4, 9, 16, 16), "must have 3 channels.*got 4"),
        ((3, 9, 16, 16), "5-D tensor"),
    ],
)
def test_encode_rejects_bad_video(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.zeros(shape))


def test_rejects_non_finite_and_bad_latents(tiny):
    x = _video()
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        tiny.encode(x)
    with pytest.raises(ValueError, match="must have 32 channels.*got 16"):
        tiny.decode(torch.zeros(1, 16, 2, 2, 2))
    z = torch.zeros(1, 32, 2, 2, 2)
    z[..., 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        tiny.decode(z)
    with pytest.raises(ValueError, match="floating point"):
        tiny.encode(torch.zeros(1, 3, 9, 16, 16, dtype=torch.int64))
