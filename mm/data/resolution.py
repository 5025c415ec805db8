"""Spatial filters and target sizes: fixed resolution, multi-resolution min/max tokens, 5 ratios (§8.2).

Each function maps the (effective) source size of one sample to either a target ``(H, W)`` or the name
of the drop reason. The transform then centre-crops the source to the target aspect ratio and resizes
to the target (``mm/data/transforms.py``), for every strategy.

* fixed (``force_resolution``): target ``max_height × max_width``; the centre crop at the target aspect
  must hold at least ``min_hxw·max(r/r*, r*/r)`` pixels (never upscale beyond that).
* multi-resolution: scale down to at most ``max_hxw`` pixels keeping the aspect, then cut to multiples of
  ``hw_stride``; dropped below ``min_hxw`` pixels (min/max token strategy).
* ``force_5_ratio``: snap to the nearest of 9:16, 3:4, 1:1, 4:3, 16:9 (H:W, nearest in log aspect)
  and use ``(rh·k·stride, rw·k·stride)`` with ``k = ⌊√(max_hxw / (rh·rw·stride²))⌋``.
"""

from __future__ import annotations

import math

from mm.data.config import DataConfig

ASPECT_RATIOS_5 = ((9, 16), (3, 4), (1, 1), (4, 3), (16, 9))  # (rh, rw): H:W


def aspect_ok(height: int, width: int, cfg: DataConfig) -> bool:
    return cfg.min_h_div_w_ratio <= height / width <= cfg.max_h_div_w_ratio


def fixed_target(height: int, width: int, cfg: DataConfig) -> tuple[int, int] | str:
    r_star = cfg.max_height / cfg.max_width
    r = height / width
    need = math.ceil(cfg.min_hxw * max(r / r_star, r_star / r))
    if height * width < need:
        return "too_small_for_crop"
    return cfg.max_height, cfg.max_width


def nearest_5_ratio(height: int, width: int) -> tuple[int, int]:
    r = math.log(height / width)
    return min(ASPECT_RATIOS_5, key=lambda hw: abs(math.log(hw[0] / hw[1]) - r))


def five_ratio_target(height: int, width: int, cfg: DataConfig) -> tuple[int, int] | str:
    rh, rw = nearest_5_ratio(height, width)
    k = math.isqrt(cfg.max_hxw // (rh * rw * cfg.hw_stride ** 2))
    if k < 1:
        return "too_small_after_resize"
    th, tw = rh * k * cfg.hw_stride, rw * k * cfg.hw_stride
    if th * tw < cfg.min_hxw:
        return "too_small_after_resize"
    return th, tw


def max_hw_target(height: int, width: int, cfg: DataConfig) -> tuple[int, int] | str:
    if height * width > cfg.max_hxw:
        s = math.sqrt(cfg.max_hxw / (height * width))
        height, width = int(height * s), int(width * s)
    th, tw = height // cfg.hw_stride * cfg.hw_stride, width // cfg.hw_stride * cfg.hw_stride
    if th <= 0 or tw <= 0 or th * tw < cfg.min_hxw:
        return "too_small_after_resize"
    return th, tw


def target_size(height: int, width: int, cfg: DataConfig) -> tuple[int, int] | str:
    """Apply §8.2 steps 2-4 in order; returns the target ``(H, W)`` or a drop reason."""
    if not aspect_ok(height, width, cfg):
        return "aspect_ratio"
    if height * width < cfg.min_hxw:
        return "too_small"
    if cfg.force_resolution:
        return fixed_target(height, width, cfg)
    if cfg.force_5_ratio:
        return five_ratio_target(height, width, cfg)
    return max_hw_target(height, width, cfg)
