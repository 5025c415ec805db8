"""Real decoding of generated mp4s, fps resampling against real frames, transforms, images (§8.3)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mm.data.config import DataConfig
from mm.data.dataset import VideoTextDataset
from mm.data.decode import read_image, read_video, resolve_video_backend
from mm.data.errors import SampleError
from mm.data.index import build_index
from mm.data.synthetic import BACKGROUND, COLORS, main as synthetic_main, write_mp4
from mm.data.transforms import ae_norm, center_crop_box, center_crop_resize

CFG = DataConfig(num_frames=17, min_num_frames=9, max_height=32, max_width=32, enable_text_preprocess=False,
                 batch_size=2, num_workers=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert synthetic_main(["--out", str(out), "--num", "6", "--frames", "17", "--height", "48",
                           "--width", "64", "--seed", "3"]) == 0
    return out


def test_synthetic_files(synth):
    ann = json.loads((synth / "annotation.json").read_text())
    assert (synth / "data.txt").read_text().strip() == ".,annotation.json"
    assert len(ann) == 6 and {a["color"] for a in ann} == set(COLORS)  # first clips cover every colour
    for a in ann:
        assert a["cap"][0] == f"a {a['color']} {a['shape']} moving {a['direction']}"
        assert a["resolution"] == {"height": 48, "width": 64} and a["num_frames"] == 17 and a["fps"] == 24


def test_decode_frame_count_size_and_colour(synth):
    ann = json.loads((synth / "annotation.json").read_text())
    frames = read_video(str(synth / ann[0]["path"]), list(range(17)))
    assert frames.shape == (17, 48, 64, 3) and frames.dtype == torch.uint8
    px = frames[0].reshape(-1, 3).float()
    fg = px[(px - torch.tensor(BACKGROUND, dtype=torch.float32)).abs().sum(1) > 60]
    assert len(fg) > 0.1 * len(px)  # a large shape
    assert torch.allclose(fg.median(0).values, torch.tensor(COLORS[ann[0]["color"]], dtype=torch.float32), atol=25)
    with pytest.raises(SampleError, match="too_few_frames"):
        read_video(str(synth / ann[0]["path"]), [0, 17])


def test_synthetic_is_deterministic(tmp_path, synth):
    synthetic_main(["--out", str(tmp_path), "--num", "2", "--frames", "17", "--height", "48", "--width", "64",
                    "--seed", "3"])
    assert (tmp_path / "videos/clip_00001.mp4").read_bytes() == (synth / "videos/clip_00001.mp4").read_bytes()


def test_fps_resampling_reads_the_right_frames(tmp_path):
    # 60 fps clip whose frame t has grey level 4t: resampled to 24 fps = frames round(2.5 i)
    t = np.arange(40, dtype=np.uint8)[:, None, None, None] * 4
    write_mp4(str(tmp_path / "ramp.mp4"), np.broadcast_to(t, (40, 32, 32, 3)).copy(), fps=60)
    ann = [{"path": "ramp.mp4", "cap": "ramp", "resolution": {"height": 32, "width": 32}, "num_frames": 40,
            "fps": 60}]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "data.txt").write_text(".,a.json\n")
    cfg = CFG.replace(data_path=str(tmp_path / "data.txt"), drop_short_ratio=0.0, cfg=0.0)
    index = build_index(cfg)
    e = index.entries[0]
    assert e.num_frames == 9 and e.num_candidates == 16  # 16 resampled frames -> largest 8n+1 <= 16 is 9
    ds = VideoTextDataset(index, cfg)
    sample = ds[0]
    grey = ((sample["video"][0, :, 16, 16] + 1) / 2 * 255).numpy()  # [T]
    steps = np.round(np.diff(grey) / 4)
    assert set(steps.tolist()) <= {2.0, 3.0} and steps.sum() in (20, 21)  # 8 steps of 2.5 frames


def test_transforms():
    box = center_crop_box(100, 300, 32, 32)
    assert box == (0, 100, 100, 100)
    x = torch.rand(3, 3, 48, 96)  # [T, C, H, W]
    y = center_crop_resize(x, (32, 48))
    assert y.shape == (3, 3, 32, 48)
    torch.testing.assert_close(center_crop_resize(x, (48, 96)), x)
    z = ae_norm(torch.tensor([-0.1, 0.0, 0.5, 1.2]))
    torch.testing.assert_close(z, torch.tensor([-1.0, -1.0, 0.0, 1.0]))  # clamped (§12.27)


def test_dataset_sample_shapes_and_range(synth):
    cfg = CFG.replace(data_path=str(synth / "data.txt"), cfg=0.0)
    ds = VideoTextDataset(build_index(cfg), cfg)
    s = ds[1]
    assert s["video"].shape == (3, 17, 32, 32) and s["video"].dtype == torch.float32
    assert s["video"].min() >= -1 and s["video"].max() <= 1 and s["video"].min() < -0.8
    assert s["caption"].startswith("a ") and s["skipped"] == [] and s["sample_index"] == 1
    torch.testing.assert_close(ds[1]["video"], s["video"])  # deterministic


def test_crop_and_images(tmp_path):
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 40:] = 200  # right half bright
    Image.fromarray(img).save(tmp_path / "half.png")
    Image.fromarray(img).save(tmp_path / "half.jpg")
    ann = [{"path": "half.png", "cap": "c", "resolution": {"height": 40, "width": 80}, "crop": [40, 80, 0, 40]},
           {"path": "half.jpg", "cap": "c", "resolution": {"height": 40, "width": 80}}]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "data.txt").write_text(".,a.json\n")
    cfg = CFG.replace(data_path=str(tmp_path / "data.txt"), max_height=16, max_width=32, min_hxw=16 * 16,
                      min_h_div_w_ratio=0.3)
    index = build_index(cfg)
    assert [e.shape_key for e in index.entries] == ["1x16x32", "1x16x32"]
    assert index.entries[0].crop == (40, 80, 0, 40)
    ds = VideoTextDataset(index, cfg)
    cropped = ds[0]["video"]
    assert cropped.shape == (3, 1, 16, 32) and cropped.min() > 0.5  # only the bright half is left
    full = ds[1]["video"]
    assert full[:, :, :, :12].max() < -0.9 and full[:, :, :, 20:].min() > 0.4
    assert read_image(str(tmp_path / "half.png")).shape == (1, 40, 80, 3)


def test_reader_backend_selection():
    assert resolve_video_backend("pyav") == "pyav"
    assert resolve_video_backend("auto") in ("pyav", "decord")
    with pytest.raises(ValueError, match="video_reader_type"):
        resolve_video_backend("opencv")
