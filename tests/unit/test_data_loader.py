"""Dataset + sampler + DataLoader workers: homogeneous batches, tokens, caption drop and cleaning, bad input
skipped / counted / logged, exact resume through the loader, and the inspect CLI (§8.3-§8.5)."""

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from mm.data.config import DataConfig
from mm.data.inspect import main as inspect_main
from mm.data.loader import build_dataloader
from mm.data.synthetic import write_dataset
from mm.models.tiny_text_encoders import write_tiny_clip, write_tiny_t5

CFG = DataConfig(num_frames=17, min_num_frames=9, drop_short_ratio=0.0, max_height=32, max_width=32,
                 enable_text_preprocess=False, batch_size=2, num_workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 clips of 9 frames 32x32 and 4 of 17 frames 32x48: shapes 9x32x32 (8) and 17x32x32 (4) under CFG."""
    root = tmp_path_factory.mktemp("loader")
    write_dataset(str(root / "a"), num=8, frames=9, height=32, width=32, seed=1)
    write_dataset(str(root / "b"), num=4, frames=17, height=32, width=48, seed=2)
    (root / "data.txt").write_text("a,a/annotation.json\nb,b/annotation.json\n")
    return root


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = ["a red square moving right", "a blue circle moving up", "a green triangle moving left"]
    return (AutoTokenizer.from_pretrained(write_tiny_t5(d / "t5", corpus)),
            AutoTokenizer.from_pretrained(write_tiny_clip(d / "clip", corpus)))


def run_epoch(loader):
    return [b for b in loader]


def test_batches_homogeneous_with_workers_and_tokens(data, tokenizers):
    cfg = CFG.replace(data_path=str(data / "data.txt"), cfg=0.0)
    loader = build_dataloader(cfg, rank=0, num_replicas=1, global_batch_size=4, tokenizer=tokenizers[0],
                              tokenizer_2=tokenizers[1], num_workers=2)
    batches = run_epoch(loader)
    assert len(batches) == 12 // 2
    shapes = [tuple(b["video"].shape) for b in batches]
    assert set(shapes) == {(2, 3, 9, 32, 32), (2, 3, 17, 32, 32)}
    for g in range(0, len(batches), 2):  # 2 micro-batches per global batch of 4: one shape
        assert shapes[g] == shapes[g + 1]
    b = batches[0]
    assert b["prompt_ids"].shape == (2, 1, 512) and b["prompt_mask"].shape == (2, 1, 512)
    assert b["prompt_ids_2"].shape == (2, 1, 77) and b["prompt_mask_2"].shape == (2, 1, 77)
    assert b["prompt_ids"].dtype == torch.long and b["prompt_mask"].sum() > 2
    for b in batches:
        assert b["video_mask"].shape == (2, (b["video"].shape[2] - 1) // 8 + 1, 4, 4) and bool(b["video_mask"].all())
    assert "skipped" not in b and b["sample_index"].shape == (2,)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["consumed_samples"] == 0
    seen = sorted(i for b in batches for i in b["sample_index"].tolist())
    assert seen == list(range(12))


def test_caption_drop_and_cleaning(data, tokenizers):
    cfg = CFG.replace(data_path=str(data / "data.txt"), cfg=1.0)
    b = next(iter(build_dataloader(cfg, global_batch_size=2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1])))
    assert b["caption"] == ["", ""]
    assert b["prompt_mask"].sum(-1).flatten().tolist() == [1, 1]  # T5: only </s>
    assert b["prompt_mask_2"].sum(-1).flatten().tolist() == [2, 2]  # CLIP: BOS, EOS
    ann = json.loads((data / "a/annotation.json").read_text())
    ann[0]["cap"] = "A  RED <b>Square</b> moving right http://x.org/a.jpg"
    d2 = data / "clean"
    d2.mkdir(exist_ok=True)
    (d2 / "ann.json").write_text(json.dumps(ann[:1]))
    (d2 / "data.txt").write_text(f"{data / 'a'},ann.json\n")
    cfg = CFG.replace(data_path=str(d2 / "data.txt"), cfg=0.0, enable_text_preprocess=True, batch_size=1)
    b = next(iter(build_dataloader(cfg, global_batch_size=1)))
    assert b["caption"] == ["a red square moving right"]
    cfg = cfg.replace(enable_text_preprocess=False)
    assert next(iter(build_dataloader(cfg, global_batch_size=1)))["caption"] == [ann[0]["cap"]]


def test_cfg_rate_is_applied(data):
    cfg = CFG.replace(data_path=str(data / "data.txt"), cfg=0.5, batch_size=1)
    loader = build_dataloader(cfg, global_batch_size=1)
    caps = [c for _ in range(3) for b in loader for c in b["caption"]]
    assert 0.25 < sum(c == "" for c in caps) / len(caps) < 0.75


def make_bad_copy(data, tmp_path):
    """Copy dataset 'a' and break 4 of its 8 clips in 4 ways, plus an unreadable jpg."""
    root = tmp_path / "bad"
    shutil.copytree(data / "a", root)
    ann = json.loads((root / "annotation.json").read_text())
    (root / ann[0]["path"]).unlink()                                       # missing file
    (root / ann[1]["path"]).write_bytes(b"\x00garbage" * 100)              # corrupt
    raw = (root / ann[2]["path"]).read_bytes()
    (root / ann[2]["path"]).write_bytes(raw[: len(raw) // 2])              # truncated
    ann[3].update(num_frames=17, cut=[5, 22])                              # file has only 9 frames
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    ann.append({"path": "bad.jpg", "cap": "x", "resolution": {"height": 32, "width": 32}})
    ann.append({"path": "good.jpg", "cap": "y", "resolution": {"height": 32, "width": 32}})
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "good.jpg")
    (root / "annotation.json").write_text(json.dumps(ann))
    return root / "data.txt"


def test_bad_input_is_skipped_counted_and_logged(data, tmp_path, caplog):
    data_txt = make_bad_copy(data, tmp_path)
    cfg = CFG.replace(data_path=str(data_txt), cfg=0.0, batch_size=1, num_frames=9)
    loader = build_dataloader(cfg, global_batch_size=2, num_workers=2)
    with caplog.at_level(logging.WARNING):
        batches = run_epoch(loader)
    state = loader.state_dict()
    bad = state["bad_samples"]
    assert set(bad) == {"0", "1", "2", "3", "8"}
    assert (bad["0"], bad["1"], bad["3"], bad["8"]) == ("missing_file", "corrupt_video", "too_few_frames",
                                                        "unreadable_image")
    assert bad["2"] in ("corrupt_video", "too_few_frames")  # truncated: unreadable container or short stream
    # ``skipped`` counts replacement events (a replacement chain may hit a bad sample again)
    assert set(state["skipped"]) == set(bad.values()) and sum(state["skipped"].values()) >= 5
    # every requested bad sample was replaced by a good one of the same shape
    for b in batches:
        for i in b["sample_index"].tolist():
            assert i not in (0, 1, 2, 3, 8)
    assert sum(len(b["sample_index"]) for b in batches) == 10  # 8 videos + 2 images
    log = caplog.text
    assert "missing_file" in log and "corrupt_video" in log and "unreadable_image" in log
    # the next epoch does not re-read known-bad files and replaces them identically
    again = run_epoch(loader)
    assert len(again) == len(batches)
    assert sum(loader.state_dict()["skipped"].values()) > sum(state["skipped"].values())
    assert loader.state_dict()["bad_samples"] == bad


def test_resume_through_loader_is_exact(data):
    cfg = CFG.replace(data_path=str(data / "data.txt"), cfg=0.3)
    full = build_dataloader(cfg, global_batch_size=4)
    ref = run_epoch(full)
    part = build_dataloader(cfg, global_batch_size=4)
    it = iter(part)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))
    resumed = build_dataloader(cfg, global_batch_size=4, num_workers=2)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert len(rest) == len(ref) - 2
    for a, b in zip(rest, ref[2:]):
        assert a["caption"] == b["caption"] and torch.equal(a["sample_index"], b["sample_index"])
        torch.testing.assert_close(a["video"], b["video"])


def test_inspect_cli(data, capsys):
    assert inspect_main(["--data", str(data / "data.txt"), "--num-frames", "9", "--height", "32",
                         "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "kept: 12" in out and "9x32x32: 12" in out
    assert inspect_main(["--data", str(data / "data.txt"), "--num-frames", "17", "--height", "32",
                         "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "kept: 4" in out and "dropped too_short: 8" in out and "17x32x32: 4" in out
