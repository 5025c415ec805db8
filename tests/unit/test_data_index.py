"""Annotation parsing, every filter decision, fps resampling and frame-count math (spec §8.1, §8.2)."""

import json

import numpy as np
import pytest

from mm.data.annotations import parse_record, read_data_txt
from mm.data.config import DataConfig, load_data_config
from mm.data.frames import frame_step, resample_indices, valid_frame_count, window_start
from mm.data.index import build_index, entry_from_record
from mm.data.resolution import ASPECT_RATIOS_5, nearest_5_ratio, target_size

RELEASED = DataConfig()  # 121 frames, 576x1024, min_hxw = max_hxw = 589824, h/w in [0.42, 1]


def rec(**kw):
    base = {"path": "a.mp4", "cap": "a cat", "resolution": {"height": 720, "width": 1280}, "num_frames": 200,
            "fps": 24}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def decide(raw, cfg=RELEASED):
    r = parse_record(raw, "/root")
    return r if isinstance(r, str) else entry_from_record(r, cfg, (0, 0, 0))


# --- record parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,reason", [
    (rec(cap=None), "missing_caption"),
    (rec(cap=""), "missing_caption"),
    (rec(cap=[]), "missing_caption"),
    (rec(resolution=None), "missing_resolution"),
    (rec(resolution={"height": 0, "width": 10}), "missing_resolution"),
    (rec(path="a.gif"), "unsupported_extension"),
    (rec(path=None), "missing_path"),
    (rec(num_frames=None), "missing_num_frames"),
    (rec(fps=0), "bad_fps"),
    (rec(cut=["x", 3]), "bad_cut"),
    (rec(crop=[0, 2000, 0, 10]), "bad_crop"),
])
def test_record_drop_reasons(raw, reason):
    assert parse_record(raw, "/root") == reason


def test_record_fields():
    r = parse_record(rec(path="v/x.MP4", cap=["one", "two"], cut=[5, 100], crop=[100, 1380, 0, 720],
                         resolution={"height": 720, "width": 1480}, aes=5.1), "/data")
    assert r.path == "/data/v/x.MP4" and r.kind == "video" and r.captions == ("one", "two")
    assert (r.height, r.width, r.start_frame, r.crop, r.aesthetic) == (720, 1280, 5, (100, 1380, 0, 720), 5.1)
    img = parse_record({"path": "p.png", "cap": "c", "resolution": {"height": 9, "width": 16}}, "/d")
    assert img.kind == "image" and img.num_frames == 1  # not only ".jpg" (§12.24)


# --- spatial filters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,expect", [
    (720, 1280, (576, 1024)),          # 9:16, big enough
    (1080, 1080, (576, 1024)),         # square: crop 1080x607... needs >= 589824*1.78 px: 1166400 ok
    (1500, 1000, "aspect_ratio"),      # h/w 1.5 > 1.0
    (400, 1000, "aspect_ratio"),       # h/w 0.4 < 0.42
    (480, 854, "too_small"),           # < min_hxw
    (768, 768, "too_small_for_crop"),  # 589824 px but the 9:16 crop is 768x432 < 576x1024
])
def test_fixed_resolution(h, w, expect):
    assert target_size(h, w, RELEASED) == expect


def test_multi_resolution_min_max_tokens():
    cfg = RELEASED.replace(force_resolution=False, max_hxw=256 * 256, min_hxw=128 * 128, hw_stride=16,
                           max_h_div_w_ratio=2.0, min_h_div_w_ratio=0.3)
    assert target_size(720, 1280, cfg) == (192, 336)      # scaled to <= 65536 px, cut to /16
    assert target_size(200, 200, cfg) == (192, 192)       # no upscale, cut to /16
    assert target_size(100, 300, cfg) == (96, 288)         # small enough: only cut to /16
    assert target_size(100, 120, cfg) == "too_small"        # 12000 px < min_hxw
    assert target_size(135, 125, cfg) == "too_small_after_resize"  # 128x112 after the /16 cut
    h, w = target_size(300, 200, cfg)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 256 * 256


