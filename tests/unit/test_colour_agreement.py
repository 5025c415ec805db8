import json

import numpy as np
import pytest

from mm.data.synthetic import COLORS, ClipSpec, render_clip, write_mp4
from mm.inference.colour_agreement import colour_agreement, dominant_colour, prompted_colour


def test_prompted_colour():
    assert prompted_colour("a red square moving right") == "red"
    assert prompted_colour("A Blue circle") == "blue"
    assert prompted_colour("a red and blue thing") is None
    assert prompted_colour("a dog") is None


@pytest.mark.parametrize("colour", list(COLORS))
def test_ground_truth_clips_are_recognised(colour):
    clip = render_clip(ClipSpec(colour, "circle", "up"), 5, 32, 32, np.random.default_rng(0))
    assert dominant_colour(clip) == colour


def test_dark_clip_is_no_colour():
    assert dominant_colour(np.full((3, 16, 16, 3), 20, dtype=np.uint8)) is None


def test_agreement_over_a_samples_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i, (want, shown) in enumerate([("red", "red"), ("green", "green"), ("blue", "yellow")]):
        write_mp4(str(tmp_path / f"{i}.mp4"), render_clip(ClipSpec(shown, "square", "left"), 5, 32, 32, rng), 8)
        (tmp_path / f"{i}.json").write_text(json.dumps({"prompt": f"a {want} square moving left"}))
    score, rows = colour_agreement(tmp_path)
    assert score == pytest.approx(2 / 3)
    assert [r["found"] for r in rows] == ["red", "green", "yellow"]
    with pytest.raises(ValueError, match="no generated clip"):
        colour_agreement(tmp_path / "empty")
