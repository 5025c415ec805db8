"""Optional spatial tiling with overlap blending for the WFVAE (beyond upstream; spec §4.7 last bullet).

Upstream tiles only time. At high resolution the activations above the latent grid dominate memory,
so the encoder's and decoder's spatially *local* parts (convolutions and wavelets only) run on
overlapping square tiles while their latent-resolution parts, which hold the mid attention over the
whole frame, run untiled (see ``mm.models.wfvae_coders``). Tiles are planned on the latent grid (tile
size and overlap in pixels / 8) and every tile output is blended with weights that are 0 on the outer
3/8 of each overlap with a neighbouring tile and ramp linearly to 1 over its middle quarter, so
adjacent tiles' weights sum to 1 and positions near a tile's cut edge never contribute. Per-position
LayerNorm keeps no statistics across positions, so the only tiling error is the zero padding that a
cut edge shows the convolutions. It reaches as far as the local part's receptive radius, measured for
the released depth as 36 px into the encoder's input and 82 px into the decoder's output (tiny config:
24 and 58 px). When ``3 * overlap / 8`` covers it, tiled equals untiled up to float rounding (the
released defaults, tile 512 / overlap 256, do); below it the blend is approximate.

Measured on the tiny test config (``tiny_wfvae_config()``, random weights, seed 0, smooth 9x128x64
input tiled along H, fp32), max |tiled - untiled| / max |untiled| for encode / decode:

| tile px | overlap px | encode          | decode |
|---------|------------|-----------------|--------|
| 64      | 16         | 1.9e-2          | 0.69   |
| 64      | 32         | 2.6e-3          | 0.58   |
| 64      | 48         | 5.9e-4          | 0.38   |
| 96      | 64         | 0 (encoder exact) | 5.8e-2 |
| 96      | 80         | 1.6e-7          | 2.5e-2 |
| 168     | 160        | 1.9e-7          | 8.1e-8 (17x176x64 input, with temporal tiling) |

Random weights make the decoder error a worst case (LayerNorm re-amplifies the padding disturbance at
every block); trained weights were not available to measure. Bounds and the exact case are asserted in
``tests/unit/test_wfvae_tiling.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpatialTile:
    """A tile of the latent grid: rows ``[top, top + height)``, columns ``[left, left + width)``."""

    top: int
    left: int
    height: int
    width: int

    def slices(self, factor: int) -> tuple[slice, slice]:
        """Row and column slices of this tile at ``factor`` x latent resolution."""
        rows = slice(self.top * factor, (self.top + self.height) * factor)
        cols = slice(self.left * factor, (self.left + self.width) * factor)
        return rows, cols


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``, neighbours overlapping >= ``overlap``."""
    assert 0 <= overlap < tile, (tile, overlap)
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[SpatialTile]:
    """Row-major tiles covering a ``height x width`` latent grid."""
    return [
        SpatialTile(top, left, min(tile, height), min(tile, width))
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def blend_weights(start: int, length: int, size: int, overlap: int) -> torch.Tensor:
    """1-D weights of a tile ``[start, start + length)`` in ``[0, size)``; sides at the border stay 1.

    On a side that borders another tile the weight is 0 for the first ``3 * overlap / 8`` samples from
    the cut edge, then rises linearly to 1 over the next ``overlap / 4`` (sample centres at ``i + 0.5``):
    two neighbours overlapping by ``overlap`` cross-fade over the middle quarter of their overlap.
    """
    weights = torch.ones(length)
    if overlap == 0:
        return weights
    margin, ramp = 3 * overlap / 8, overlap / 4
    centres = torch.arange(length, dtype=torch.float32) + 0.5
    if start > 0:
        weights = torch.minimum(weights, ((centres - margin) / ramp).clamp(0.0, 1.0))
    if start + length < size:
        weights = torch.minimum(weights, ((length - centres - margin) / ramp).clamp(0.0, 1.0))
    return weights


class TileBlender:
    """Weighted accumulation (in fp32) of tile outputs at ``factor`` x latent resolution."""

    def __init__(self, grid_height: int, grid_width: int, overlap: int, factor: int) -> None:
        self.size = (grid_height * factor, grid_width * factor)
        self.overlap = overlap * factor
        self.factor = factor
        self.acc: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def add(self, tile: SpatialTile, y: torch.Tensor) -> None:
        """Add one tile's output y [..., tile.height * factor, tile.width * factor]."""
        rows, cols = tile.slices(self.factor)
        if self.acc is None:
            self.acc = torch.zeros(*y.shape[:-2], *self.size, dtype=torch.float32, device=y.device)
            self.total = torch.zeros(self.size, dtype=torch.float32, device=y.device)
            self.dtype = y.dtype
        w_rows = blend_weights(rows.start, rows.stop - rows.start, self.size[0], self.overlap)
        w_cols = blend_weights(cols.start, cols.stop - cols.start, self.size[1], self.overlap)
        weight = (w_rows[:, None] * w_cols[None, :]).to(y.device)  # [tile h, tile w]
        self.acc[..., rows, cols] += y.float() * weight
        self.total[rows, cols] += weight

    def result(self) -> torch.Tensor:
        assert self.acc is not None and bool((self.total > 0).all()), "tiles do not cover the grid"
        return (self.acc / self.total).to(self.dtype)
