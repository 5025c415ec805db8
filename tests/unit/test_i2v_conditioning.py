"""I2V conditioning: zero-initialised widening == the T2V model, mask/latent layout for T = 1, 9, 17 in both modes,
consistency with the causal WFVAE (latent frame 0 encodes frame 0 alone), config errors."""

from __future__ import annotations

import pytest
import torch

from mm.models.conditioning import (
    I2VConditioning,
    conditioning_channels,
    draw_modes,
    fold_mask,
    latent_mask,
    pixel_frame_mask,
    widen_patch_embed,
)
from mm.models.sparse_ummdit import SparseUMMDiT
from mm.models.suv_config import SUVConfig
from mm.models.wfvae import WFVAE, tiny_wfvae_config
from tests.suv_testing import random_inputs, random_state_dict, tiny_config

FT = 8


def i2v_config(**overrides) -> SUVConfig:
    return tiny_config(conditioning={"type": "i2v", "mask_channels": FT}, **overrides)


def t2v_to_i2v(state: dict, cfg: SUVConfig) -> dict:
    return {**state, "patch_embed.proj.weight": widen_patch_embed(state["patch_embed.proj.weight"], cfg.conditioning)}


def test_zero_init_i2v_equals_t2v():
    torch.manual_seed(0)
    t2v = SparseUMMDiT(tiny_config()).eval()
    state = random_state_dict(t2v, seed=3)
    t2v.load_state_dict(state)
    cfg = i2v_config()
    i2v = SparseUMMDiT(cfg).eval()
    i2v.load_state_dict(t2v_to_i2v(state, cfg))
    latents, t, text, text_mask, pooled, vmask = random_inputs(t2v.suv_config, T=3)
    B, C, T, H, W = latents.shape
    cond = conditioning_channels(torch.randn(B, C, T, H, W), latent_mask(["first", "transition"], 17, FT))
    with torch.no_grad():
        ref = t2v(latents, t, text, text_mask, pooled, vmask)
        out = i2v(torch.cat([latents, cond], 1), t, text, text_mask, pooled, vmask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # the conditioning channels are trainable: a nonzero weight there changes the output
    with torch.no_grad():
        i2v.patch_embed.proj.weight[:, C:] = 0.1
        changed = i2v(torch.cat([latents, cond], 1), t, text, text_mask, pooled, vmask)
    assert (changed - ref).abs().max() > 1e-3


def test_config_round_trip_and_errors():
    cfg = i2v_config()
    assert cfg.patch_in_channels == 2 * 4 + FT
    assert SUVConfig.from_upstream(cfg.to_upstream()) == cfg
    assert "conditioning" not in tiny_config().to_upstream()
    with pytest.raises(ValueError, match="conditioning.type"):
        tiny_config(conditioning={"type": "inpaint"})
    with pytest.raises(ValueError, match="unknown conditioning keys"):
        tiny_config(conditioning={"type": "i2v", "channels": 3})
    with pytest.raises(ValueError, match="sum to"):
        I2VConditioning(rates={"first": 0.5})
    model = SparseUMMDiT(cfg)
    latents, t, text, text_mask, pooled, _ = random_inputs(cfg)
    with pytest.raises(ValueError, match="channels, the model takes 16"):
        model(latents, t, text, text_mask, pooled)
    with pytest.raises(RuntimeError, match="patch_embed.proj.weight"):  # a T2V checkpoint into the I2V layout
        model.load_state_dict(SparseUMMDiT(tiny_config()).state_dict())


@pytest.mark.parametrize("T", [1, 9, 17])
@pytest.mark.parametrize("mode", ["first", "transition"])
def test_masks(T, mode):
    t = 1 + (T - 1) // FT
    if mode == "transition" and T == 1:
        with pytest.raises(ValueError, match="transition conditioning needs"):
            pixel_frame_mask(T, mode, FT)
        return
    pix = pixel_frame_mask(T, mode, FT)
    assert pix.sum() == (1 if mode == "first" else 2) and pix[0] == 1
    m = latent_mask([mode, "none"], T, FT)  # [B, ft, t]
    assert m.shape == (2, FT, t)
    assert m[1].sum() == 0
    assert torch.equal(m[0, :, 0], torch.ones(FT))  # latent 0 = frame 0 repeated (causal first frame)
    if mode == "transition":
        last = torch.zeros(FT)
        last[-1] = 1  # only the last pixel frame of the last latent frame is given
        assert torch.equal(m[0, :, -1], last)
        assert m[0, :, 1:-1].sum() == 0
    else:
        assert m[0, :, 1:].sum() == 0
    # fold is the inverse of reading pixel frame (i-1)*ft+1+s from latent i, channel s
    pix_all = torch.arange(T, dtype=torch.float32)
    folded = fold_mask(pix_all, FT)
    for i in range(1, t):
        assert torch.equal(folded[:, i], torch.arange((i - 1) * FT + 1, i * FT + 1, dtype=torch.float32))
    # conditioning channels keep exactly the given latent frames
    z = torch.randn(2, 4, t, 2, 2)
    ch = conditioning_channels(z, m)
    assert ch.shape == (2, 4 + FT, t, 2, 2)
    kept = [0] if mode == "first" else sorted({0, t - 1})
    for i in range(t):
        torch.testing.assert_close(ch[0, :4, i], z[0, :, i] if i in kept else torch.zeros_like(z[0, :, i]))
    assert ch[1].abs().sum() == 0
    assert torch.equal(ch[0, 4:, :, 1, 1], m[0])


def test_bad_frame_counts():
    with pytest.raises(ValueError, match="1 \\+ 8 \\* k"):
        pixel_frame_mask(10, "first", FT)
    with pytest.raises(ValueError, match="conditioning mode"):
        pixel_frame_mask(9, "last", FT)


def test_first_latent_frame_encodes_frame_zero_alone():
    """Why cutting the clip's latent frame 0 is the image's latent: the causal WFVAE encodes frame 0 alone."""
    torch.manual_seed(0)
    vae = WFVAE.from_upstream(tiny_wfvae_config()).eval()
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        clip = vae.encode(video)
        image = vae.encode(video[:, :, :1])
    assert clip.shape[2] == 2 and image.shape[2] == 1
    torch.testing.assert_close(clip[:, :, :1], image, rtol=1e-5, atol=1e-5)


def test_draw_modes_rates():
    g = torch.Generator().manual_seed(0)
    modes = draw_modes(2000, I2VConditioning(rates={"first": 0.7, "transition": 0.3}).rates, g)
    assert "none" not in modes
    assert abs(modes.count("first") / 2000 - 0.7) < 0.05
    again = draw_modes(2000, I2VConditioning(rates={"first": 0.7, "transition": 0.3}).rates,
                       torch.Generator().manual_seed(0))
    assert modes == again


def test_checkpoint_tools_to_i2v(tmp_path, capsys):
    from checkpoint_tools.cli import main
    from mm.models.sparse_ummdit import load_upstream_checkpoint

    t2v = SparseUMMDiT(tiny_config()).eval()
    state = random_state_dict(t2v, seed=5)
    torch.save(state, tmp_path / "t2v.pt")
    assert main(["to-i2v", "--load", str(tmp_path / "t2v.pt"), "--save", str(tmp_path / "i2v.pt")]) == 0
    cfg = i2v_config()
    converted = load_upstream_checkpoint(tmp_path / "i2v.pt")
    assert converted.keys() == state.keys()
    assert torch.equal(converted["patch_embed.proj.weight"], t2v_to_i2v(state, cfg)["patch_embed.proj.weight"])
    assert all(torch.equal(converted[k], v) for k, v in state.items() if k != "patch_embed.proj.weight")
    i2v = SparseUMMDiT(cfg).eval()
    i2v.load_state_dict(converted)
    # converting an I2V checkpoint again is refused with one error line, exit 2
    assert main(["to-i2v", "--load", str(tmp_path / "i2v.pt"), "--save", str(tmp_path / "again.pt")]) == 2
    assert "already an I2V checkpoint" in capsys.readouterr().err
