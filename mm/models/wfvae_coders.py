"""The WFVAE energy-flow encoder and decoder networks (spec §4.4, §4.5).

The trunk works on all Haar coefficients; the low-frequency (LLL) band is decomposed again at each
level and injected into the trunk by cheap "energy-flow" paths. The decoder mirrors it: side branches
predict level-2 and level-1 coefficients, each inverse transform is added into the LLL slot of the next
finer level, and the final coefficients are inverse-transformed to pixels. Stage containers are
``nn.ModuleList`` so keys read ``encoder.down1.0.weight`` etc. exactly as in the release (spec §4.8).

Both networks are split into a spatially *local* part (wavelets and convolutions only, at the
resolutions above the latent grid) and a *latent* part (the latent-resolution blocks with the mid
attention over the whole frame): spatial tiling (``mm.models.vae_spatial_tiling``) tiles only the local
part. Shapes below are for the released config (base 160, energy flow 128, latent 32) and a
(B, 3, 121, 576, 1024) video; every forward takes an optional ``Stream`` for exact temporal chunking
(``mm.models.vae_streaming``).
"""

from __future__ import annotations

import torch
from torch import nn

from mm.models.vae_layers import (
    AttentionBlock,
    CausalConv3d,
    CausalUpsample3D,
    ChannelLayerNorm,
    Downsample3D,
    FrameConv2d,
    ResnetBlock2D,
    ResnetBlock3D,
    activated_input,
)
from mm.models.vae_streaming import Stream
from mm.models.wavelet import HaarWaveletTransform3D, InverseHaarWaveletTransform3D
from mm.ops.conv3d import activation_layout
from mm.ops.memory import release_host_memory

RGB = 3
COEFFS = 24  # 8 Haar subbands x 3 colour channels


def _run(layers: nn.ModuleList, h: torch.Tensor, stream: Stream | None) -> tuple[torch.Tensor, Stream | None]:
    """Apply a stage; returns its output and the stream at the output frame rate.

    After each block with a large output the host heap's freed pages go back to the OS (``mm.ops.memory``):
    the blocks free and allocate activations of changing sizes, and without it the heap's holes raise the
    peak resident memory (a tiled 33x128x128 decode with the released widths, trimming after every block:
    232 MB instead of 295 MB at the same CPU time within 1%).
    """
    for layer in layers:
        h = layer(h, stream)
        release_host_memory(h)
        if stream is not None and isinstance(layer, CausalUpsample3D):
            stream = stream.upsampled()
    return h, stream


