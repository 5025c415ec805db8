"""WF-VAE-M, the 8x8x8 wavelet-flow video VAE of Open-Sora Plan v1.5 (spec §4).

``WFVAE.from_upstream(config, checkpoint, device)`` builds the model from the upstream "ae" JSON block
and loads the released weights (any of the released layouts, strict keys). The model is a frozen
pre-stage: ``encode`` maps a video in [-1, 1] to normalised latents (spec §4.6), ``decode`` maps them
back; both run in the VAE's own dtype (``config.dtype``: fp32 for training-time encoding, fp16/bf16 for
decoding) whatever the caller's dtype.

Temporal tiling (``vae.use_tiling``) streams the video through the networks in chunks with exact
per-layer left context (``mm.models.vae_streaming``): tiled == untiled for every valid length,
including T = 1. Optional spatial tiling (``vae.use_spatial_tiling``) trades exactness for memory at
high resolution (``mm.models.vae_spatial_tiling``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm.models.vae_layers import match_weight_layout
from mm.models.vae_spatial_tiling import SpatialTile, TileBlender, plan_tiles
from mm.models.vae_streaming import Stream, TemporalCache, decoder_chunks, encoder_chunks
from mm.models.wfvae_coders import RGB, Decoder, Encoder

logger = logging.getLogger(__name__)

# Per-channel latent statistics of the released model (spec §4.6); ``scale`` multiplies (1/std).
LATENT_SCALE = (
    0.7031, 0.7109, 1.5391, 1.2969, 0.7109, 1.4141, 1.3828, 2.1719, 1.7266, 1.8281, 1.9141, 1.2031,
    0.6875, 0.9609, 1.6484, 1.1875, 1.5312, 1.1328, 0.8828, 0.6836, 0.8828, 0.9219, 1.6953, 1.4453,
    1.5312, 0.6836, 0.7656, 0.8242, 1.2344, 1.0312, 1.7266, 0.9492,
)  # fmt: skip
LATENT_SHIFT = (
    -0.2129, 0.1226, 1.6328, 0.6211, -0.8750, 0.6172, -0.5703, 0.1348, -0.2178, -0.9375, 0.3184, 0.3281,
    -0.0544, -0.1826, -0.2812, 0.4355, 0.1621, -0.2578, 0.7148, -0.7422, -0.2295, -0.2324, -1.4922, 0.6328,
    1.1250, -0.2578, -2.1094, 1.0391, 1.1797, -1.2422, -0.2988, -0.9570,
)  # fmt: skip

SCALE_FACTOR = (8, 8, 8)  # (t, h, w) compression
LOGVAR_RANGE = (-30.0, 20.0)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# upstream "ae" keys whose only supported value is the released one (spec §4.1); upstream typo kept
_UPSTREAM_FIXED = {
    "l1_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l1_downsample_wavelet": "HaarWaveletTransform3D",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l1_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l1_upsample_wavelet": "InverseHaarWaveletTransform3D",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
    "norm_type": "layernorm",
    "t_interpolation": "trilinear",
    "vae_scale_factor": list(SCALE_FACTOR),
}
_UPSTREAM_IGNORED = ("model_id", "from_pretrained")


@dataclass(frozen=True)
class WFVAEConfig:
    """WFVAE hyper-parameters; the defaults are the released WF-VAE-M (spec §4.1)."""

    base_channels: int = 160
    latent_dim: int = 32
    encoder_num_resblocks: int = 2
    decoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 128
    decoder_energy_flow_hidden_size: int = 128
    connect_res_layer_num: int = 1
    use_attention: bool = True
    dropout: float = 0.0
    scale: tuple[float, ...] = LATENT_SCALE
    shift: tuple[float, ...] = LATENT_SHIFT
    dtype: str = "fp32"
    # temporal tiling: exact, so on by default; chunk lengths after the first frame / latent (the decoder
    # also computes one look-ahead latent per chunk as far as its upsamplers need it; 2 keeps the chunk
    # activations below upstream's, which decodes 2 + 1 latents per chunk)
    use_tiling: bool = True
    encode_chunk_frames: int = 8
    decode_chunk_latents: int = 2
    # spatial tiling (beyond upstream): tile and overlap in pixels; 3/8 of 256 px covers the released
    # decoder's 82 px receptive radius, so the defaults are exact (mm.models.vae_spatial_tiling)
    use_spatial_tiling: bool = False
    spatial_tile_size: int = 512
    spatial_tile_overlap: int = 256

    def __post_init__(self) -> None:
        for name in (
            "base_channels",
            "latent_dim",
            "encoder_num_resblocks",
            "decoder_num_resblocks",
            "encoder_energy_flow_hidden_size",
            "decoder_energy_flow_hidden_size",
            "decode_chunk_latents",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("connect_res_layer_num", self.connect_res_layer_num, minimum=0)
        for name in ("use_attention", "use_tiling", "use_spatial_tiling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"WFVAEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"WFVAEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "shift", tuple(float(v) for v in self.shift))
        for name in ("scale", "shift"):
            values = getattr(self, name)
            if len(values) != self.latent_dim or not all(math.isfinite(v) for v in values):
                raise ValueError(
                    f"WFVAEConfig.{name} must hold latent_dim={self.latent_dim} finite values, got {len(values)}"
                )
        if any(v == 0.0 for v in self.scale):
            raise ValueError(f"WFVAEConfig.scale values must be non-zero (they multiply), got {self.scale}")
        if self.dtype not in DTYPES:
            raise ValueError(f"WFVAEConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _check_int("encode_chunk_frames", self.encode_chunk_frames, minimum=8)
        if self.encode_chunk_frames % 8:
            raise ValueError(
                f"WFVAEConfig.encode_chunk_frames must be a multiple of 8 (8, 16, ...), got {self.encode_chunk_frames}"
            )
        _check_int("spatial_tile_size", self.spatial_tile_size, minimum=16)
        _check_int("spatial_tile_overlap", self.spatial_tile_overlap, minimum=0)
        if self.spatial_tile_size % 8 or self.spatial_tile_overlap % 8:
            raise ValueError(
                "WFVAEConfig.spatial_tile_size and spatial_tile_overlap must be multiples of 8, got "
                f"{self.spatial_tile_size} and {self.spatial_tile_overlap}"
            )
        if self.spatial_tile_overlap >= self.spatial_tile_size:
            raise ValueError(
                f"WFVAEConfig.spatial_tile_overlap must be in [0, spatial_tile_size={self.spatial_tile_size}), "
                f"got {self.spatial_tile_overlap}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_upstream_dict(cls, ae: Mapping[str, Any]) -> WFVAEConfig:
        """Read the upstream "ae" block (spec §4.1 keys, e.g. ``l1_dowmsample_block``).

        Architecture-selecting keys must name the released blocks; ``model_id`` and
        ``from_pretrained`` are ignored (the checkpoint is passed explicitly); unknown keys are errors.
        Our own field names (chunk sizes, spatial tiling) are accepted too. Missing keys take the
        released values.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in ae.items():
            if key in _UPSTREAM_IGNORED:
                continue
            if key in _UPSTREAM_FIXED:
                if value != _UPSTREAM_FIXED[key]:
                    raise ValueError(
                        f"unsupported WFVAE ae.{key}={value!r}; this implementation supports only "
                        f"{_UPSTREAM_FIXED[key]!r} (the released 8x8x8 WF-VAE-M)"
                    )
                continue
            if key not in fields:
                accepted = sorted(fields | set(_UPSTREAM_FIXED) | set(_UPSTREAM_IGNORED))
                raise ValueError(f"unknown WFVAE ae key {key!r}; accepted keys: {accepted}")
            kwargs[key] = tuple(value) if key in ("scale", "shift") else value
        return cls(**kwargs)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"WFVAEConfig.{name} must be an int >= {minimum}, got {value!r}")


