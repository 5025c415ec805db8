"""WFVAE building blocks (spec §4.2): causal conv3d, per-frame conv2d, per-position LayerNorm,
2-D/3-D resnet blocks, the per-frame mid attention, stride-2 causal downsample and the causal trilinear
upsampler.

Every block takes ``(x, stream=None)`` with x ``[B, C, T, H, W]``. ``stream`` (see
``mm.models.vae_streaming``) carries the temporal left context between chunks; per-frame blocks ignore
it. Module and parameter names follow the released checkpoint (spec §4.8): causal convs keep their
``nn.Conv3d`` under ``.conv``, 2-D convs are plain ``nn.Conv2d`` subclasses, norms keep their
``nn.LayerNorm`` under ``.norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import mm.ops
from mm.models.vae_streaming import Stream, causal_pad

NORM_EPS = 1e-6


class CausalConv3d(nn.Module):
    """Conv3d with replicate-first-frame temporal padding (``kernel - 1`` frames) or carried context."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.kernel_t = kernel_size
        self.stride_t = stride
        # temporal padding is done by causal_pad, spatial padding by the conv itself
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(0, padding, padding), bias=bias
        )

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.kernel_t > 1:
            x = causal_pad(x, self.kernel_t, self.stride_t, owner=self, stream=stream)
        return self.conv(x)


class FrameConv2d(nn.Conv2d):
    """Conv2d applied to every frame independently (no temporal reach)."""

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        frames = x.shape[2]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", t=frames)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every (t, h, w) position, eps 1e-6, affine; fp32 compute."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, T, H, W] -> [B, T, H, W, C] -> back
        y = mm.ops.layer_norm(x.movedim(1, -1), self.norm.weight, self.norm.bias, self.norm.eps)
        return y.movedim(-1, 1).contiguous()


class ResnetBlock2D(nn.Module):
    """Per-frame resnet block: ``x' + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = FrameConv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class ResnetBlock3D(nn.Module):
    """Resnet block with causal 3x3x3 convs and a causal 1x1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = CausalConv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), stream)
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (width C, scale 1/sqrt(C)), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.q = CausalConv3d(channels, channels, kernel_size=1)
        self.k = CausalConv3d(channels, channels, kernel_size=1)
        self.v = CausalConv3d(channels, channels, kernel_size=1)
        self.proj_out = CausalConv3d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        batch, _, _, height, _ = x.shape
        h = self.norm(x)
        # [B, C, T, H, W] -> [(B T), (H W), 1 head, C]
        q, k, v = (rearrange(proj(h), "b c t h w -> (b t) (h w) 1 c") for proj in (self.q, self.k, self.v))
        out = mm.ops.attention(q, k, v)
        out = rearrange(out, "(b t) (h w) 1 c -> b c t h w", b=batch, h=height)
        return x + self.proj_out(out)


class Downsample3D(nn.Module):
    """Spatial 2x, time 2x: zero-pad right/bottom by 1, causal conv k3 s2 -> T' = (T-1)//2 + 1."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)), stream)


def _upsample_time(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear", align_corners=False)


def _upsample_space(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)


class CausalUpsample3D(nn.Module):
    """Causal trilinear 2x upsampler followed by a causal 3x3x3 conv; interpolation in fp32.

    Untiled: the first frame is upsampled spatially only; the remaining T-1 frames (the "rest"
    sequence) are interpolated 2x in time (trilinear, align_corners=False, so each output frame mixes
    a frame with its left or right neighbour at 1/4 : 3/4 and the ends clamp) and then 2x in space:
    T -> 2T - 1 frames. Streaming: the cache holds the last committed frame of the rest sequence (none
    yet: an empty tensor); a chunk prepends it, interpolates, and drops the two output frames that
    belong to that carried frame. The right neighbour of a chunk's last frame is its look-ahead frame.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        xf = x.float()
        first_chunk = stream is None or not stream.cache.has(self)
        if first_chunk:
            parts = [_upsample_space(xf[:, :, :1])]
            if xf.shape[2] > 1:
                parts.append(_upsample_space(_upsample_time(xf[:, :, 1:])))
            out = torch.cat(parts, dim=2)
        else:
            carried = stream.cache.get(self)
            if carried.shape[2]:
                # the two outputs of the carried frame were emitted by the previous chunk
                out = _upsample_space(_upsample_time(torch.cat([carried, xf], dim=2))[:, :, 2:])
            else:
                out = _upsample_space(_upsample_time(xf))
        if stream is not None:
            committed = xf.shape[2] - stream.lookahead
            assert committed >= 1, (xf.shape[2], stream.lookahead)
            # last committed frame of the rest sequence (which starts at frame 1 of the first chunk)
            carry_start = max(committed - 1, 1) if first_chunk else committed - 1
            stream.cache.set(self, xf[:, :, carry_start:committed].clone())
            stream = stream.upsampled()
        return self.conv(out.to(x.dtype), stream)