def test_five_ratio_snap():
    cfg = RELEASED.replace(force_resolution=False, force_5_ratio=True, max_h_div_w_ratio=2.0,
                           min_h_div_w_ratio=0.3, min_hxw=0)
    assert target_size(720, 1280, cfg) == (576, 1024)
    assert target_size(1000, 1000, cfg) == (768, 768)
    for h, w in ((1300, 1000), (1000, 1300), (1900, 1000)):
        rh, rw = nearest_5_ratio(h, w)
        assert (rh, rw) in ASPECT_RATIOS_5
        th, tw = target_size(h, w, cfg)
        assert th * rw == tw * rh and th * tw <= cfg.max_hxw and th % 16 == 0
    assert nearest_5_ratio(1900, 1000) == (16, 9)
    assert nearest_5_ratio(1000, 1300) == (3, 4)


# --- temporal filters ----------------------------------------------------------------------------------
def test_fps_resampling_indices():
    assert frame_step(24, 24) == 1.0 and frame_step(24.05, 24) == 1.0
    assert frame_step(48, 24) == 2.0 and frame_step(60, 24) == 2.5 and frame_step(30, 24, speed_factor=2) == 2.5
    np.testing.assert_array_equal(resample_indices(10, 1.0), np.arange(10))
    np.testing.assert_array_equal(resample_indices(10, 2.0, start=3), [3, 5, 7, 9, 11])
    # 60 -> 24 fps: nearest source frame to t = i*2.5 (round half up), not int() truncation (§12.22)
    np.testing.assert_array_equal(resample_indices(11, 2.5), [0, 3, 5, 8, 10])
    # 30 -> 24 fps: every index in range, strictly increasing, spacing 1 or 2
    idx = resample_indices(300, 1.25)
    assert idx[-1] < 300 and np.all(np.diff(idx) >= 1) and set(np.diff(idx)) <= {1, 2}
    assert len(idx) == 240
    # 12 -> 24 fps (upsampling): frames repeat
    np.testing.assert_array_equal(resample_indices(3, 0.5), [0, 1, 1, 2, 2])


def test_frame_count_8n_plus_1():
    assert valid_frame_count(200, 121, 8, 29) == 121
    assert valid_frame_count(100, 121, 8, 29) == 97
    assert valid_frame_count(30, 121, 8, 29) == 0     # 25 < 29
    assert valid_frame_count(33, 121, 8, 29) == 33
    assert valid_frame_count(1, 1, 8, 1) == 1


def test_window_start_covers_last_window():
    rng = np.random.default_rng(0)
    starts = {window_start(10, 8, rng) for _ in range(200)}
    assert starts == {0, 1, 2}  # the last window (start 2) is reachable (§12.21)


@pytest.mark.parametrize("raw,reason", [
    (rec(num_frames=5 * 121 + 1), "too_long"),
    (rec(fps=12), "fps_too_low"),
    (rec(num_frames=100), "too_short"),                 # drop_short_ratio 1.0
    (rec(num_frames=130, fps=60), "too_short"),         # 52 resampled frames < 121
])
def test_temporal_drop_reasons(raw, reason):
    assert decide(raw) == reason


def test_kept_video_entry():
    e = decide(rec(num_frames=300, fps=30, cut=[10, 310]))
    assert e.shape_key == "121x576x1024" and e.num_candidates == 240
    cand = e.candidate_indices()
    assert cand[0] == 10 and cand[-1] < 310 and len(cand) == 240
    # dynamic frame counts when short clips are kept
    short = decide(rec(num_frames=100), RELEASED.replace(drop_short_ratio=0.0))
    assert short.num_frames == 97
    up = decide(rec(fps=12, num_frames=100), RELEASED.replace(allow_fps_upsampling=True))
    assert up.num_frames == 121 and up.frame_step == 0.5


def test_image_entry():
    e = decide({"path": "x.jpg", "cap": "c", "resolution": {"height": 720, "width": 1280}})
    assert e.kind == "image" and e.shape_key == "1x576x1024"
    assert decide({"path": "x.jpg", "cap": "c", "resolution": {"height": 72, "width": 128}}) == "too_small"


