"""Exact temporal streaming for the WFVAE: per-layer left context carried between chunks (spec §4.7).

The spec's "causal cache" splits a video into temporal chunks and makes every layer with temporal
reach keep the frames the next chunk needs. This module is the clean version of that idea:

* ``TemporalCache`` holds one entry per layer (keyed by the module), reset by creating a new cache at
  every ``encode()`` / ``decode()`` call. An absent entry means "first chunk".
* ``Stream`` is what a layer receives: the cache plus ``lookahead``, the number of trailing input frames
  that are look-ahead only (the decoder feeds one extra latent frame so the trilinear upsampler sees its
  right neighbour, spec §4.7 "decoder overlap"). Look-ahead frames are computed but never committed to
  the cache. A 2x temporal upsampler turns ``n`` look-ahead frames into ``2n - 1``: it drops the last
  output, which would need the frame after the look-ahead and which no later layer needs
  (``Stream.upsampled``), so the look-ahead costs one frame per level instead of doubling; the decoder
  drops the remaining look-ahead frames at its output.
* ``causal_pad`` is the one place where the amount of carried context is decided. For a causal conv
  with temporal kernel ``k`` and stride ``s`` applied to the padded committed frames ``P`` (length
  ``L``), ``n = (L - k) // s + 1`` windows are complete and the next chunk's first window starts at
  frame ``n * s`` of ``P``; the carried context is exactly ``P[n*s : L]``. This gives ``k - 1 = 2``
  frames for stride-1 3x3x3 convs, ``1`` frame for the stride-2 downsample (even chunk lengths) and
  ``0`` for the stride-2 Haar pairs, the amounts the spec lists, written out instead of relying on
  operator precedence (spec §12 item 9).

Chunk plans are computed per call from the frame count (spec §12 item 10: nothing is frozen at the
first call); the streaming is exact for any chunk boundaries, including 1-frame chunks and T = 1 (the
encoder needs every chunk after a first of 1 + 8k frames to be a multiple of 8 frames). The plans
balance chunk sizes, so that no chunk is needlessly short.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm.ops.conv3d import layout_of


class TemporalCache:
    """Left temporal context carried from one chunk to the next, one entry per layer."""

    def __init__(self) -> None:
        self._entries: dict[nn.Module, Any] = {}

    def has(self, layer: nn.Module) -> bool:
        return layer in self._entries

    def get(self, layer: nn.Module) -> Any:
        return self._entries[layer]

    def set(self, layer: nn.Module, value: Any) -> None:
        self._entries[layer] = value

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        """Store a copy of ``frames`` as the layer's entry (not a view: the cache must not hold the chunk).

        Without autograd the copy goes into the previous entry's storage when it has the same shape and
        layout (every chunk after the first): the long-lived entries then keep their place in the host
        heap chunk after chunk instead of pinning new places between the chunk's transient activations,
        which fragments the heap and makes the peak resident memory grow with the number of chunks.
        The previous entry must have been read already (every layer reads its entry before keeping the
        next one).
        """
        old = self._entries.get(layer)
        if (
            isinstance(old, torch.Tensor)
            and not torch.is_grad_enabled()
            and old.shape == frames.shape
            and old.dtype == frames.dtype
            and layout_of(old) == layout_of(frames)
        ):
            old.copy_(frames)
        else:
            self._entries[layer] = frames.clone(memory_format=layout_of(frames))


@dataclass(frozen=True)
class Stream:
    """Streaming state handed to every temporal layer of one chunk."""

    cache: TemporalCache
    lookahead: int = 0  # trailing input frames that are look-ahead only (not committed)

    def upsampled(self) -> Stream:
        """The same stream after a 2x temporal upsampler, which keeps ``2n - 1`` of ``2n`` look-ahead outputs."""
        return Stream(self.cache, max(2 * self.lookahead - 1, 0))


def causal_pad(
    x: torch.Tensor,
    kernel_t: int,
    stride_t: int,
    owner: nn.Module,
    stream: Stream | None,
    pad_hw_end: int = 0,
    write: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prepend the temporal left context of a causal conv and update the owner's cache entry.

    Without a stream, and on the first chunk of a stream, the context is ``kernel_t - 1`` copies of the
    first frame (replicate-first-frame padding, spec §4.2). Later chunks use the frames carried from
    the previous chunk instead. ``pad_hw_end`` zero rows/columns are appended after H and W in the same
    copy (the downsample's spatial padding; carried frames already hold them). With ``write``, the
    frames are not copied from x: ``write(slot)`` fills their slot of the buffer (x gives only shape,
    dtype and device), so a producer such as a norm can write its output straight into place.
    x [B, C, T, H, W] -> [B, C, context + T, H + pad_hw_end, W + pad_hw_end], dense in x's layout
    (``mm.ops.conv3d.layout_of``); x itself when there is nothing to add.
    """
    batch, channels, frames, height, width = x.shape
    carried = stream.cache.get(owner) if stream is not None and stream.cache.has(owner) else None
    context = kernel_t - 1 if carried is None else carried.shape[2]
    if context == 0 and pad_hw_end == 0 and write is None:
        padded = x
    else:
        # one buffer written once, instead of a concatenation (and a separate spatial pad)
        shape = (batch, channels, context + frames, height + pad_hw_end, width + pad_hw_end)
        padded = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))
        if pad_hw_end:
            padded[:, :, :, height:].zero_()
            padded[:, :, :, :height, width:].zero_()
        slot = padded[:, :, context:, :height, :width]
        if write is not None:
            write(slot)
        else:
            slot.copy_(x)
        if carried is not None:
            padded[:, :, :context] = carried
        else:
            padded[:, :, :context, :height, :width] = slot[:, :, :1]
    if stream is not None:
        committed = padded.shape[2] - stream.lookahead
        complete_windows = (committed - kernel_t) // stride_t + 1
        next_window_start = complete_windows * stride_t
        carry = padded[:, :, next_window_start:committed]
        assert complete_windows >= 1 and carry.shape[2] < kernel_t, (committed, kernel_t, stride_t)
        stream.cache.keep(owner, carry)
    return padded


