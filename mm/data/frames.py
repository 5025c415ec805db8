"""Temporal sampling: fps resampling to ``train_fps``, clip windows, 8n+1 frame counts (spec §8.2 step 5).

Fixes relative to upstream:

* §12.22 — source frame for output frame ``i`` is the *nearest* one to time ``i·Δ`` (round half up)
  instead of ``int(start + i·Δ)``, which biased every pick towards earlier frames; ``Δ`` is computed once
  and indices as ``i·Δ`` (no float accumulation). With ``allow_fps_upsampling`` clips slower than
  ``train_fps`` are kept (frames repeat) instead of being dropped.
* §12.21 — the random window start is uniform over **all** ``n − size + 1`` positions.
* §12.23 — the candidate indices are computed once at indexing time; at access time only the window
  start is drawn (one draw per access, the count never changes).
"""

from __future__ import annotations

import math

import numpy as np

FPS_TOLERANCE = 0.1  # |fps − train_fps| below this counts as equal (upstream rule)


def frame_step(fps: float, train_fps: float, speed_factor: float = 1.0, frame_interval: int = 1) -> float:
    """Source frames advanced per output frame: ``fps/train_fps`` (1 if within 0.1 fps) × speed × interval.

    ``speed_factor > 1`` plays the clip faster (more source frames skipped per output frame).
    """
    ratio = 1.0 if abs(fps - train_fps) < FPS_TOLERANCE else fps / train_fps
    return ratio * speed_factor * frame_interval


def resample_indices(num_frames: int, step: float, start: int = 0) -> np.ndarray:
    """Source frame indices ``start + round(i·step)`` that stay inside ``[start, start + num_frames)``."""
    if step <= 0:
        raise ValueError(f"frame step must be > 0, got {step}")
    count = int(np.ceil(num_frames / step)) + 1
    offsets = np.floor(np.arange(count, dtype=np.float64) * step + 0.5).astype(np.int64)
    offsets = offsets[offsets < num_frames]
    return offsets + start


def num_resampled(num_frames: int, step: float) -> int:
    """``len(resample_indices(num_frames, step))`` without building the array (the index builder calls this
    once per record). Offset ``i`` is kept while ``floor(i·step + 0.5) < num_frames``; the estimate
    ``ceil((num_frames − 0.5) / step)`` is corrected with that same float expression, so the two agree
    exactly (tested)."""
    if step <= 0:
        raise ValueError(f"frame step must be > 0, got {step}")
    if num_frames <= 0:
        return 0
    count = max(0, math.ceil((num_frames - 0.5) / step))
    while count > 0 and math.floor((count - 1) * step + 0.5) >= num_frames:
        count -= 1
    while math.floor(count * step + 0.5) < num_frames:
        count += 1
    return count


def valid_frame_count(n: int, num_frames: int, ae_stride_t: int, min_num_frames: int) -> int:
    """Largest ``y <= min(n, num_frames)`` with ``(y − 1) % ae_stride_t == 0`` and ``y >= min_num_frames``.

    Returns 0 when no such count exists (the clip is too short for an exact VAE encode).
    """
    y = min(n, num_frames)
    if y < 1:
        return 0
    y = ((y - 1) // ae_stride_t) * ae_stride_t + 1
    return y if y >= min_num_frames else 0


def window_start(n: int, size: int, rng: np.random.Generator) -> int:
    """Uniform start of a ``size``-long window inside ``n`` candidates (inclusive of the last one)."""
    if size > n:
        raise ValueError(f"window size {size} exceeds the {n} candidate frames")
    return int(rng.integers(0, n - size + 1))


def too_long(num_frames: int, fps: float, cfg_num_frames: int, train_fps: float, speed_factor: float) -> bool:
    """Upstream's guard against very long clips: longer than 5× the span one training clip covers."""
    return num_frames > 5 * (cfg_num_frames * fps / train_fps * speed_factor)