def released_wfvae_config() -> dict[str, Any]:
    """The upstream "ae" block of the released v1.5 model (``model_opensoraplan1_5.json``), fp32."""
    return {
        "model_id": "wfvae",
        "base_channels": 160,
        "connect_res_layer_num": 1,
        "decoder_energy_flow_hidden_size": 128,
        "decoder_num_resblocks": 2,
        "dropout": 0.0,
        "encoder_energy_flow_hidden_size": 128,
        "encoder_num_resblocks": 2,
        **_UPSTREAM_FIXED,
        "vae_scale_factor": list(SCALE_FACTOR),
        "latent_dim": 32,
        "scale": list(LATENT_SCALE),
        "shift": list(LATENT_SHIFT),
        "use_attention": True,
        "use_tiling": True,
        "dtype": "fp32",
    }


def tiny_wfvae_config() -> dict[str, Any]:
    """A small "ae" block for tests and the tiny demo: same structure and 32-channel latents, base width 8."""
    return {
        **released_wfvae_config(),
        "base_channels": 8,
        "encoder_num_resblocks": 1,
        "decoder_num_resblocks": 1,
        "encoder_energy_flow_hidden_size": 8,
        "decoder_energy_flow_hidden_size": 8,
        "connect_res_layer_num": 1,
    }


