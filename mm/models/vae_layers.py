"""WFVAE building blocks (spec §4.2): causal conv3d, per-frame conv2d, per-position LayerNorm,
2-D/3-D resnet blocks, the per-frame mid attention, stride-2 causal downsample and the causal trilinear
upsampler.

Every block takes ``(x, stream=None)`` with x ``[B, C, T, H, W]``. ``stream`` (see
``mm.models.vae_streaming``) carries the temporal left context between chunks; per-frame blocks ignore
it. Module and parameter names follow the released checkpoint (spec §4.8): causal convs keep their
``nn.Conv3d`` under ``.conv``, 2-D convs are plain ``nn.Conv2d`` subclasses, norms keep their
``nn.LayerNorm`` under ``.norm``.

Memory: activations are [B, C, T, H, W] in the layout ``mm.ops.conv3d.activation_layout`` gives them at each
network's entry (channels-last on CPU) and every op keeps it; without autograd a norm + SiLU is written frame
by frame straight into the padded input buffer of the convolution that follows it, residual sums are
added in place into the convolution output, and blocks drop an activation before the next
convolution runs, so a resnet block holds at most its input, one padded activation and one output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import mm.ops
from mm.models.vae_streaming import Stream, causal_pad
from mm.ops.conv3d import CHANNELS_LAST, channels_last_activations, conv3d, layout_of

NORM_EPS = 1e-6


class CausalConv3d(nn.Module):
    """Conv3d with replicate-first-frame temporal padding (``kernel - 1`` frames) or carried context.

    ``pad`` and ``convolve`` are the two halves of ``forward``; blocks call them separately so that an
    activation can be written straight into the padded buffer (``activated_input``).
    """

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

    def pad(
        self,
        x: torch.Tensor,
        stream: Stream | None = None,
        pad_hw_end: int = 0,
        write: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The conv's input: x with its temporal left context (``pad_hw_end``, ``write``: see causal_pad)."""
        if self.kernel_t == 1 and not pad_hw_end and write is None:
            return x
        return causal_pad(x, self.kernel_t, self.stride_t, self, stream, pad_hw_end=pad_hw_end, write=write)

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        return conv3d(padded, self.conv.weight, self.conv.bias, self.conv.stride, self.conv.padding)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.convolve(self.pad(x, stream))


class FrameConv2d(nn.Conv2d):
    """Conv2d applied to every frame independently (no temporal reach).

    Computed as a conv3d with a (1, kh, kw) kernel on the [B, C, T, H, W] tensor: the same sums as the
    2-D convolution on [(B T), C, H, W] without the two layout copies.
    """

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.convolve(x)


