"""Inspect a dataset: how many samples the configured filters keep, why the others are dropped, and the
bucket shapes (spec §8.2).

``python -m mm.data.inspect --data data.json|data.txt [--num-frames N --height H --width W ...]``

With a ``data.json`` the filters come from it (the overrides still apply); with a bare ``data.txt`` the
released v1.5 defaults are used (121 frames, 576x1024), so pass the overrides for small data. Nothing is
decoded: only the annotations are read. Exit code 0 when the index was built (even if it is empty), 2 on
bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mm.data.config import load_data_config
from mm.data.index import build_index

_OVERRIDES = {
    "num_frames": int, "min_num_frames": int, "max_height": int, "max_width": int, "max_hxw": int,
    "min_hxw": int, "train_fps": float, "speed_factor": float, "hw_stride": int,
    "min_samples_per_shape": int,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data.json (upstream format) or data.txt")
    for name, typ in _OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"override {name}")
    p.add_argument("--height", type=int, default=None, help="alias of --max-height")
    p.add_argument("--width", type=int, default=None, help="alias of --max-width")
    p.add_argument("--multi-resolution", action="store_true", help="force_resolution=false")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(a, k) for k in _OVERRIDES if getattr(a, k) is not None}
    if a.height is not None:
        overrides["max_height"] = a.height
    if a.width is not None:
        overrides["max_width"] = a.width
    if a.multi_resolution:
        overrides["force_resolution"] = False
    if "num_frames" in overrides and "min_num_frames" not in overrides:
        overrides["min_num_frames"] = min(overrides["num_frames"], 29)
    if ("max_height" in overrides or "max_width" in overrides) and "max_hxw" not in overrides:
        overrides["max_hxw"] = overrides.get("max_height", 576) * overrides.get("max_width", 1024)
        overrides.setdefault("min_hxw", overrides["max_hxw"] if not a.multi_resolution else 0)
    try:
        cfg = load_data_config(a.data, **overrides)
        index = build_index(cfg)
    except ValueError as e:
        p.error(str(e))
    mode = "fixed" if cfg.force_resolution else ("5-ratio" if cfg.force_5_ratio else "multi-resolution")
    print(f"data: {cfg.data_path}")
    print(f"filters: {cfg.num_frames} frames (min {cfg.min_num_frames}) at {cfg.train_fps:g} fps, "
          f"{mode} {cfg.max_height}x{cfg.max_width}, hxw in [{cfg.min_hxw}, {cfg.max_hxw}], "
          f"h/w in [{cfg.min_h_div_w_ratio:g}, {cfg.max_h_div_w_ratio:g}]")
    print(index.summary())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