def _mid(channels_in: int, channels: int, channels_out: int, use_attention: bool, dropout: float) -> nn.ModuleList:
    layers = [ResnetBlock3D(channels_in, channels, dropout), ResnetBlock3D(channels, channels_out, dropout)]
    if use_attention:
        layers.insert(1, AttentionBlock(channels))
    return nn.ModuleList(layers)


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> moments [B, 2*latent, (T-1)//8 + 1, H/8, W/8] (mean ‖ logvar)."""

    def __init__(
        self,
        latent_dim: int,
        base_channels: int,
        num_resblocks: int,
        energy_flow_hidden_size: int,
        use_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        c1, c2, c4, ef = base_channels, 2 * base_channels, 4 * base_channels, energy_flow_hidden_size
        self.down1 = nn.ModuleList(
            [FrameConv2d(COEFFS, c1, kernel_size=3, padding=1)]
            + [ResnetBlock2D(c1, c1, dropout) for _ in range(num_resblocks)]
            + [Downsample3D(c1, c1)]
        )
        self.down2 = nn.ModuleList(
            [FrameConv2d(c1 + ef, c2, kernel_size=3, padding=1)]
            + [ResnetBlock3D(c2, c2, dropout) for _ in range(num_resblocks)]
            + [Downsample3D(c2, c2)]
        )
        self.connect_l1 = FrameConv2d(COEFFS, ef, kernel_size=3, padding=1)
        self.connect_l2 = FrameConv2d(COEFFS, ef, kernel_size=3, padding=1)
        self.mid = _mid(c2 + ef, c4, c4, use_attention, dropout)
        self.norm_out = ChannelLayerNorm(c4)
        self.conv_out = CausalConv3d(c4, 2 * latent_dim, kernel_size=3, padding=1)
        self.wavelet_transform_in = HaarWaveletTransform3D()
        self.wavelet_transform_l1 = HaarWaveletTransform3D()
        self.wavelet_transform_l2 = HaarWaveletTransform3D()

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.forward_latent(self.forward_local(x, stream), stream)

    def forward_local(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """The spatially local part (wavelets and convolutions down to latent resolution; tileable)."""
        coeffs = self.wavelet_transform_in(x, stream)  # [B, 24, 61, 288, 512]
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :RGB], stream)  # [B, 24, 31, 144, 256], LLL band again
        l2_coeffs = self.wavelet_transform_l2(l1_coeffs[:, :RGB], stream)  # [B, 24, 16, 72, 128]
        # the wavelets run on the plain layout; the convolutions in the device's activation layout
        coeffs, l1_coeffs, l2_coeffs = (activation_layout(c) for c in (coeffs, l1_coeffs, l2_coeffs))

        h, _ = _run(self.down1, coeffs, stream)  # [B, 160, 31, 144, 256]
        h = torch.cat([h, self.connect_l1(l1_coeffs)], dim=1)  # [B, 288, 31, 144, 256]
        h, _ = _run(self.down2, h, stream)  # [B, 320, 16, 72, 128]
        return torch.cat([h, self.connect_l2(l2_coeffs)], dim=1)  # [B, 448, 16, 72, 128]

    def forward_latent(self, h: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """The latent-resolution part: mid blocks (attention over the whole frame) and output head."""
        h, _ = _run(self.mid, activation_layout(h), stream)  # [B, 640, 16, 72, 128] (h: blended tiles or not)
        h = activated_input(self.norm_out, self.conv_out, h, stream)  # the mid output is freed here
        return self.conv_out.convolve(h)  # [B, 64, 16, 72, 128]


class Decoder(nn.Module):
    """Latents [B, latent, t, h, w] -> video [B, 3, 8(t-1) + 1, 8h, 8w].

    With a stream whose look-ahead is ``n`` latent frames, the output holds the committed latents'
    frames only (the look-ahead frames are computed as far as the upsamplers need them, then dropped).
    """

    def __init__(
        self,
        latent_dim: int,
        base_channels: int,
        num_resblocks: int,
        energy_flow_hidden_size: int,
        connect_res_layer_num: int,
        use_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        c1, c2, c4, ef = base_channels, 2 * base_channels, 4 * base_channels, energy_flow_hidden_size
        self.energy_flow_hidden_size = ef
        self.conv_in = CausalConv3d(latent_dim, c4, kernel_size=3, padding=1)
        self.mid = _mid(c4, c4, c4 + ef, use_attention, dropout)
        self.up2 = nn.ModuleList(
            [ResnetBlock3D(c4, c4, dropout) for _ in range(num_resblocks)]
            + [CausalUpsample3D(c4, c4), ResnetBlock3D(c4, c4 + ef, dropout)]
        )
        self.up1 = nn.ModuleList(
            [ResnetBlock3D(c4 if i == 0 else c2, c2, dropout) for i in range(num_resblocks)]
            + [CausalUpsample3D(c2, c2), ResnetBlock3D(c2, c2, dropout)]
        )
        self.layer = nn.ModuleList([ResnetBlock3D(c2, c1, dropout), ResnetBlock3D(c1, c1, dropout)])
        self.connect_l1 = nn.ModuleList(
            [ResnetBlock3D(ef, ef, dropout) for _ in range(connect_res_layer_num)]
            + [FrameConv2d(ef, COEFFS, kernel_size=3, padding=1)]
        )
        self.connect_l2 = nn.ModuleList(
            [ResnetBlock3D(ef, ef, dropout) for _ in range(connect_res_layer_num)]
            + [FrameConv2d(ef, COEFFS, kernel_size=3, padding=1)]
        )
        self.norm_out = ChannelLayerNorm(c1)
        self.conv_out = FrameConv2d(c1, COEFFS, kernel_size=3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()

    def forward(self, z: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return self.forward_local(*self.forward_latent(z, stream), stream)

    def forward_latent(self, z: torch.Tensor, stream: Stream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent-resolution part (mid attention over the whole frame) and the level-2 branch.

        Returns the trunk features and the reconstructed level-2 low band (3 channels, 2x resolution).
        """
        ef = self.energy_flow_hidden_size
        h = self.conv_in(activation_layout(z), stream)  # [B, 640, 16, 72, 128]
        h, _ = _run(self.mid, h, stream)  # [B, 768, 16, 72, 128]
        l2_coeffs, _ = _run(self.connect_l2, h[:, -ef:], stream)  # [B, 24, 16, 72, 128]
        # upstream applies the module named "..._l1" to the level-2 path (identical transforms, spec §4.5)
        l2 = self.inverse_wavelet_transform_l1(l2_coeffs, stream)  # [B, 3, 31, 144, 256]
        return h[:, :-ef], l2

    def forward_local(self, h: torch.Tensor, l2: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """The spatially local part (upsampling convolutions and wavelets to pixels; tileable)."""
        ef = self.energy_flow_hidden_size
        h, stream2 = _run(self.up2, h, stream)  # [B, 768, 31, 144, 256]
        l1_coeffs, _ = _run(self.connect_l1, h[:, -ef:], stream2)  # [B, 24, 31, 144, 256]
        l1_coeffs[:, :RGB] += _frames_like(l2, l1_coeffs)  # low band into the LLL slot, in place
        l1 = self.inverse_wavelet_transform_l2(l1_coeffs, stream2)  # [B, 3, 61, 288, 512]

        h, stream4 = _run(self.up1, h[:, :-ef], stream2)  # [B, 320, 61, 288, 512]
        h, _ = _run(self.layer, h, stream4)  # [B, 160, 61, 288, 512]
        h = activated_input(self.norm_out, self.conv_out, h)
        h = self.conv_out.convolve(h)  # [B, 24, 61, 288, 512]
        h[:, :RGB] += _frames_like(l1, h)
        out = self.inverse_wavelet_transform_out(h, stream4)  # [B, 3, 121, 576, 1024]
        lookahead = 2 * stream4.lookahead if stream4 is not None else 0  # the Haar pairs of look-ahead frames
        return out[:, :, : out.shape[2] - lookahead]


def _frames_like(band: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """A wavelet band cut to the trunk's frames: with a look-ahead, the band (an inverse Haar transform,
    2 frames per input frame) ends with one look-ahead frame more than the trunk, whose upsampler dropped it.
    """
    assert 0 <= band.shape[2] - trunk.shape[2] <= 1, (band.shape, trunk.shape)
    return band[:, :, : trunk.shape[2]]
