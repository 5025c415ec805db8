"""Dataset index: every annotation record either becomes a ``SampleEntry`` or is counted under a drop reason
(spec §8.2, "combine" storage mode).

The index is built once, deterministically (``seed``), before any sampler exists. Each entry carries its
shape key ``"{frames}x{H}x{W}"``; the group sampler batches by that key. Every drop is counted per reason
and logged (upstream dropped rare shapes silently, §12.26; here they are only dropped when
``min_samples_per_shape`` asks for it, and reported).

``decide_record`` is the one filter decision per record; ``build_index`` applies it in memory (small data,
tests, the reference path) and ``mm.data.build_index`` applies the same function to write the on-disk
columnar index (``mm.data.index_store``) that training uses at scale. Both indexes answer ``entry(i)``,
``group(shape_key)`` (ascending sample indices of one shape) and ``shape_groups()``.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mm.data.annotations import INVALID_JSON, Record, iter_annotations, parse_record, read_data_txt
from mm.data.config import DataConfig
from mm.data.frames import frame_step, num_resampled, resample_indices, too_long, valid_frame_count
from mm.data.resolution import target_size

logger = logging.getLogger(__name__)

MAX_EXAMPLES_PER_REASON = 3
# DataConfig fields that change which samples are kept and their shapes (what an index depends on)
FILTER_FIELDS = (
    "data_path", "dataset_type", "num_frames", "frame_interval", "train_fps", "speed_factor", "drop_short_ratio",
    "min_num_frames", "allow_fps_upsampling", "max_height", "max_width", "max_hxw", "min_hxw", "force_resolution",
    "max_h_div_w_ratio", "min_h_div_w_ratio", "force_5_ratio", "hw_stride", "ae_stride_t", "seed",
    "min_samples_per_shape",
)


@dataclass(frozen=True)
class SampleEntry:
    """A kept sample: where to read it, which source frames are candidates, and its output shape."""

    path: str
    kind: str                   # "video" | "image"
    captions: tuple[str, ...]
    num_frames: int             # output frames T (8n+1; 1 for images)
    height: int                 # output size
    width: int
    frame_start: int            # candidate source indices: resample_indices(frame_span, frame_step, start)
    frame_span: int
    frame_step: float
    num_candidates: int
    crop: tuple[int, int, int, int] | None
    aesthetic: float | None

    @property
    def shape_key(self) -> str:
        return f"{self.num_frames}x{self.height}x{self.width}"

    def candidate_indices(self) -> np.ndarray:
        if self.kind == "image":
            return np.zeros(1, dtype=np.int64)
        return resample_indices(self.frame_span, self.frame_step, self.frame_start)


def group_order(counts: Mapping[str, int]) -> list[str]:
    """Shape keys in the order the sampler walks them: descending size, ties by key."""
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def rare_shapes(counts: Mapping[str, int], cfg: DataConfig) -> set[str]:
    """Shapes dropped as ``shape_too_rare`` (fewer than ``min_samples_per_shape`` samples)."""
    return {k for k, n in counts.items() if n < cfg.min_samples_per_shape} if cfg.min_samples_per_shape > 1 else set()


def format_summary(num_records: int, kept: int, dropped: Mapping[str, int], examples: Mapping[str, list[str]],
                   shape_counts: Mapping[str, int]) -> str:
    """The drop/shape report of ``inspect`` and the build log."""
    lines = [f"records: {num_records}  kept: {kept}  dropped: {sum(dropped.values())}"]
    for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  dropped {reason}: {n}  (e.g. {', '.join(examples.get(reason, []))})")
    lines.append(f"shapes (frames x H x W): {len(shape_counts)}")
    for key in group_order(shape_counts):
        lines.append(f"  {key}: {shape_counts[key]}")
    return "\n".join(lines)


@dataclass
class DataIndex:
    """In-memory index: kept entries plus per-reason drop counts (with a few example paths per reason)."""

    entries: list[SampleEntry] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    num_records: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, i: int) -> SampleEntry:
        return self.entries[i]

    @property
    def shape_keys(self) -> list[str]:
        return [e.shape_key for e in self.entries]

    def shape_counts(self) -> Counter:
        return Counter(self.shape_keys)

    def indices_by_shape(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            groups[e.shape_key].append(i)
        return dict(groups)

    def shape_groups(self) -> dict[str, np.ndarray]:
        """Shape key -> ascending sample indices, in ``group_order``."""
        if not hasattr(self, "_groups"):
            by_shape = self.indices_by_shape()
            self._groups = {k: np.asarray(by_shape[k], dtype=np.int64)
                            for k in group_order({k: len(v) for k, v in by_shape.items()})}
        return self._groups

    def group(self, shape_key: str) -> np.ndarray:
        return self.shape_groups()[shape_key]

    def drop(self, reason: str, what: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(what)

    def summary(self) -> str:
        return format_summary(self.num_records, len(self), self.dropped, self.examples, self.shape_counts())


def entry_from_record(rec: Record, cfg: DataConfig, rng_key: tuple[int, ...]) -> SampleEntry | str:
    """§8.2 steps 2-6 for one record: a ``SampleEntry`` or the drop reason."""
    if cfg.dataset_type == "t2i" and rec.kind == "video":
        return "video_in_image_dataset"
    size = target_size(rec.height, rec.width, cfg)
    if isinstance(size, str):
        return size
    th, tw = size
    if rec.kind == "image":
        return SampleEntry(rec.path, "image", rec.captions, 1, th, tw, 0, 1, 1.0, 1, rec.crop, rec.aesthetic)
    if too_long(rec.num_frames, rec.fps, cfg.num_frames, cfg.train_fps, cfg.speed_factor):
        return "too_long"
    step = frame_step(rec.fps, cfg.train_fps, cfg.speed_factor, cfg.frame_interval)
    if step < 1.0 and not cfg.allow_fps_upsampling:
        return "fps_too_low"
    n = num_resampled(rec.num_frames, step)
    if n < cfg.num_frames and cfg.drop_short_ratio > 0:
        if cfg.drop_short_ratio >= 1.0 or np.random.default_rng(rng_key).random() < cfg.drop_short_ratio:
            return "too_short"
    t = valid_frame_count(n, cfg.num_frames, cfg.ae_stride_t, cfg.min_num_frames)
    if t == 0:
        return "too_short"
    return SampleEntry(rec.path, "video", rec.captions, t, th, tw, rec.start_frame, rec.num_frames, step, n,
                       rec.crop, rec.aesthetic)


def decide_record(raw: Any, root: str, cfg: DataConfig, ds_id: int, rec_id: int) -> SampleEntry | str:
    """The filter decision for one raw annotation record (record ``rec_id`` of dataset ``ds_id``)."""
    if raw is INVALID_JSON:
        return "bad_json"
    rec = parse_record(raw, root)
    if isinstance(rec, str):
        return rec
    return entry_from_record(rec, cfg, (cfg.seed, ds_id, rec_id))


def drop_label(raw: Any, annotation: str, rec_id: int) -> str:
    """How a dropped record is named in the examples: its path, else ``file[record id]``."""
    if isinstance(raw, dict):
        return str(raw.get("path", f"{annotation}[{rec_id}]"))
    return f"{annotation}[{rec_id}]"


def build_index(cfg: DataConfig) -> DataIndex:
    """Read every dataset of ``cfg.data_path`` into memory and apply the filters; logs a summary."""
    if not cfg.data_path:
        raise ValueError("DataConfig.data_path must name a data.txt, got ''")
    index = DataIndex()
    for ds_id, source in enumerate(read_data_txt(cfg.data_path)):
        for rec_id, raw in iter_annotations(source.annotation):
            index.num_records += 1
            entry = decide_record(raw, source.root, cfg, ds_id, rec_id)
            if isinstance(entry, str):
                index.drop(entry, drop_label(raw, source.annotation, rec_id))
            else:
                index.entries.append(entry)
    rare = rare_shapes(index.shape_counts(), cfg)
    if rare:
        kept = []
        for e in index.entries:
            if e.shape_key in rare:
                index.drop("shape_too_rare", e.path)
            else:
                kept.append(e)
        index.entries = kept
    logger.info("data index built from %s\n%s", cfg.data_path, index.summary())
    return index