def _balanced(total: int, max_size: int) -> list[int]:
    """Split ``total`` into the fewest parts of at most ``max_size``, sizes differing by at most 1."""
    parts = max(1, -(-total // max_size))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def encoder_chunks(num_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """Pixel-frame chunks ``[start, end)`` of at most ``1 + chunk_frames`` (first) / ``chunk_frames`` frames.

    The first chunk holds the first frame plus the first group; the groups are balanced multiples of 8
    frames, so every chunk after the first halves evenly through the three temporal levels (Haar pairs
    and stride-2 windows never straddle two chunks) and no chunk is needlessly short.
    """
    assert chunk_frames > 0 and chunk_frames % 8 == 0 and (num_frames - 1) % 8 == 0, (num_frames, chunk_frames)
    groups = [8 * size for size in _balanced((num_frames - 1) // 8, chunk_frames // 8)] if num_frames > 1 else [0]
    bounds = [0, 1 + groups[0]]
    for size in groups[1:]:
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:]))


def decoder_chunks(num_latents: int, chunk_latents: int) -> list[tuple[int, int, int]]:
    """Latent-frame chunks ``(start, end, lookahead)``; the first also holds latent 0, sizes balanced.

    Every chunk but the last gets one look-ahead latent (its right neighbour, needed by the trilinear
    temporal interpolation of its last frame); the decoder computes it only as far as that needs.
    """
    assert chunk_latents > 0, chunk_latents
    groups = _balanced(num_latents - 1, chunk_latents) if num_latents > 1 else [0]
    bounds = [0, 1 + groups[0]]
    for size in groups[1:]:
        bounds.append(bounds[-1] + size)
    return [(start, end, 1 if end < num_latents else 0) for start, end in zip(bounds[:-1], bounds[1:])]