def unwrap_upstream_state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The VAE state dict inside a released checkpoint object, and the layout's name (spec §4.8).

    Non-empty ``ema_state_dict`` (leading ``module.`` stripped) wins; else ``state_dict["gen_model"]``
    or ``state_dict``; else the object is the flat state dict.
    """
    ema = obj.get("ema_state_dict")
    if isinstance(ema, Mapping) and len(ema) > 0:
        return {key.removeprefix("module."): value for key, value in ema.items()}, "ema_state_dict"
    if "state_dict" in obj:
        inner = obj["state_dict"]
        if isinstance(inner, Mapping) and "gen_model" in inner:
            return dict(inner["gen_model"]), "state_dict.gen_model"
        return dict(inner), "state_dict"
    return dict(obj), "flat"


def read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Load a released VAE file (``.ckpt``/``.pt`` torch pickle or ``.safetensors``) and unwrap it."""
    if isinstance(checkpoint, Mapping):
        return unwrap_upstream_state_dict(checkpoint)
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise ValueError(f"WFVAE checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu"), "flat"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the message of torch's unpickler names the offending global
        raise ValueError(f"cannot read WFVAE checkpoint {path!r} as tensors only: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"WFVAE checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    return unwrap_upstream_state_dict(obj)


def _read_config(config: Any) -> WFVAEConfig:
    if isinstance(config, WFVAEConfig):
        return config
    source = "dict"
    if isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
        with open(source, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, Mapping) or "ae" not in config:
            raise ValueError(f"upstream model JSON {source!r} has no 'ae' block")
    if not isinstance(config, Mapping):
        raise ValueError(f"WFVAE config must be a JSON path, an 'ae' dict or a WFVAEConfig, got {type(config).__name__}")
    ae = config["ae"] if "ae" in config else config
    logger.debug("WFVAE config from %s", source)
    return WFVAEConfig.from_upstream_dict(ae)


class WFVAE(nn.Module):
    """The 8x8x8 WFVAE: Haar-wavelet energy-flow encoder/decoder, posterior, latent normalisation."""

    def __init__(self, config: WFVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(
            latent_dim=config.latent_dim,
            base_channels=config.base_channels,
            num_resblocks=config.encoder_num_resblocks,
            energy_flow_hidden_size=config.encoder_energy_flow_hidden_size,
            use_attention=config.use_attention,
            dropout=config.dropout,
        )
        self.decoder = Decoder(
            latent_dim=config.latent_dim,
            base_channels=config.base_channels,
            num_resblocks=config.decoder_num_resblocks,
            energy_flow_hidden_size=config.decoder_energy_flow_hidden_size,
            connect_res_layer_num=config.connect_res_layer_num,
            use_attention=config.use_attention,
            dropout=config.dropout,
        )
        # not in the released state dict: they come from the config
        self.register_buffer("latent_scale", torch.empty(config.latent_dim), persistent=False)
        self.register_buffer("latent_shift", torch.empty(config.latent_dim), persistent=False)
        self._reset_latent_stats()
        self.use_tiling = config.use_tiling
        self.use_spatial_tiling = config.use_spatial_tiling
        # who runs a decode chunk's spatial tiles: None = this process, every tile in order; else a callable
        # (num_tiles, run_tile(k) -> output, blend(outputs in tile order) -> chunk) -> chunk
        self.tile_executor = None
        self.to(config.torch_dtype)

    def _reset_latent_stats(self, device: torch.device | None = None) -> None:
        device = device if device is not None else self.latent_scale.device
        dtype = self.latent_scale.dtype
        self.latent_scale = torch.tensor(self.config.scale, dtype=dtype, device=device)
        self.latent_shift = torch.tensor(self.config.shift, dtype=dtype, device=device)

    @classmethod
    def from_upstream(
        cls,
        config: str | os.PathLike | Mapping[str, Any] | WFVAEConfig,
        checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> WFVAE:
        """Build from the upstream model JSON (path, whole dict or its "ae" block), load weights, freeze.

        ``checkpoint``: the released file (or an already loaded object) in any released layout; loading
        is strict after unwrapping (a missing or unexpected key raises ``ValueError`` naming it).
        ``device`` defaults to cpu; ``"meta"`` builds without allocating. The result is in eval mode,
        ``requires_grad_(False)``, in ``config.dtype``.
        """
        cfg = _read_config(config)
        target = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta" if checkpoint is not None else target):
            model = cls(cfg)
        if checkpoint is not None:
            state, layout = read_checkpoint(checkpoint)
            model.load_released_state_dict(state)
            model._reset_latent_stats(torch.device("cpu"))  # the meta build left them unallocated
            logger.info("WFVAE: loaded %d tensors (%s layout)", len(state), layout)
        model.to(device=target, dtype=cfg.torch_dtype)
        model.requires_grad_(False)
        return model.eval()

    def load_released_state_dict(self, state: Mapping[str, Any]) -> None:
        """Strictly load a flat state dict (keys of spec §4.8); tensors are assigned, not copied."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"WFVAE checkpoint keys do not match: missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"WFVAE checkpoint tensor {key!r} has shape {got}, expected {tuple(expected[key].shape)}")
        self.load_state_dict(state, strict=True, assign=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.conv.weight.device

    @property
    def vae_scale_factor(self) -> tuple[int, int, int]:
        return SCALE_FACTOR

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (t, h, w) of a valid video size: ``((T - 1) // 8 + 1, H // 8, W // 8)``."""
        _check_video_size(num_frames, height, width)
        return (num_frames - 1) // SCALE_FACTOR[0] + 1, height // SCALE_FACTOR[1], width // SCALE_FACTOR[2]

    # ---------------------------------------------------------------- encode

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, latent, (T-1)/8 + 1, H/8, W/8).

        ``sample=False`` returns the posterior mean, ``True`` a sample ``mean + std * eps`` (eps from
        ``generator``). Runs and returns in the VAE dtype.
        """
        mean, logvar = self.encode_posterior(video)
        z = self.sample_posterior(mean, logvar, generator) if sample else mean
        return self.normalise_latents(z)

    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, T, H, W) in [-1, 1] -> the raw (un-normalised) posterior ``(mean, logvar)``.

        Each is (B, latent, (T-1)/8 + 1, H/8, W/8); ``logvar`` is clamped to [-30, 20] (spec §4.6).
        Differentiable (``encode`` is this under ``no_grad`` plus sampling and normalisation); used by
        ``mm.training.vae_fit``. Runs and returns in the VAE dtype.
        """
        _check_tensor("video", _detached(video), RGB)
        _check_video_size(*video.shape[2:])
        video = video.to(device=self.device, dtype=self.dtype)
        match_weight_layout(self.encoder, video)
        moments = self._encode_moments(video)
        mean, logvar = moments.chunk(2, dim=1)  # [B, 2*latent, t, h, w] -> [B, latent, t, h, w] each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample_posterior(
        mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A posterior sample ``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)`` drawn from ``generator``."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def normalise_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> normalised ``(z - shift) * scale`` with the config's per-channel values (spec §4.6)."""
        return (z - _per_channel(self.latent_shift)) * _per_channel(self.latent_scale)

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (mean ‖ logvar), streamed in temporal chunks / spatial tiles when enabled."""
        num_frames, height, width = x.shape[2:]
        chunks = encoder_chunks(num_frames, self.config.encode_chunk_frames) if self.use_tiling else [(0, num_frames)]
        tiles = self._spatial_tiles(height // SCALE_FACTOR[1], width // SCALE_FACTOR[2])
        # one stream for the latent part (and the local part when untiled), one per spatial tile
        streams = [Stream(TemporalCache()) if self.use_tiling else None for _ in range(1 + len(tiles))]
        moments = []
        for start, end in chunks:
            frames = x[:, :, start:end]
            if not tiles:
                h = self.encoder.forward_local(frames, streams[0])
            else:
                blender = TileBlender(height // SCALE_FACTOR[1], width // SCALE_FACTOR[2], self._latent_overlap, 1)
                for tile, stream in zip(tiles, streams[1:]):
                    rows, cols = tile.slices(SCALE_FACTOR[1])
                    blender.add(tile, self.encoder.forward_local(frames[..., rows, cols], stream))
                h = blender.result()
            moments.append(self.encoder.forward_latent(h, streams[0]))
        return torch.cat(moments, dim=2).contiguous()  # plain layout for the caller

    # ---------------------------------------------------------------- decode

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, latent, t, h, w) -> video (B, 3, 8(t-1) + 1, 8h, 8w), in the VAE dtype."""
        _check_tensor("latents", z, self.config.latent_dim)
        z = z.to(device=self.device, dtype=self.dtype)
        return self.decode_latents(z / _per_channel(self.latent_scale) + _per_channel(self.latent_shift))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) latents (B, latent, t, h, w) -> video (B, 3, 8(t-1) + 1, 8h, 8w).

        Differentiable (``decode`` is this under ``no_grad`` after de-normalising); used by
        ``mm.training.vae_fit``. Runs and returns in the VAE dtype.
        """
        _check_tensor("latents", _detached(z), self.config.latent_dim)
        z = z.to(device=self.device, dtype=self.dtype)
        match_weight_layout(self.decoder, z)
        return self._decode_frames(z)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output, streamed in latent chunks (one look-ahead latent) / spatial tiles when enabled."""
        batch, _, num_latents, height, width = z.shape
        frames = (num_latents - 1) * SCALE_FACTOR[0] + 1
        if self.use_tiling:
            chunks = decoder_chunks(num_latents, self.config.decode_chunk_latents)
        else:
            chunks = [(0, num_latents, 0)]
        tiles = self._spatial_tiles(height, width)
        caches = [TemporalCache() for _ in range(1 + len(tiles))] if self.use_tiling else None
        if len(chunks) == 1:
            out = None  # return the decoder's output as is instead of copying it
        else:
            out = z.new_empty(batch, RGB, frames, height * SCALE_FACTOR[1], width * SCALE_FACTOR[2])
        written = 0
        for start, end, lookahead in chunks:
            streams = [Stream(cache, lookahead) for cache in caches] if caches else [None] * (1 + len(tiles))
            h, l2 = self.decoder.forward_latent(z[:, :, start : end + lookahead], streams[0])
            if not tiles:
                chunk = self.decoder.forward_local(h, l2, streams[0])
            else:
                def run_tile(k: int) -> torch.Tensor:
                    tile = tiles[k]  # the level-2 band is at 2x latent resolution
                    return self.decoder.forward_local(h[(..., *tile.slices(1))], l2[(..., *tile.slices(2))],
                                                      streams[1 + k])

                def blend(outputs) -> torch.Tensor:  # outputs: an iterable in tile order (consumed lazily)
                    blender = TileBlender(height, width, self._latent_overlap, SCALE_FACTOR[1])
                    for tile, y in zip(tiles, outputs):
                        blender.add(tile, y)
                    return blender.result()

                if self.tile_executor is None:
                    chunk = blend(run_tile(k) for k in range(len(tiles)))
                else:  # e.g. tiles spread over ranks (mm.distributed.parallel_decode)
                    chunk = self.tile_executor(len(tiles), run_tile, blend)
            if out is None:
                assert chunk.shape[2] == frames, (chunk.shape, frames)
                return chunk
            out[:, :, written : written + chunk.shape[2]] = chunk  # the decoder dropped the look-ahead frames
            written += chunk.shape[2]
            del h, l2, chunk  # free this chunk's activations before the next one is computed
        assert written == frames, (written, frames)
        return out

    @property
    def _latent_overlap(self) -> int:
        return self.config.spatial_tile_overlap // SCALE_FACTOR[1]

    def _spatial_tiles(self, height: int, width: int) -> list[SpatialTile]:
        """Tiles of a latent grid, or ``[]`` when spatial tiling is off or the grid fits one tile."""
        tile = self.config.spatial_tile_size // SCALE_FACTOR[1]
        if not self.use_spatial_tiling or max(height, width) <= tile:
            return []
        return plan_tiles(height, width, tile, self._latent_overlap)


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, 1, 1, 1)


