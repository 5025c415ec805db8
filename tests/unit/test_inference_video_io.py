"""uint8 conversion (rounding, spec §12.31), mp4/png writing and reading back, sidecars, completeness."""

import json

import numpy as np
import pytest
import torch

from mm.inference import video_io as V


def test_uint8_rounds_and_clamps():
    # (x/2 + 0.5) * 255 = 127.6 -> 128 (truncation would give 127)
    x = torch.tensor([-2.0, -1.0, 127.6 / 127.5 - 1.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    out = V.to_uint8(x)
    assert out.shape == (1, 5, 1, 1, 3) and out.dtype == torch.uint8
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_uint8_layout():
    x = torch.zeros(2, 3, 4, 6, 8)
    x[:, 1] = 1.0  # green channel
    out = V.to_uint8(x)
    assert out.shape == (2, 4, 6, 8, 3)
    assert out[..., 1].eq(255).all() and out[..., 0].eq(128).all()


def _frames(t, h, w):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(40, 200, (1, h // 8, w // 8, 3), generator=g, dtype=torch.uint8)
    big = base.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky: survives H.264 almost exactly
    return torch.cat([big + i for i in range(t)]).to(torch.uint8)


def test_mp4_roundtrip_frames_size_fps(tmp_path):
    frames = _frames(9, 32, 48)
    path = V.write_sample(tmp_path / "0000_x", frames, fps=12)
    assert path.name == "0000_x.mp4"
    decoded, fps = V.read_video(path)
    assert decoded.shape == (9, 32, 48, 3) and fps == 12
    assert np.abs(decoded.astype(int) - frames.numpy().astype(int)).mean() < 6  # yuv420p + crf 18
    assert [p.name for p in tmp_path.iterdir()] == ["0000_x.mp4"]  # no temporary file left


def test_single_frame_is_png(tmp_path):
    frames = _frames(1, 16, 16)
    path = V.write_sample(tmp_path / "0001_y", frames, fps=24)
    assert path.name == "0001_y.png"
    decoded, _ = V.read_video(path)
    assert np.array_equal(decoded, frames.numpy())  # lossless


def test_bad_frames_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        V.write_mp4(tmp_path / "a.mp4", torch.zeros(2, 15, 16, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        V.write_mp4(tmp_path / "a.mp4", torch.zeros(2, 16, 16, 3), 8)
    with pytest.raises(ValueError, match="fps"):
        V.write_mp4(tmp_path / "a.mp4", torch.zeros(2, 16, 16, 3, dtype=torch.uint8), 0)


def test_complete_needs_media_and_sidecar(tmp_path):
    stem = tmp_path / "0002_z"
    assert not V.is_complete(stem, 9)
    V.write_sample(stem, _frames(9, 16, 16), fps=8)
    assert not V.is_complete(stem, 9)
    V.write_json(V.sidecar_path(stem), {"seed": 3})
    assert V.is_complete(stem, 9) and not V.is_complete(stem, 1)  # T=1 would need the png
    assert json.loads(V.sidecar_path(stem).read_text()) == {"seed": 3}
