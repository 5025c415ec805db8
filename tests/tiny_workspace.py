"""A tiny, real training/inference workspace in a temp dir: synthetic mp4 clips + tiny T5/CLIP, and
copies of the examples/tiny JSONs pointing at them (optionally smaller clips for speed)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(tmp: str | os.PathLike, *, num: int = 4, frames: int = 9, size: int = 32, cfg_rate: float = 0.1,
                   text_len: int = 16) -> dict[str, str]:
    from mm.data.synthetic import write_dataset, write_tiny_encoders
    from mm.presets import write_tiny_configs

    tmp = Path(tmp)
    data = tmp / "data"
    write_dataset(str(data), num=num, frames=frames, height=size, width=size, seed=0)
    write_tiny_encoders(str(data))
    paths = write_tiny_configs(tmp, data, frames=frames, size=size, text_len=text_len, cfg_rate=cfg_rate)
    return {k: str(v) for k, v in paths.items()} | {"root": str(tmp), "data_dir": str(data)}
