"""Writing generated samples: uint8 conversion, H.264 mp4 (PyAV) / PNG, JSON sidecars; all atomic.

Spec §9.2 steps 6-7, with two changes: the uint8 conversion rounds instead of truncating (spec §12.31),
and the mp4 is written once with libx264 (yuv420p) at the requested fps instead of OpenCV ``mp4v`` followed
by an ffmpeg re-encode. Every file is written under a temporary name and renamed into place, so a file
that exists is complete: an interrupted run never leaves a half-written sample that resume would skip.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

VIDEO_SUFFIX = ".mp4"
IMAGE_SUFFIX = ".png"
SIDECAR_SUFFIX = ".json"
DEFAULT_CRF = 18  # x264 constant rate factor: visually lossless for generated video


def to_uint8(video_BCTHW: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] ``(B, 3, T, H, W)`` -> uint8 ``(B, T, H, W, 3)`` on the CPU, rounded."""
    if video_BCTHW.dim() != 5 or video_BCTHW.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video_BCTHW.shape)}")
    x = (video_BCTHW.float() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().cpu()  # [B, T, H, W, C]


def _tmp_path(path: Path) -> Path:
    # keeps the real suffix last (PyAV and PIL pick the format from it); hidden, so never mistaken for output
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_mp4(path: str | os.PathLike, frames_THWC: torch.Tensor | np.ndarray, fps: int,
              crf: int = DEFAULT_CRF) -> Path:
    """H.264 (libx264, yuv420p) at ``fps``; height and width must be even. Written atomically.

    Same frames -> same bytes: one encoder thread (x264's output depends on its thread count; a 121-frame
    576x1024 clip still encodes in seconds, next to minutes of sampling) and macroblock-tree rate control
    off (with it, the bytes of small videos, e.g. 32x32 or 32x64, vary from run to run with libx264's
    assembly paths: it reads memory it did not write).
    """
    import av

    frames = np.ascontiguousarray(torch.as_tensor(frames_THWC).numpy())
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs an even height and width, got {h}x{w}")
    if not (isinstance(fps, int) and fps > 0):
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_png(path: str | os.PathLike, frame_HWC: torch.Tensor | np.ndarray) -> Path:
    """One uint8 RGB frame as PNG, written atomically."""
    from PIL import Image

    frame = np.ascontiguousarray(torch.as_tensor(frame_HWC).numpy())
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        Image.fromarray(frame, mode="RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_sample(path_stem: str | os.PathLike, frames_THWC: torch.Tensor, fps: int) -> Path:
    """``<stem>.mp4`` for a video, ``<stem>.png`` for a single frame (T = 1)."""
    stem = Path(path_stem)
    if frames_THWC.shape[0] == 1:
        return write_png(stem.with_name(stem.name + IMAGE_SUFFIX), frames_THWC[0])
    return write_mp4(stem.with_name(stem.name + VIDEO_SUFFIX), frames_THWC, fps)


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def media_path(path_stem: str | os.PathLike, num_frames: int) -> Path:
    stem = Path(path_stem)
    return stem.with_name(stem.name + (IMAGE_SUFFIX if num_frames == 1 else VIDEO_SUFFIX))


def sidecar_path(path_stem: str | os.PathLike) -> Path:
    stem = Path(path_stem)
    return stem.with_name(stem.name + SIDECAR_SUFFIX)


def is_complete(path_stem: str | os.PathLike, num_frames: int) -> bool:
    """A sample is done when its media file and its sidecar both exist (both are written atomically,
    the sidecar last)."""
    return media_path(path_stem, num_frames).is_file() and sidecar_path(path_stem).is_file()


GRID_STEM = "video_grid"  # video_grid.mp4, or video_grid.png for one-frame samples (as upstream)


def grid_frames(samples: list[np.ndarray], border: int = 1) -> np.ndarray:
    """Samples of one size ``(T, H, W, 3)`` uint8 -> one ``(T, H', W', 3)`` grid: ``ceil(sqrt(n))`` columns in
    sample order, ``border`` black pixels around every tile, padded by one black row / column where H.264
    needs an even size."""
    if not samples:
        raise ValueError("a grid needs at least one sample")
    shape = samples[0].shape
    if any(s.shape != shape for s in samples):
        raise ValueError(f"grid samples must share one shape, got {sorted({s.shape for s in samples})}")
    t, h, w, _ = shape
    cols = int(np.ceil(np.sqrt(len(samples))))
    rows = -(-len(samples) // cols)
    height, width = rows * (h + border) + border, cols * (w + border) + border
    grid = np.zeros((t, height + height % 2, width + width % 2, 3), dtype=np.uint8)
    for k, s in enumerate(samples):
        top, left = border + (k // cols) * (h + border), border + (k % cols) * (w + border)
        grid[:, top: top + h, left: left + w] = s
    return grid


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an mp4 (or a PNG) -> (uint8 frames ``(T, H, W, 3)``, fps; 0 for an image)."""
    path = Path(path)
    if path.suffix == IMAGE_SUFFIX:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))[None], 0.0
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps


__all__ = [
    "to_uint8", "write_mp4", "write_png", "write_sample", "write_json", "media_path", "sidecar_path",
    "is_complete", "read_video", "grid_frames", "GRID_STEM", "DEFAULT_CRF",
]
