"""The 3-D convolution and activation layout used by the WFVAE, the fastest exact CPU path (issue 20, item 2).

On CPU, ``F.conv3d`` picks oneDNN (mkldnn) only when the input is large enough by a heuristic; at batch 1
a short temporal chunk falls back to a naive im2col kernel (``slow_conv3d``) that needs about ``27x`` the
input in scratch memory and runs 2-10x slower than oneDNN. On the plain [B, C, T, H, W] layout oneDNN
also reorders the input into its blocked layout and the output back, one extra activation-sized buffer
per convolution. On the channels-last-3d layout ([B, T, H, W, C] in memory) it reads and writes the
tensors as they are. Measured with one thread on this project's CPUs (released widths, 256x256 video):

* per-frame (1, 3, 3) convs 160 -> 160 on 5x128x128: 0.36 s channels-last vs 0.44 s plain; 24 -> 160:
  0.08 vs 0.13 s; the stride-2 downsample 0.16 vs 0.21 s; 3x3x3 convs at 64x64 and 32x32: within 6%;
  1x1x1 convs 320 -> 640: 0.08 s vs 0.12 s (``F.conv3d``'s GEMM on the plain layout);
* working memory of a convolution: its output only (50 MB) vs output + reorder buffer (100 MB);
* the layout also makes the rest of the VAE cheaper: LayerNorm over channels needs no transposed copy
  (0.008 s vs 0.069 s at 320 x 5x64x64), trilinear 2x upsampling 3-3.6x faster.

So on CPU the VAE keeps its float32 activations channels-last (``activation_layout`` at each network's
entry; every op follows its input's layout), its convolution weights too (``WFVAE`` converts them once:
oneDNN still reorders a weight into its blocked layout on every call, 44 MB for a 640 -> 640 3x3x3 kernel,
but not first into the input's layout as well), and every float32 convolution goes straight to oneDNN. The
sums are the same up to float32 rounding (the reduction order differs; ~1e-6 relative). Other devices
keep the plain layout and ``F.conv3d``. Autograd works on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST = torch.channels_last_3d


def channels_last_activations(x: torch.Tensor) -> bool:
    """Whether the VAE keeps x's activations channels-last: float32 on a CPU with oneDNN."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32  # oneDNN's fp16/bf16 convs need CPU extensions
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def activation_layout(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] in the VAE's activation layout for its device: channels-last where the convs run on
    oneDNN (a copy unless it already is), else x as it is."""
    return x.contiguous(memory_format=CHANNELS_LAST) if channels_last_activations(x) else x


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format tensors derived from x [B, C, T, H, W] take: channels-last when channels are x's
    innermost dimension (a channels-last tensor or a slice of one), else plain."""
    return CHANNELS_LAST if x.dim() == 5 and x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (no dilation, no groups). x [B, C, T, H, W]; the output
    has x's layout."""
    if channels_last_activations(x):
        layout = layout_of(x)
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias, list(padding),
            list(stride), [1, 1, 1], 1,
        )  # fmt: skip
    return F.conv3d(x, weight, bias, stride, padding)
