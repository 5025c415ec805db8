"""Bad data, visible (issue 13 item 8): ``mm.data.inspect --verify`` opens every file and reports problems
by reason with example paths; in training a bad sample is logged once and counted per reason in every
iteration log line, the JSON log, TensorBoard and the end-of-run summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

from faults_common import KeepLogs, run_config
from harness import run_distributed
from tiny_workspace import make_workspace


def test_inspect_verify_opens_every_file(tmp_path, capsys):
    from PIL import Image

    from mm.data import inspect
    from mm.data.synthetic import write_dataset

    data_txt = write_dataset(str(tmp_path), num=6, frames=9, height=32, width=32, seed=0)
    videos = tmp_path / "videos"
    (videos / "clip_00000.mp4").unlink()  # missing
    whole = (videos / "clip_00001.mp4").read_bytes()
    (videos / "clip_00001.mp4").write_bytes(whole[: len(whole) // 3])  # truncated
    (videos / "clip_00002.mp4").write_bytes(b"")  # zero bytes
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    (videos / "clip_00003.mp4").write_bytes(png.getvalue())  # an image renamed .mp4
    ann = json.loads((tmp_path / "annotation.json").read_text())
    ann[5]["resolution"] = {"height": 48, "width": 32}  # the annotation disagrees with the file
    (tmp_path / "annotation.json").write_text(json.dumps(ann))

    code = inspect.main(["--data", data_txt, "--verify", "--in-memory", "--num-frames", "9", "--height", "32",
                         "--width", "32"])
    out = capsys.readouterr().out
    report = out[out.index("verified"):]
    assert code == 1
    assert "verified 6 records: 1 good, 5 bad" in report
    for reason, clip in (("missing_file", "clip_00000"), ("empty_file", "clip_00002"), ("wrong_kind", "clip_00003"),
                         ("size_mismatch", "clip_00005")):
        line = next(ln for ln in report.splitlines() if ln.strip().startswith(reason + ":"))
        assert clip in line, report
    assert "clip_00001" in report and "clip_00004" not in report


def _train_with_a_bad_clip(rank, world, ws, root):
    from faults_common import trainer

    keep = KeepLogs("mm.data", "mm.train")
    t = trainer(ws, run_config(iters=8, save=root, save_interval=100, gbs=1))  # two epochs of 4 clips
    t.train()
    return keep.lines


def test_bad_sample_logged_once_and_counted_everywhere(tmp_path):
    ws = make_workspace(tmp_path / "ws", num=4, cfg_rate=0.0)
    (Path(ws["data_dir"]) / "videos" / "clip_00001.mp4").write_bytes(b"not a video")
    root = str(tmp_path / "c")
    lines = run_distributed(_train_with_a_bad_clip, 1, args=(ws, root), timeout=240)[0]
    mentions = [ln for ln in lines if "clip_00001" in ln and not ln.startswith("run summary")]
    assert len(mentions) == 1, mentions  # before: logged by the worker and by the loader, every epoch
    iters = [ln for ln in lines if ln.startswith("iteration ")]
    assert len(iters) == 8 and all("| bad samples: " in ln for ln in iters)
    assert "| bad samples: 1 (corrupt_video 1) |" in iters[-1]
    log = [json.loads(ln) for ln in (Path(root) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_samples"] == {"corrupt_video": 1}
    summary = next(ln for ln in lines if ln.startswith("run summary"))
    assert "bad samples replaced: 1 (corrupt_video 1)" in summary and "clip_00001.mp4" in summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(root) / "tensorboard"))
    events.Reload()
    assert events.Scalars("data/bad_samples/corrupt_video")[-1].value == 1
