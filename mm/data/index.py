"""Dataset index: every annotation record either becomes a ``SampleEntry`` or is counted under a drop reason
(spec §8.2, "combine" storage mode).

The index is built once, deterministically (``seed``), before any sampler exists. Each entry carries its
shape key ``"{frames}x{H}x{W}"``; the group sampler batches by that key. Every drop is counted per reason
and logged (upstream dropped rare shapes silently, §12.26; here they are only dropped when
``min_samples_per_shape`` asks for it, and reported).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from mm.data.annotations import Record, load_annotations, parse_record, read_data_txt
from mm.data.config import DataConfig
from mm.data.frames import frame_step, resample_indices, too_long, valid_frame_count
from mm.data.resolution import target_size

logger = logging.getLogger(__name__)

MAX_EXAMPLES_PER_REASON = 3


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


@dataclass
class DataIndex:
    """Kept entries plus per-reason drop counts (with a few example paths per reason)."""

    entries: list[SampleEntry] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    num_records: int = 0

    def __len__(self) -> int:
        return len(self.entries)

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

    def drop(self, reason: str, what: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES_PER_REASON:
            self.examples[reason].append(what)

    def summary(self) -> str:
        lines = [f"records: {self.num_records}  kept: {len(self)}  dropped: {sum(self.dropped.values())}"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  dropped {reason}: {n}  (e.g. {', '.join(self.examples[reason])})")
        lines.append(f"shapes (frames x H x W): {len(self.shape_counts())}")
        for key, n in sorted(self.shape_counts().items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {key}: {n}")
        return "\n".join(lines)


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
    n = len(resample_indices(rec.num_frames, step, rec.start_frame))
    if n < cfg.num_frames and cfg.drop_short_ratio > 0:
        if cfg.drop_short_ratio >= 1.0 or np.random.default_rng(rng_key).random() < cfg.drop_short_ratio:
            return "too_short"
    t = valid_frame_count(n, cfg.num_frames, cfg.ae_stride_t, cfg.min_num_frames)
    if t == 0:
        return "too_short"
    return SampleEntry(rec.path, "video", rec.captions, t, th, tw, rec.start_frame, rec.num_frames, step, n,
                       rec.crop, rec.aesthetic)


def build_index(cfg: DataConfig) -> DataIndex:
    """Read every dataset of ``cfg.data_path`` and apply the filters; logs a summary."""
    if not cfg.data_path:
        raise ValueError("DataConfig.data_path must name a data.txt, got ''")
    index = DataIndex()
    for ds_id, source in enumerate(read_data_txt(cfg.data_path)):
        records = load_annotations(source.annotation)
        for rec_id, raw in enumerate(records):
            index.num_records += 1
            rec = parse_record(raw, source.root)
            what = raw.get("path", f"{source.annotation}[{rec_id}]") if isinstance(raw, dict) else str(rec_id)
            if isinstance(rec, str):
                index.drop(rec, str(what))
                continue
            entry = entry_from_record(rec, cfg, (cfg.seed, ds_id, rec_id))
            if isinstance(entry, str):
                index.drop(entry, str(what))
            else:
                index.entries.append(entry)
    if cfg.min_samples_per_shape > 1:
        counts = index.shape_counts()
        rare = {k for k, n in counts.items() if n < cfg.min_samples_per_shape}
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