def _detached(x: Any) -> Any:
    """The input checks read values only; reading them from a tensor that requires grad warns."""
    return x.detach() if isinstance(x, torch.Tensor) else x


def _check_tensor(name: str, x: Any, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"WFVAE {name} must be a 5-D tensor (B, C, T, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"WFVAE {name} must be floating point, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"WFVAE {name} must have {channels} channels (dim 1), got {x.shape[1]}")
    if min(x.shape) < 1:
        raise ValueError(f"WFVAE {name} must be non-empty, got shape {tuple(x.shape)}")
    # min/max propagate NaN and expose inf without a video-sized temporary (isfinite allocates two)
    if x.device.type != "meta" and not all(math.isfinite(v) for v in torch.aminmax(x)):
        raise ValueError(f"WFVAE {name} must be finite; got NaN or inf values")


def _check_video_size(num_frames: int, height: int, width: int) -> None:
    if num_frames < 1 or (num_frames - 1) % SCALE_FACTOR[0]:
        raise ValueError(f"WFVAE video frames T must be 8n+1 (1, 9, 17, 25, ...), got T={num_frames}")
    for name, value in (("H", height), ("W", width)):
        if value < 8 or value % 8:
            raise ValueError(f"WFVAE video {name} must be a positive multiple of 8 (8, 16, 24, ...), got {name}={value}")
