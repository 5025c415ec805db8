"""Pixel transforms of the ``train_pipeline`` (spec §8.3): to float, centre-crop-resize, ae_norm.

Input: uint8 ``[T, H, W, C]`` from a reader (optionally cropped with the record's ``crop`` box).
Output: float32 ``[C, T, H, W]`` in [-1, 1].

``CenterCropResizeVideo`` centre-crops to the target aspect ratio (crop height ``int(W·r*)`` when
``H/W > r*``, else width ``int(H/r*)``; offsets ``round((H−h')/2)``, ``round((W−w')/2)``) and resizes with
bicubic, ``align_corners=True``, ``antialias=True``. ``MaxHWResizeVideo`` / ``SpatialStrideCropVideo``
(multi-resolution pipelines) resize to the per-sample target from the index the same way. Unlike
upstream (§12.27) the resized values are clamped to [0, 1] before ``ae_norm`` so the output never leaves
[-1, 1].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from mm.data.config import RESIZE_TRANSFORMS


def apply_crop(frames_THWC: torch.Tensor, crop: tuple[int, int, int, int] | None) -> torch.Tensor:
    """Record ``crop`` box ``(x0, x1, y0, y1)`` in source pixels."""
    if crop is None:
        return frames_THWC
    x0, x1, y0, y1 = crop
    return frames_THWC[:, y0:y1, x0:x1, :]


def to_tensor_video(frames_THWC: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, H, W, C]`` -> float ``[T, C, H, W]`` in [0, 1]."""
    return frames_THWC.permute(0, 3, 1, 2).float().div_(255.0)


def center_crop_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centre crop of ``height × width`` at the target aspect ratio."""
    r_star = target_h / target_w
    if height / width > r_star:
        h, w = int(width * r_star), width
    else:
        h, w = height, int(height / r_star)
    h, w = max(h, 1), max(w, 1)
    return round((height - h) / 2), round((width - w) / 2), h, w


def center_crop_resize(video_TCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop to the aspect of ``size`` then bicubic-resize (antialiased) to ``size``."""
    th, tw = size
    _, _, h, w = video_TCHW.shape
    top, left, ch, cw = center_crop_box(h, w, th, tw)
    video_TCHW = video_TCHW[:, :, top:top + ch, left:left + cw]
    if (ch, cw) == (th, tw):
        return video_TCHW
    return F.interpolate(video_TCHW, size=(th, tw), mode="bicubic", align_corners=True, antialias=True)


def ae_norm(video: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (clamped first, §12.27)."""
    return video.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def apply_pipeline(frames_THWC: torch.Tensor, pipeline: Sequence[Mapping[str, Any]],
                   size: tuple[int, int]) -> torch.Tensor:
    """Run a validated ``train_pipeline`` for a sample whose output size is ``size``; -> ``[C, T, H, W]``."""
    x = frames_THWC
    for t in pipeline:
        kind = t["trans_type"]
        if kind == "ToTensorVideo":
            x = to_tensor_video(x)
        elif kind in RESIZE_TRANSFORMS:
            x = center_crop_resize(x, size)
        elif kind == "ae_norm":
            x = ae_norm(x)
        else:
            raise ValueError(f"unknown trans_type {kind!r}")
    if tuple(x.shape[-2:]) != tuple(size):  # a pipeline without a resize step must already match
        x = center_crop_resize(x, size)
    return x.permute(1, 0, 2, 3).contiguous()  # [T, C, H, W] -> [C, T, H, W]