# --- files ----------------------------------------------------------------------------------------------
def test_build_index_counts_and_relative_roots(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    records = [rec(path=f"v{i}.mp4") for i in range(5)] + [rec(cap=None), rec(num_frames=50),
                                                             rec(path="i.jpg", num_frames=None)]
    (ds / "ann.json").write_text(json.dumps(records))
    (tmp_path / "data.txt").write_text("# comment\nds,ds/ann.json\n\n")
    index = build_index(RELEASED.replace(data_path=str(tmp_path / "data.txt")))
    assert len(index) == 6 and index.num_records == 8
    assert dict(index.dropped) == {"missing_caption": 1, "too_short": 1}
    assert index.shape_counts() == {"121x576x1024": 5, "1x576x1024": 1}
    assert index.entries[0].path == str(ds / "v0.mp4")  # root relative to the data.txt directory
    rare = build_index(RELEASED.replace(data_path=str(tmp_path / "data.txt"), min_samples_per_shape=2))
    assert rare.dropped["shape_too_rare"] == 1 and len(rare) == 5
    assert "shape_too_rare: 1" in rare.summary()


def test_data_txt_errors(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("only_one_field\n")
    with pytest.raises(ValueError, match="root_folder"):
        read_data_txt(bad)
    with pytest.raises(ValueError, match="not found"):
        read_data_txt(tmp_path / "missing.txt")
    abs_line = tmp_path / "abs.txt"
    abs_line.write_text("/abs/root,/abs/ann.json\n")
    assert read_data_txt(abs_line)[0].root == "/abs/root"


# --- config -------------------------------------------------------------------------------------------
def test_released_data_json():
    cfg = load_data_config("examples/opensoraplan1.5/data.json")
    assert cfg.num_frames == 121 and (cfg.max_height, cfg.max_width) == (576, 1024)
    assert cfg.min_hxw == cfg.max_hxw == 589824 and cfg.gradient_accumulation_size == 4
    assert cfg.data_path.endswith("examples/opensoraplan1.5/data.txt")  # relative to the JSON directory
    assert cfg.tokenizer_path == "pretrained/t5-v1_1-xl"  # not on disk: kept verbatim
    tiny = load_data_config("examples/tiny/data.json")
    assert tiny.tokenizer_path.endswith("/data/tiny/text_encoders/t5")  # "../" entries always resolve
    assert tiny.data_path.endswith("/data/tiny/data.txt") and not tiny.data_path.startswith("..")
    assert cfg.cfg == 0.1 and cfg.enable_text_preprocess and cfg.patch_size == 2


@pytest.mark.parametrize("kw,field", [
    ({"num_frames": 120}, "num_frames"),
    ({"cfg": 1.5}, "cfg"),
    ({"drop_short_ratio": -0.1}, "drop_short_ratio"),
    ({"batch_size": 0}, "batch_size"),
    ({"video_reader_type": "opencv"}, "video_reader_type"),
    ({"data_storage_mode": "separate"}, "data_storage_mode"),
    ({"min_num_frames": 200}, "min_num_frames"),
    ({"group_data": False}, "group_data"),
    ({"max_height": 500}, "max_height"),
    ({"train_pipeline": ({"trans_type": "Flip"},)}, "trans_type"),
    ({"load_video_features": True}, "feature_dir"),
])
def test_config_errors_name_field(kw, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kw)


def test_upstream_json_errors(tmp_path):
    doc = json.load(open("examples/opensoraplan1.5/data.json"))
    doc["dataset_param"]["preprocess_parameters"]["num_frames"] = 33
    with pytest.raises(ValueError, match="num_frames"):
        DataConfig.from_upstream(doc)
    doc["dataloader_param"]["collate_param"]["num_frames"] = 33
    doc["dataset_param"]["preprocess_parameters"]["train_pipeline"]["video"][1]["param"]["size"] = [64, 64]
    with pytest.raises(ValueError, match="CenterCropResizeVideo size"):
        DataConfig.from_upstream(doc)
    with pytest.raises(ValueError, match="dataset_param"):
        DataConfig.from_upstream({"x": 1})
