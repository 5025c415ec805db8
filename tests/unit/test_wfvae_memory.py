"""WFVAE memory and kernel choices (issue 20): exact rewrites of the layers, the oneDNN conv3d choice,
and the activation memory of a resnet block and of tiled decoding, counted as live tensor bytes (a
dispatch mode sees every tensor the model allocates; no timing, independent of the machine's load)."""

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mm.models.vae_layers import CausalConv3d, CausalUpsample3D, ChannelLayerNorm, FrameConv2d, ResnetBlock3D
from mm.models.vae_streaming import Stream, TemporalCache, causal_pad
from mm.models.wfvae import WFVAE, WFVAEConfig, tiny_wfvae_config
from mm.ops.conv3d import conv3d


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages allocated inside the mode and still referenced by a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, live tensor objects]

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        outside = {a.untyped_storage().data_ptr() for a in flat} - set(self.refs)  # made before the mode
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in outside:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                self.refs[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self.refs[key][0]
            self.refs[key][1] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


def _peak_bytes(fn, *args) -> int:
    with torch.no_grad(), LiveBytes() as mode:
        out = fn(*args)
    del out
    return mode.peak


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [((3, 3, 3), 1, (0, 1, 1)), ((3, 3, 3), 2, (0, 0, 0)), ((1, 3, 3), 1, (0, 1, 1)), ((1, 1, 1), 1, (0, 0, 0))],
)
def test_conv3d_matches_torch(kernel, stride, padding):
    """oneDNN (or F.conv3d for 1x1x1) = F.conv3d up to rounding, also through autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 5, 9, 9, generator=g, requires_grad=True)
    w = (torch.randn(4, 6, *kernel, generator=g) / 10).requires_grad_()
    b = torch.randn(4, generator=g)
    stride3 = (stride,) * 3
    y = conv3d(x, w, b, stride3, padding)
    ref = F.conv3d(x, w, b, stride3, padding)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), (x, w))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_frame_conv_is_the_per_frame_conv2d():
    torch.manual_seed(0)
    conv = FrameConv2d(5, 7, kernel_size=3, padding=1)
    x = torch.randn(2, 5, 3, 8, 8)
    per_frame = torch.stack([F.conv2d(x[:, :, t], conv.weight, conv.bias, padding=1) for t in range(3)], dim=2)
    torch.testing.assert_close(conv(x), per_frame, rtol=1e-5, atol=1e-5)


def test_norm_silu_into_a_buffer_equals_the_whole_tensor_path():
    """Same per-position arithmetic (bitwise when frames fill whole vector lanes; else SiLU's scalar tail)."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.norm.weight.uniform_(0.5, 1.5)
        norm.norm.bias.normal_()
    x = torch.randn(1, 6, 4, 5, 5) * 3
    out = torch.empty(1, 6, 6, 5, 5)[:, :, 2:]  # a slot of a padded buffer
    norm.silu_into(x, out)
    torch.testing.assert_close(out, F.silu(norm(x)), rtol=1e-6, atol=1e-6)


def test_causal_pad_one_copy_equals_concatenation():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 5, 5)
    owner = torch.nn.Identity()
    padded = causal_pad(x, kernel_t=3, stride_t=2, owner=owner, stream=None, pad_hw_end=1)
    expected = F.pad(torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2), (0, 1, 0, 1))
    assert torch.equal(padded, expected)
    # streamed: the carried frames (with their spatial padding) come first, a writer fills the rest
    stream = Stream(TemporalCache())
    first = causal_pad(x, 3, 1, owner, stream)
    second = causal_pad(x, 3, 1, owner, stream, write=lambda slot: slot.copy_(2 * x))
    assert torch.equal(second, torch.cat([first[:, :, -2:], 2 * x], dim=2))


def test_upsampler_equals_upsample_then_pad():
    """Padding at the input resolution and upsampling once = upsampling the parts, concatenating, padding."""
    torch.manual_seed(0)
    up = CausalUpsample3D(4, 4)
    x = torch.randn(1, 4, 3, 4, 4)
    space = dict(scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
    time2 = dict(scale_factor=(2, 1, 1), mode="trilinear", align_corners=False)
    frames = torch.cat([F.interpolate(x[:, :, :1], **space), F.interpolate(F.interpolate(x[:, :, 1:], **time2), **space)], 2)
    padded = torch.cat([frames[:, :, :1], frames[:, :, :1], frames], dim=2)
    expected = F.conv3d(padded, up.conv.conv.weight, up.conv.conv.bias, padding=(0, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(up(x), expected, rtol=1e-6, atol=1e-6)


def test_resnet_block_holds_input_padded_activation_and_output_only():
    """Without autograd a 3-D resnet block needs x, one padded activation and one output (+ 1 frame)."""
    torch.manual_seed(0)
    block = ResnetBlock3D(16, 16).eval()
    x = torch.randn(1, 16, 16, 16, 16)
    activation = x.numel() * x.element_size()
    padded = activation * (16 + 2) // 16
    frame = activation // 16
    peak = _peak_bytes(block, x)  # x itself is not counted
    # the whole-tensor path (norm output, its contiguous copy, SiLU output, concatenation) peaked at 4.1x
    assert peak <= padded + activation + 3 * frame, peak / activation


def _tiny(**overrides) -> WFVAE:
    torch.manual_seed(0)
    config = dataclasses.replace(WFVAEConfig.from_upstream_dict(tiny_wfvae_config()), **overrides)
    return WFVAE.from_upstream(config)


def test_tiled_decode_memory_is_flat_in_frames():
    """Tiled decoding holds one chunk's activations whatever the length (the output video aside)."""
    vae = _tiny(decode_chunk_latents=1)
    peaks = {}
    for latents in (5, 9):  # 33 and 65 frames
        z = torch.randn(1, 32, latents, 4, 4, generator=torch.Generator().manual_seed(1))
        output = 3 * (8 * (latents - 1) + 1) * 32 * 32 * 4
        peaks[latents] = _peak_bytes(vae.decode, z) - output
    # without chunking the activations of 65 frames need about twice those of 33 frames
    assert peaks[9] <= 1.03 * peaks[5], peaks
