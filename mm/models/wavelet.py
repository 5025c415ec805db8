"""3-D Haar wavelet transform and its inverse, as used by the WFVAE (spec §4.3).

Eight 2x2x2 kernels (index order [t][h][w]); subband ``s`` has sign pattern (+, -) along each axis
flagged in ``SUBBANDS`` and magnitude ``HAAR_SCALE = 0.3536`` (upstream's approximation of 1/sqrt(8);
kept for weight compatibility, spec §12 item 7, so a forward/inverse round trip scales by
``8 * 0.3536**2 = 1.000264``).

Channels are subband-major: output channel ``s * C_in + c`` is subband ``s`` of input channel ``c``.
The forward transform is causal: the first frame is replicated once in front, so T frames give
``(T - 1) // 2 + 1`` coefficient frames; the inverse drops its first output frame on the first chunk,
giving ``2T' - 1`` frames. Checkpoint layout: forward kernels are frozen *parameters*
``{name}_conv.conv.weight``; inverse kernels are *buffers* ``{name}``, both of shape (1, 1, 2, 2, 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm.models.vae_streaming import Stream, causal_pad

HAAR_SCALE = 0.3536

# subband name -> (negative second tap along t, along h, along w), in channel order
SUBBANDS: dict[str, tuple[bool, bool, bool]] = {
    "h": (False, False, False),
    "g": (False, False, True),
    "hh": (False, True, False),
    "gh": (False, True, True),
    "h_v": (True, False, False),
    "g_v": (True, False, True),
    "hh_v": (True, True, False),
    "gh_v": (True, True, True),
}
NUM_SUBBANDS = len(SUBBANDS)


def haar_kernel(name: str) -> torch.Tensor:
    """The (1, 1, 2, 2, 2) kernel of one subband: ``HAAR_SCALE * s_t(a) * s_h(b) * s_w(c)``."""
    signs = [torch.tensor([1.0, -1.0 if negative else 1.0]) for negative in SUBBANDS[name]]
    kernel = signs[0][:, None, None] * signs[1][None, :, None] * signs[2][None, None, :]
    return (HAAR_SCALE * kernel).reshape(1, 1, 2, 2, 2)


class _KernelConv(nn.Module):
    """Holder giving a forward Haar kernel its upstream key ``{name}_conv.conv.weight``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=2, stride=2, bias=False)
        self.conv.weight = nn.Parameter(haar_kernel(name), requires_grad=False)


class HaarWaveletTransform3D(nn.Module):
    """Causal 3-D Haar analysis: [B, C, T, H, W] -> [B, 8C, (T-1)//2 + 1, H/2, W/2]."""

    def __init__(self) -> None:
        super().__init__()
        for name in SUBBANDS:
            self.add_module(f"{name}_conv", _KernelConv(name))

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        batch = x.shape[0]
        # one stacked conv instead of eight; the kernels stay separate modules for the key layout
        weight = torch.cat([getattr(self, f"{name}_conv").conv.weight for name in SUBBANDS])  # [8, 1, 2, 2, 2]
        x = causal_pad(x, kernel_t=2, stride_t=2, owner=self, stream=stream)
        x = rearrange(x, "b c t h w -> (b c) 1 t h w")
        y = F.conv3d(x, weight.to(x.dtype), stride=2)  # [(B C), 8, T', H/2, W/2]
        return rearrange(y, "(b c) s t h w -> b (s c) t h w", b=batch)


class InverseHaarWaveletTransform3D(nn.Module):
    """3-D Haar synthesis: [B, 8C, T', H, W] -> [B, C, 2T' - 1 (first chunk) or 2T', 2H, 2W]."""

    def __init__(self) -> None:
        super().__init__()
        for name in SUBBANDS:
            self.register_buffer(name, haar_kernel(name))

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        batch, channels = x.shape[:2]
        assert channels % NUM_SUBBANDS == 0, channels
        weight = torch.cat([getattr(self, name) for name in SUBBANDS])  # [8 in, 1 out, 2, 2, 2]
        x = rearrange(x, "b (s c) t h w -> (b c) s t h w", s=NUM_SUBBANDS)
        y = F.conv_transpose3d(x, weight.to(x.dtype), stride=2)  # sums the 8 subbands
        y = rearrange(y, "(b c) 1 t h w -> b c t h w", b=batch)
        first_chunk = stream is None or not stream.cache.has(self)
        if stream is not None:
            stream.cache.set(self, True)
        # the first output frame reconstructs the replicated padding frame of the forward transform
        return y[:, :, 1:] if first_chunk else y