def match_weight_layout(module: nn.Module, x: torch.Tensor) -> None:
    """Lay out the convolution weights of ``module`` like the activations x will give (channels-last on
    CPU, ``mm.ops.conv3d``), in place; a no-op when they already are, so it is called on every entry.

    Weights are replaced, not copied per call: a loaded checkpoint's tensors come in the file's layout,
    and a per-call copy would add a weight-sized buffer to every convolution.
    """
    channels_last = channels_last_activations(x)
    for layer in module.modules():
        if isinstance(layer, CausalConv3d):
            weight, layout = layer.conv.weight, CHANNELS_LAST
        elif isinstance(layer, FrameConv2d):
            weight, layout = layer.weight, torch.channels_last  # its (1, kh, kw) view is channels-last-3d
        else:
            continue
        layout = layout if channels_last else torch.contiguous_format
        if not weight.is_contiguous(memory_format=layout):
            weight.data = weight.data.contiguous(memory_format=layout)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every (t, h, w) position, eps 1e-6, affine; fp32 compute."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=NORM_EPS)

    def _normalise(self, x_channels_last: torch.Tensor) -> torch.Tensor:
        return mm.ops.layer_norm(x_channels_last, self.norm.weight, self.norm.bias, self.norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, T, H, W] -> [B, T, H, W, C] -> back (a view for channels-last x, else one copy)
        return self._normalise(x.movedim(1, -1)).movedim(-1, 1).contiguous(memory_format=layout_of(x))

    def silu_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``SiLU(norm(x))`` into ``out`` ([B, C, T, H, W], any strides) one frame at a time.

        The same per-position arithmetic as ``F.silu(forward(x))``, but the only activation-sized
        tensor is ``out`` (the whole-tensor path holds the norm's output and, for plain-layout x, its
        channels-last copy and its copy back). No autograd.
        """
        for t in range(x.shape[2]):
            y = self._normalise(x[:, :, t].movedim(1, -1))  # [B, C, H, W] -> [B, H, W, C]
            out[:, :, t] = F.silu(y, inplace=True).movedim(-1, 1)


def activated_input(
    norm: ChannelLayerNorm,
    conv: CausalConv3d | FrameConv2d,
    x: torch.Tensor,
    stream: Stream | None = None,
    dropout: nn.Dropout | None = None,
) -> torch.Tensor:
    """``dropout(SiLU(norm(x)))`` laid out as ``conv.convolve`` takes it (causally padded for a causal conv).

    Without autograd (the frozen VAE) it is written straight into the convolution's input buffer, so
    that besides x that buffer is the only activation-sized tensor.
    """
    if torch.is_grad_enabled() or (dropout is not None and dropout.training and dropout.p > 0):
        h = F.silu(norm(x))
        h = dropout(h) if dropout is not None else h
        return conv.pad(h, stream) if isinstance(conv, CausalConv3d) else h
    if isinstance(conv, CausalConv3d):
        return conv.pad(x, stream, write=lambda slot: norm.silu_into(x, slot))
    h = torch.empty_like(x, memory_format=layout_of(x))
    norm.silu_into(x, h)
    return h


def _add_residual(h: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``shortcut + h``, in place on the fresh convolution output h unless autograd records it."""
    return h.add_(shortcut) if not h.requires_grad else shortcut + h


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
        h = self.conv1.convolve(activated_input(self.norm1, self.conv1, x))
        h = activated_input(self.norm2, self.conv2, h, dropout=self.dropout)  # conv1's output is freed here
        h = self.conv2.convolve(h)
        return _add_residual(h, x if self.nin_shortcut is None else self.nin_shortcut(x))


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
        h = self.conv1.convolve(activated_input(self.norm1, self.conv1, x, stream))
        h = activated_input(self.norm2, self.conv2, h, stream, self.dropout)  # conv1's output is freed here
        h = self.conv2.convolve(h)
        return _add_residual(h, x if self.nin_shortcut is None else self.nin_shortcut(x))


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
        return _add_residual(self.proj_out(out), x)


class Downsample3D(nn.Module):
    """Spatial 2x, time 2x: zero-pad right/bottom by 1, causal conv k3 s2 -> T' = (T-1)//2 + 1."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        # one copy for both paddings (temporal context in front, one zero row/column after H, W)
        return self.conv.convolve(self.conv.pad(x, stream, pad_hw_end=1))


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
    belong to that carried frame. The right neighbour of a chunk's last committed frame is its first
    look-ahead frame; the last output (which would need the frame after the look-ahead) is dropped.

    The spatial 2x interpolation acts on every frame alone (its temporal weight is exactly 1 on the
    frame itself), so the frames are assembled and the conv's causal context is prepended at the input
    resolution and the whole padded sequence is upsampled once: the conv input is the only tensor at
    the output resolution (no concatenation or padding copy of it), bitwise equal to upsampling first.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        xf = x.float()
        first_chunk = stream is None or not stream.cache.has(self)
        if first_chunk:
            frames = xf[:, :, :1]
            if xf.shape[2] > 1:
                frames = torch.cat([frames, _upsample_time(xf[:, :, 1:])], dim=2)
        else:
            carried = stream.cache.get(self)
            if carried.shape[2]:
                # the two outputs of the carried frame were emitted by the previous chunk
                frames = _upsample_time(torch.cat([carried, xf], dim=2))[:, :, 2:]
            else:
                frames = _upsample_time(xf)
        if stream is not None:
            committed = xf.shape[2] - stream.lookahead
            assert committed >= 1, (xf.shape[2], stream.lookahead)
            # last committed frame of the rest sequence (which starts at frame 1 of the first chunk)
            carry_start = max(committed - 1, 1) if first_chunk else committed - 1
            stream.cache.keep(self, xf[:, :, carry_start:committed])
            if stream.lookahead:
                # the last output needs the frame after the look-ahead; nothing downstream needs it
                frames = frames[:, :, :-1]
            stream = stream.upsampled()
        # [B, C, 2T - 1 (first chunk) or 2T, H, W] -> padded at input resolution -> [.., 2H, 2W]
        padded = _upsample_space(self.conv.pad(frames, stream))
        return self.conv.convolve(padded.to(x.dtype))
