"""The 3-D convolution used by the WFVAE, with the fastest exact CPU path (issue 20, item 2).

On CPU, ``F.conv3d`` picks oneDNN (mkldnn) only when the input is large enough by a heuristic; at
batch 1 a short temporal chunk (``channels x frames x height <= 20480``) falls back to a naive im2col
kernel (``slow_conv3d``) that needs about ``27x`` the input in scratch memory and, measured with one
thread on this project's CPUs, runs 2-10x slower than oneDNN (e.g. 16 channels, 10x96x96: 0.123 s vs
0.011 s; 24->160 channels, 1x3x3 kernel on 6x128x128: 0.219 s vs 0.186 s). Where the heuristic already
picks oneDNN the result is bitwise the same, and a per-frame ``Conv2d`` written as a ``(1, 3, 3)``
``conv3d`` gives bitwise the same output as the 2-D convolution on the ``[(B T), C, H, W]`` layout
without the two layout copies. Channels-last input was measured too and is not used: it is 2-60%
slower for the 3-D kernels here and changes the rounding.

So on CPU, float32 tensors and kernels larger than 1x1x1 go straight to oneDNN. Pointwise
(1x1x1) kernels keep ``F.conv3d``: single-threaded, its GEMM path is faster than oneDNN's (0.09 s vs
0.13 s at 160 channels, 4x128x128). Every other device uses ``F.conv3d``. Autograd works on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32  # oneDNN's fp16/bf16 convs need CPU extensions
        and weight.shape[2:].numel() > 1
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (no dilation, no groups). x [B, C, T, H, W]."""
    if _use_onednn(x, weight):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)
