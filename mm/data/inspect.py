"""Inspect a dataset: how many samples the configured filters keep, why the others are dropped, and the
bucket shapes (spec §8.2).

``python -m mm.data.inspect --data data.json|data.txt [--num-frames N --height H --width W ...]
[--data-index DIR] [--in-memory]``

With a ``data.json`` the filters come from it (the overrides still apply); with a bare ``data.txt`` the
released v1.5 defaults are used (121 frames, 576x1024), so pass the overrides for small data. Nothing is
decoded: only the annotations are read, through the on-disk index (``mm.data.build_index``: the cached one
of this config, built on first use, or ``--data-index DIR``), so a second run reads only the index
manifest; ``--in-memory`` filters the annotations in this process instead (the reference path).
``--verify`` also opens every file (``mm.data.verify``); the bad ones are recorded in the index's
``bad_samples.jsonl``, so the next use of the index (training included) rebuilds it without them. Exit code
0 when the index was built (even if it is empty), 1 when ``--verify`` found bad files, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mm.data.build_index import add_filter_overrides, config_from_args, open_index
from mm.data.index import build_index
from mm.data.index_store import BAD_SAMPLES, record_bad_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data.json (upstream format) or data.txt")
    p.add_argument("--data-index", default=None, help="index directory (default: the cache of this config)")
    p.add_argument("--workers", type=int, default=None, help="processes if the index must be built")
    p.add_argument("--in-memory", action="store_true", help="filter in this process, without the on-disk index")
    p.add_argument("--verify", action="store_true",
                   help="also open every file (exists, decodes, frame count, size, image vs video) and report "
                        "problems by reason with example paths; exit 1 when any file is bad (mm.data.verify)")
    add_filter_overrides(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.workers is not None and a.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {a.workers}")
        cfg = config_from_args(a)
        index = build_index(cfg) if a.in_memory else open_index(cfg, a.data_index, workers=a.workers,
                                                                 progress=sys.stderr.isatty())
    except ValueError as e:
        p.error(str(e))
    mode = "fixed" if cfg.force_resolution else ("5-ratio" if cfg.force_5_ratio else "multi-resolution")
    print(f"data: {cfg.data_path}")
    print(f"filters: {cfg.num_frames} frames (min {cfg.min_num_frames}) at {cfg.train_fps:g} fps, "
          f"{mode} {cfg.max_height}x{cfg.max_width}, hxw in [{cfg.min_hxw}, {cfg.max_hxw}], "
          f"h/w in [{cfg.min_h_div_w_ratio:g}, {cfg.max_h_div_w_ratio:g}]")
    print(index.summary())
    sys.stdout.flush()
    if a.verify:
        from mm.data.verify import verify_dataset

        report = verify_dataset(cfg.data_path, cfg.video_reader_type, workers=a.workers or 4,
                                progress=sys.stderr.isatty())
        print(report.summary())
        if report.bad_files and not a.in_memory:  # the next open rebuilds the index without them
            n = record_bad_samples(index.dir, report.bad_files)
            print(f"{n} new bad files recorded in {index.dir}/{BAD_SAMPLES}: the next use of the index drops them")
        return 1 if report.num_bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
