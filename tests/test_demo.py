"""`make demo` shortened (a few steps of every phase), end to end, as CI runs it."""

import json
import os
import subprocess
import sys

import pytest

from tiny_workspace import ROOT


@pytest.mark.timeout(900)
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, MM_BACKEND="cpu")
    r = subprocess.run([sys.executable, "-m", "mm.demo", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for phase in ("[1/7]", "[2/7]", "[3/7]", "[4/7]", "[5/7]", "[6/7]", "[7/7]"):
        assert phase in r.stdout
    assert "colour agreement:" in r.stdout
    assert "I2V: frame-0 PSNR" in r.stdout
    i2v = json.loads((out / "i2v_metrics.json").read_text())
    assert len(i2v["clips"]) == 2 and i2v["psnr_frame0"] > 0 and 0.0 <= i2v["colour_agreement"] <= 1.0
    clips = sorted(p.name for p in (out / "samples").glob("*.mp4") if p.name != "video_grid.mp4")
    assert (out / "samples" / "video_grid.mp4").exists()  # the run's grid of every sample
    assert len(clips) == 2 and all((out / "samples" / c).with_suffix(".json").exists() for c in clips)
    score = json.loads((out / "colour_agreement.json").read_text())["score"]
    assert 0.0 <= score <= 1.0
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "Colour agreement" in summary and "| total |" in summary
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
