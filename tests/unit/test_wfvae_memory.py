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
from mm.ops.conv3d import CHANNELS_LAST, activation_layout, conv3d, layout_of
from mm.ops.memory import release_host_memory


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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "kernel,stride,padding",
    [((3, 3, 3), 1, (0, 1, 1)), ((3, 3, 3), 2, (0, 0, 0)), ((1, 3, 3), 1, (0, 1, 1)), ((1, 1, 1), 1, (0, 0, 0))],
)
def test_conv3d_matches_torch(kernel, stride, padding, channels_last):
    """oneDNN = F.conv3d up to rounding in either layout, also through autograd; the output keeps x's layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 5, 9, 9, generator=g)
    x = (x.contiguous(memory_format=CHANNELS_LAST) if channels_last else x).requires_grad_()
    w = (torch.randn(4, 6, *kernel, generator=g) / 10).requires_grad_()
    b = torch.randn(4, generator=g)
    stride3 = (stride,) * 3
    y = conv3d(x, w, b, stride3, padding)
    ref = F.conv3d(x, w, b, stride3, padding)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=CHANNELS_LAST if channels_last else torch.contiguous_format)
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


def test_layout_of_follows_channels_last_tensors_and_their_slices():
    x = torch.randn(1, 8, 3, 4, 4)
    assert layout_of(x) == torch.contiguous_format
    cl = activation_layout(x)  # float32 on a CPU with oneDNN: channels-last
    assert cl.is_contiguous(memory_format=CHANNELS_LAST) and torch.equal(cl, x)
    assert layout_of(cl) == layout_of(cl[:, 2:5]) == layout_of(cl[..., 1:3, :]) == CHANNELS_LAST
    assert activation_layout(x.double()) is not None and layout_of(activation_layout(x.double())) == torch.contiguous_format


def test_cache_keeps_its_storage_from_chunk_to_chunk():
    """Without autograd a same-shaped entry is copied into the previous entry's storage (its heap place stays),
    never aliasing the chunk; with autograd every entry is a fresh copy."""
    cache, owner = TemporalCache(), torch.nn.Identity()
    chunk = torch.randn(1, 4, 5, 3, 3).contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        cache.keep(owner, chunk[:, :, -2:])
        first = cache.get(owner)
        assert first.untyped_storage().data_ptr() != chunk.untyped_storage().data_ptr()
        assert layout_of(first) == CHANNELS_LAST and torch.equal(first, chunk[:, :, -2:])
        chunk2 = torch.randn(1, 4, 5, 3, 3).contiguous(memory_format=CHANNELS_LAST)
        cache.keep(owner, chunk2[:, :, -2:])
        assert cache.get(owner) is first and torch.equal(first, chunk2[:, :, -2:])
        chunk2.zero_()
        assert not torch.equal(first, chunk2[:, :, -2:])  # a copy, not a view of the chunk
        cache.keep(owner, chunk2[:, :, -1:])  # another shape: a new entry
        assert cache.get(owner) is not first and cache.get(owner).shape[2] == 1
    frames = torch.randn(1, 4, 1, 3, 3, requires_grad=True)
    cache.keep(owner, frames)
    assert cache.get(owner).requires_grad and cache.get(owner).grad_fn is not None


def test_vae_runs_channels_last_on_cpu_and_returns_plain_tensors():
    """Convolution weights are laid out once (in place), every 3-D activation is channels-last, outputs plain;
    tiled and untiled agree bitwise."""
    vae = _tiny()
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__, layout_of(args[0]), layout_of(out)))

    for layer in list(vae.encoder.mid) + list(vae.decoder.up1) + [vae.encoder.down1[1]]:
        layer.register_forward_hook(record)
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 17, 32, 32, generator=g) * 2 - 1
    z = vae.encode(video)
    assert z.is_contiguous()
    weight = vae.encoder.conv_out.conv.weight
    assert weight.is_contiguous(memory_format=CHANNELS_LAST)
    assert vae.encoder.down1[0].weight.is_contiguous(memory_format=torch.channels_last)
    frames = vae.decode(z)
    assert layout_of(frames) == torch.contiguous_format  # (the first frame dropped: a slice of a plain tensor)
    assert seen and all(fmt_in == fmt_out == CHANNELS_LAST for _, fmt_in, fmt_out in seen), seen
    vae.use_tiling = True
    assert torch.equal(vae.encode(video), z) and torch.equal(vae.decode(z), frames)
    # the layout is kept across calls: weights are not converted again
    data = weight.data_ptr()
    vae.encode(video)
    assert vae.encoder.conv_out.conv.weight.data_ptr() == data


def test_release_host_memory_returns_freed_heap_pages():
    """glibc keeps freed small blocks in its heap; trimming returns their pages (the tiled VAE calls it per chunk)."""
    import psutil

    assert not release_host_memory(torch.empty(2**22, device="meta"))  # accelerator/meta tensors: nothing to do
    assert not release_host_memory(torch.empty(1024))  # a small activation: not worth a trim
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each, below glibc's mmap threshold: heap
    keep = blocks[-1]  # pins the top of the heap, so only trimming (not the heap shrinking) can return pages
    del blocks
    before = psutil.Process().memory_info().rss
    assert release_host_memory(torch.empty(2**21))  # 8 MiB
    freed = before - psutil.Process().memory_info().rss
    assert freed > 100 * 2**20, freed / 2**20
    assert keep.sum() == 16 * 1024
