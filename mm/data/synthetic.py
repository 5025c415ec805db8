"""Synthetic text-to-video dataset: moving coloured shapes, real H.264 mp4 files (used by tests and the demo).

``python -m mm.data.synthetic --out DIR --num N [--frames F --height H --width W --fps FPS --seed S]``

Each clip shows one large shape (square, circle or triangle) of one saturated colour on a plain dark
background, moving left, right, up or down; its captions say exactly that ("a red square moving right").
Colour is the dominant visual factor on purpose (a tiny model trained on this data must learn it).
Writes ``DIR/videos/clip_XXXXX.mp4``, ``DIR/annotation.json`` (upstream record format, §8.1) and
``DIR/data.txt`` containing ``.,annotation.json`` — relative entries in a data.txt resolve against the
data.txt's own directory, so the dataset works from any working directory and can be moved.
Unless ``--no-encoders``, it also writes the tiny frozen models ``examples/tiny`` loads (so nothing is
downloaded): T5 + CLIP text encoders (tokenizers learned from the captions) under
``DIR/text_encoders/{t5,clip}`` and a tiny WFVAE at ``DIR/wfvae/wfvae_tiny.ckpt``.
Output is deterministic for a given ``--seed`` and arguments.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

logger = logging.getLogger(__name__)

COLORS = {
    "red": (225, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 35),
    "purple": (160, 50, 220),
    "orange": (245, 140, 20),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
BACKGROUND = (18, 18, 22)


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    direction: str

    @property
    def captions(self) -> list[str]:
        base = f"a {self.color} {self.shape} moving {self.direction}"
        return [base, f"{base} on a dark background"]


def shape_mask(shape: str, height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean ``[H, W]`` mask of a shape of half-size ``r`` centred at ``(cx, cy)``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render_clip(spec: ClipSpec, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: the shape travels ~40% of the frame along its direction."""
    r = 0.25 * min(height, width)
    ux, uy = DIRECTIONS[spec.direction]
    travel = 0.4 * (width if ux else height)
    jitter = rng.uniform(-0.05, 0.05, size=2) * np.array([width, height])
    cx0 = width / 2 - ux * travel / 2 + jitter[0] * (ux == 0)
    cy0 = height / 2 - uy * travel / 2 + jitter[1] * (uy == 0)
    color = np.array(COLORS[spec.color], dtype=np.uint8)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    out[:] = np.array(BACKGROUND, dtype=np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        m = shape_mask(spec.shape, height, width, cx0 + ux * travel * a, cy0 + uy * travel * a, r)
        out[t][m] = color
    return out


def write_mp4(path: str, frames_THWC: np.ndarray, fps: int) -> None:
    """H.264 (yuv420p, near-lossless CRF, one thread for reproducible bytes)."""
    import av

    t, h, w, _ = frames_THWC.shape
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10", "preset": "medium", "threads": "1"}
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip_specs(num: int, rng: np.random.Generator) -> list[ClipSpec]:
    """``num`` specs cycling through a shuffled list of all combinations, colours spread evenly."""
    combos = [ClipSpec(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]
    combos = [combos[i] for i in rng.permutation(len(combos))]
    # interleave by colour so that the first len(COLORS) clips already cover every colour
    by_color = {c: [x for x in combos if x.color == c] for c in COLORS}
    interleaved = [x for group in itertools.zip_longest(*by_color.values()) for x in group if x is not None]
    return [interleaved[i % len(interleaved)] for i in range(num)]


def write_dataset(out: str, num: int = 16, frames: int = 17, height: int = 64, width: int = 64,
                  fps: int = 24, seed: int = 0) -> str:
    """Write the dataset; returns the path of its data.txt."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"--height/--width must be even and >= 16 (H.264 yuv420p), got {height}x{width}")
    if fps < 1:
        raise ValueError(f"--fps must be >= 1, got {fps}")
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, spec in enumerate(clip_specs(num, rng)):
        rel = f"videos/clip_{i:05d}.mp4"
        write_mp4(os.path.join(out, rel), render_clip(spec, frames, height, width, rng), fps)
        records.append({
            "path": rel, "cap": spec.captions, "resolution": {"height": height, "width": width},
            "num_frames": frames, "fps": fps, "color": spec.color, "shape": spec.shape,
            "direction": spec.direction,
        })
    with open(os.path.join(out, "annotation.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    data_txt = os.path.join(out, "data.txt")
    with open(data_txt, "w", encoding="utf-8") as f:
        f.write(".,annotation.json\n")
    logger.info("wrote %d clips (%d frames, %dx%d, %d fps) to %s", num, frames, height, width, fps, out)
    return data_txt


def caption_corpus() -> list[str]:
    """Every caption the generator can write, plus the prompt/negative-prompt templates of inference."""
    corpus = []
    for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS):
        corpus += ClipSpec(c, s, d).captions
    corpus.append("high quality, worst quality, normal quality, low quality, low res, blurry, artifacts, grainy, "
                  "watermark, banner, cropped, out of frame, out of focus, bad anatomy, bad proportions, deformed, "
                  "disconnected limbs, disfigured, username, error, sketch, duplicate, ugly, monochrome, horror, "
                  "geometry, mutation, disgusting, overexposed, underexposed.")
    return corpus


def write_tiny_encoders(out: str, seed: int = 0) -> str:
    """The frozen models the tiny preset loads instead of the released ones (no downloads), all real and
    loadable through the same paths as released weights, with seeded random weights:

    * ``out/text_encoders/{t5,clip}``: tiny T5 / CLIP, tokenizers learned from the captions;
    * ``out/wfvae/wfvae_tiny.ckpt``: a tiny WFVAE (``tiny_wfvae_config``), to be fitted to the data with
      ``python -m mm.training.vae_fit`` for meaningful reconstructions (``make demo`` does).
    """
    import torch

    from mm.models.tiny_text_encoders import write_tiny_clip, write_tiny_t5
    from mm.models.wfvae import WFVAE, tiny_wfvae_config

    root = os.path.join(out, "text_encoders")
    write_tiny_t5(os.path.join(root, "t5"), caption_corpus(), seed=seed)
    write_tiny_clip(os.path.join(root, "clip"), caption_corpus(), seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = WFVAE.from_upstream(tiny_wfvae_config())
    os.makedirs(os.path.join(out, "wfvae"), exist_ok=True)
    torch.save(vae.state_dict(), os.path.join(out, "wfvae", "wfvae_tiny.ckpt"))
    logger.info("wrote tiny T5 and CLIP text encoders to %s and a tiny WFVAE to %s/wfvae", root, out)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--num", type=int, default=16, help="number of clips (default 16)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    p.add_argument("--height", type=int, default=64, help="frame height, even (default 64)")
    p.add_argument("--width", type=int, default=64, help="frame width, even (default 64)")
    p.add_argument("--fps", type=int, default=24, help="frames per second (default 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-encoders", action="store_true",
                   help="do not write the tiny T5/CLIP (OUT/text_encoders) and WFVAE (OUT/wfvae) that the tiny "
                        "preset loads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = write_dataset(a.out, a.num, a.frames, a.height, a.width, a.fps, a.seed)
    except ValueError as e:
        p.error(str(e))
    if not a.no_encoders:
        write_tiny_encoders(a.out, a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
