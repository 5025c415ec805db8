"""Skiparse token regrouping (spec §2.6): pure index math, no parameters, no communication.

A video sequence of length ``L`` is padded to ``L'`` (a multiple of ``k**2``) and split into ``k``
sub-sequences of length ``L'/k`` that become extra batch entries (new batch index ``r*B + b``):

* single-skip (``group=False``): token ``s`` goes to sub-sequence ``s % k``, position ``s // k``;
* group-skip (``group=True``): ``s = n*k^2 + m*k + j`` goes to sub-sequence ``m``, position ``n*k + j``.

``k = 1`` is the identity (dense attention). Tensors enter sequence-first (``[S, B, ...]``, the model's
SBH layout) and leave batch-first (``[k*B, S'/k, ...]``, the attention kernel's BSHD layout), so the
regroup and the layout change cost one copy.
"""

from __future__ import annotations

import torch


def padded_length(length: int, k: int) -> int:
    """``L'``: ``length`` rounded up to a multiple of ``k**2``."""
    return length + (-length) % (k * k)


def _pad_seq(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """Pad dim 0 of ``x`` to ``length`` with ``value``."""
    extra = length - x.shape[0]
    if extra == 0:
        return x
    pad = x.new_full((extra, *x.shape[1:]), value)
    return torch.cat([x, pad], dim=0)


def to_batch_view(x_SB: torch.Tensor, k: int, group: bool, pad_value=0) -> torch.Tensor:
    """``[L, B, *rest] -> [k, B, L'/k, *rest]``: the regrouped tokens as a strided view (no copy unless
    padding is needed), so a caller can concatenate other tokens before merging ``(k, B)``."""
    L, B = x_SB.shape[:2]
    rest = x_SB.shape[2:]
    Lp = padded_length(L, k)
    x = _pad_seq(x_SB, Lp, pad_value)
    if group:
        # s = n*k^2 + m*k + j: [n, m, j, B, *] -> [m, B, n, j, *] -> [m, B, n*k + j, *]
        x = x.reshape(Lp // (k * k), k, k, B, *rest).permute(1, 3, 0, 2, *range(4, 4 + len(rest)))
        return x.flatten(2, 3)
    # s = g*k + r: [g, r, B, *] -> [r, B, g, *]
    return x.reshape(Lp // k, k, B, *rest).permute(1, 2, 0, *range(3, 3 + len(rest)))


def to_batch(x_SB: torch.Tensor, k: int, group: bool, pad_value=0) -> torch.Tensor:
    """``[L, B, *rest] -> [k*B, L'/k, *rest]`` (pads with ``pad_value``)."""
    if k == 1:
        return x_SB.transpose(0, 1)
    return to_batch_view(x_SB, k, group, pad_value).flatten(0, 1)


def from_batch(x_BS: torch.Tensor, k: int, group: bool, length: int) -> torch.Tensor:
    """Inverse of :func:`to_batch`: ``[k*B, L'/k, *rest] -> [length, B, *rest]`` (padding dropped)."""
    kB, Lk = x_BS.shape[:2]
    rest = x_BS.shape[2:]
    if k == 1:
        return x_BS.transpose(0, 1)
    B, Lp = kB // k, Lk * k
    if group:
        # [m, B, n, j, *] -> [n, m, j, B, *]
        x = x_BS.reshape(k, B, Lp // (k * k), k, *rest)
        x = x.permute(2, 0, 3, 1, *range(4, x.dim()))
    else:
        # [r, B, g, *] -> [g, r, B, *]
        x = x_BS.reshape(k, B, Lp // k, *rest)
        x = x.permute(2, 0, 1, *range(3, x.dim()))
    return x.reshape(Lp, B, *rest)[:length]


def subsequence_indices(length: int, k: int, group: bool) -> torch.Tensor:
    """``[k, L'/k]`` padded-token indices of each sub-sequence (indices >= ``length`` are padding).

    The reference definition used by tests; the model uses :func:`to_batch`.
    """
    Lp = padded_length(length, k)
    s = torch.arange(Lp)
    if group:
        sub, pos = (s // k) % k, (s // (k * k)) * k + s % k
    else:
        sub, pos = s % k, s // k
    out = torch.empty(k, Lp // k, dtype=torch.long)
    out[sub, pos] = s
    return out


def key_padding_mask(video_keep: torch.Tensor, text_keep: torch.Tensor, k: int, group: bool) -> torch.Tensor:
    """Attention key mask for one (k, pattern): ``[B, Lv]``, ``[B, Lt]`` bool (True = attend) ->
    ``[k*B, L'/k + Lt]`` bool, video keys first. Padded video rows are never attended.

    A row with no valid key at all is fully unmasked instead, which is what upstream's additive
    ``-10000`` bias amounts to (uniform attention) and avoids NaN from an all-masked softmax.
    """
    v = to_batch(video_keep.transpose(0, 1), k, group, pad_value=False)  # [Lv, B] -> [kB, L'/k]
    t = text_keep.repeat(k, 1)  # [kB, Lt], batch index r*B + b like the video
    mask = torch.cat([v, t], dim=1)
    return mask | ~mask.any(dim=1, keepdim=True)

