"""Colour agreement of generated clips with their prompts (the demo's measure of "did it learn?").

For a prompt such as "a red square moving right", the clip should be dominated by the prompted colour in
the region the shape occupies. Per clip: pixels clearly brighter than the dark synthetic background
(max channel >= ``min_brightness``) form the shape region; their mean RGB is matched to the nearest colour
of the synthetic palette (``mm.data.synthetic.COLORS``); the clip agrees if that is the prompted colour.
A clip with too few shape pixels (< ``min_fraction`` of all pixels) counts as a disagreement. The score is
the fraction of agreeing clips over all prompts that name a palette colour (chance = 1 / palette size).

    python -m mm.inference.colour_agreement SAMPLES_DIR     # reads the *.json sidecars + videos/PNGs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from mm.data.synthetic import COLORS


def prompted_colour(prompt: str) -> str | None:
    words = re.findall(r"[a-z]+", prompt.lower())
    found = [c for c in COLORS if c in words]
    return found[0] if len(found) == 1 else None


def dominant_colour(video_THWC: np.ndarray, min_brightness: int = 70, min_fraction: float = 0.01) -> str | None:
    """Palette colour nearest to the mean of the bright (shape) pixels, or None if there are too few."""
    px = video_THWC.reshape(-1, 3).astype(np.float32)
    shape = px[px.max(axis=1) >= min_brightness]
    if len(shape) < min_fraction * len(px):
        return None
    mean = shape.mean(axis=0)
    names = list(COLORS)
    dist = [np.linalg.norm(mean - np.asarray(COLORS[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(dist))]


def read_frames(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))[None]
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def colour_agreement(samples_dir: str | Path) -> tuple[float, list[dict]]:
    """(score, per-clip rows) over the sidecar JSONs in ``samples_dir`` whose prompt names one colour."""
    rows = []
    for sidecar in sorted(Path(samples_dir).glob("*.json")):
        meta = json.loads(sidecar.read_text())
        want = prompted_colour(meta.get("prompt", ""))
        media = [p for p in (sidecar.with_suffix(".mp4"), sidecar.with_suffix(".png")) if p.exists()]
        if want is None or not media:
            continue
        got = dominant_colour(read_frames(media[0]))
        rows.append({"file": media[0].name, "prompt": meta["prompt"], "prompted": want, "found": got,
                     "agree": got == want})
    if not rows:
        raise ValueError(f"no generated clip with a colour prompt and a sidecar JSON in {samples_dir}")
    return sum(r["agree"] for r in rows) / len(rows), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.inference.colour_agreement", description=__doc__.split("\n")[0])
    p.add_argument("samples", help="directory written by inference_sora.py (clips + JSON sidecars)")
    a = p.parse_args(argv)
    try:
        score, rows = colour_agreement(a.samples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{'ok ' if r['agree'] else 'MISS'} {r['prompted']:>7} -> {str(r['found']):>7}  {r['file']}")
    print(f"colour agreement: {score:.2f} over {len(rows)} clips (chance {1 / len(COLORS):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
