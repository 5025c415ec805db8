"""Shape/behaviour config of the SUV denoiser (``SparseUMMDiT``), spec §2.1.

``SUVConfig`` is validated in ``__post_init__`` (ValueError naming field, value and the accepted range).
``SUVConfig.from_upstream`` reads the upstream model JSON's ``"predictor"`` block through an explicit key
table; ``released_suv_config()`` and ``tiny_suv_config()`` are the presets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from mm.config import check, check_choice, check_positive
from mm.models.conditioning import I2VConditioning

ACTIVATIONS = ("gelu-approximate", "gelu")

# upstream predictor key -> SUVConfig field (identity names); keys accepted but not used are listed apart.
_UPSTREAM_KEYS = (
    "num_layers", "sparse_n", "double_ff", "sparse1d", "num_heads", "head_dim", "in_channels", "out_channels",
    "timestep_embed_dim", "caption_channels", "pooled_projection_dim", "skip_connection",
    "skip_connection_zero_init", "dropout", "attention_bias", "patch_size", "patch_size_t", "activation_fn",
    "norm_elementwise_affine", "norm_eps", "interpolation_scale_t", "interpolation_scale_h",
    "interpolation_scale_w", "conditioning",
)
# Accepted and ignored: where the weights come from is the caller's business (``from_upstream(checkpoint=)``).
_IGNORED_UPSTREAM_KEYS = ("from_pretrained",)
# Accepted only at the value v1.5 uses (anything else would change the architecture).
_FIXED_UPSTREAM_KEYS = {"model_id": "SparseUMMDiT", "norm_cls": "layer_norm", "explicit_uniform_rope": False}


@dataclass
class SUVConfig:
    """SUV denoiser shapes. Defaults are the released v1.5 values (spec §2.1)."""

    num_layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 6, 4, 2])  # blocks per U stage
    sparse_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2, 1])  # skiparse k per stage
    sparse1d: bool = True  # False: every stage dense (k = 1), weights unchanged
    double_ff: bool = True  # separate text FFN (ff_enc); v1.5 only supports True here
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 32
    out_channels: int = 32
    timestep_embed_dim: int = 1024  # sinusoid width == conditioning width Dt
    caption_channels: int = 2048
    pooled_projection_dim: int = 1280
    skip_connection: bool = True
    skip_connection_zero_init: bool = True
    dropout: float = 0.0
    attention_bias: bool = True
    patch_size: int = 2
    patch_size_t: int = 1
    activation_fn: str = "gelu-approximate"
    # Accepted for upstream compatibility and ignored: every LayerNorm has weight and bias (spec §12.1).
    # Not part of equality (the train and inference JSONs disagree on it for the same weights).
    norm_elementwise_affine: bool = field(default=True, compare=False)
    norm_eps: float = 1e-6
    interpolation_scale_t: float = 1.0
    interpolation_scale_h: float = 1.0
    interpolation_scale_w: float = 1.0
    # None: text-to-video; I2VConditioning: [noisy ; masked cond latents ; mask] input (mm.models.conditioning)
    conditioning: I2VConditioning | None = None

    def __post_init__(self):
        self.conditioning = I2VConditioning.parse(self.conditioning)
        self.num_layers = list(self.num_layers)
        self.sparse_n = list(self.sparse_n)
        n = self.num_layers
        check(len(n) % 2 == 1 and len(n) >= 1, "num_layers", n, "a list of odd length (encoder, middle, decoder)")
        check(all(isinstance(v, int) and v >= 2 and v % 2 == 0 for v in n), "num_layers", n,
              "even integers >= 2 (single-skip / group-skip pairs)")
        check(len(self.sparse_n) == len(n), "sparse_n", self.sparse_n, f"a list of {len(n)} entries (one per stage)")
        check(all(isinstance(v, int) and v >= 1 for v in self.sparse_n), "sparse_n", self.sparse_n, "integers >= 1")
        for f in ("sparse1d", "double_ff", "skip_connection", "skip_connection_zero_init", "attention_bias",
                  "norm_elementwise_affine"):
            check(isinstance(getattr(self, f), bool), f, getattr(self, f), "True or False")
        check(self.double_ff, "double_ff", self.double_ff, "True (the shared-FFN variant is not part of v1.5)")
        check(self.skip_connection, "skip_connection", self.skip_connection,
              "True (the released U-shaped model has long skips)")
        for f in ("num_heads", "head_dim", "in_channels", "out_channels", "timestep_embed_dim", "caption_channels",
                  "pooled_projection_dim", "patch_size"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, v, "an integer > 0")
        check(self.head_dim % 16 == 0, "head_dim", self.head_dim, "a multiple of 16 (3-D RoPE split 4:6:6, spec §2.5)")
        check(self.timestep_embed_dim % 2 == 0, "timestep_embed_dim", self.timestep_embed_dim, "an even integer")
        check(self.patch_size_t == 1, "patch_size_t", self.patch_size_t, "1 (v1.5 patchifies frame by frame)")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "[0, 1)")
        check_choice("activation_fn", self.activation_fn, ACTIVATIONS)
        check_positive("norm_eps", self.norm_eps)
        for f in ("interpolation_scale_t", "interpolation_scale_h", "interpolation_scale_w"):
            check_positive(f, getattr(self, f))

    # ------------------------------------------------------------------ derived
    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_in_channels(self) -> int:
        """Channels the patch embedding takes (``in_channels``, or the I2V layout's ``2C + ft``)."""
        c = self.in_channels
        return c if self.conditioning is None else self.conditioning.input_channels(c)

    @property
    def num_stages(self) -> int:
        return len(self.num_layers)

    @property
    def num_blocks(self) -> int:
        return sum(self.num_layers)

    def effective_sparse_n(self) -> list[int]:
        """Per-stage skiparse k actually used: all 1 when ``sparse1d`` is off."""
        return list(self.sparse_n) if self.sparse1d else [1] * len(self.sparse_n)

    def validate_tp(self, tp_size: int) -> None:
        """Tensor parallelism splits whole heads (spec §3.2)."""
        check(isinstance(tp_size, int) and tp_size >= 1 and self.num_heads % tp_size == 0, "tensor_model_parallel_size",
              tp_size, f"a divisor of num_heads={self.num_heads}")

    # ------------------------------------------------------------------ upstream adapter
    @classmethod
    def from_upstream(cls, config: str | os.PathLike | Mapping[str, Any]) -> "SUVConfig":
        """From an upstream model JSON path (with a ``"predictor"`` block) or the predictor dict itself."""
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        if not isinstance(config, Mapping):
            raise ValueError(f"SUV config must be a JSON path or a dict, got {type(config).__name__}")
        pred = config.get("predictor", config)
        if not isinstance(pred, Mapping):
            raise ValueError(f"'predictor' must be a dict, got {type(pred).__name__}")
        kwargs = {}
        for key, value in pred.items():
            if key in _UPSTREAM_KEYS:
                kwargs[key] = value
            elif key in _IGNORED_UPSTREAM_KEYS or key.startswith("_"):  # "_class_name" etc. of a diffusers config
                continue
            elif key in _FIXED_UPSTREAM_KEYS:
                check(value == _FIXED_UPSTREAM_KEYS[key], f"predictor.{key}", value, repr(_FIXED_UPSTREAM_KEYS[key]))
            else:
                allowed = sorted(_UPSTREAM_KEYS + _IGNORED_UPSTREAM_KEYS + tuple(_FIXED_UPSTREAM_KEYS))
                raise ValueError(f"unknown upstream predictor key {key!r}={value!r}: allowed keys {allowed}")
        return cls(**kwargs)

    def to_upstream(self) -> dict[str, Any]:
        """The predictor dict (round-trips through ``from_upstream``)."""
        out = {"model_id": "SparseUMMDiT", **dataclasses.asdict(self)}
        if self.conditioning is None:  # a T2V dict stays the upstream one
            del out["conditioning"]
        return out


def released_suv_config() -> SUVConfig:
    """The released v1.5.0 predictor (8.5B parameters)."""
    return SUVConfig()


def tiny_suv_config() -> dict[str, Any]:
    """A tiny predictor dict (same structure as the release: 7 stages, skiparse up to k=4) for tests/demos."""
    return {
        "model_id": "SparseUMMDiT",
        "num_layers": [2, 2, 2, 2, 2, 2, 2],
        "sparse_n": [1, 2, 4, 4, 4, 2, 1],
        "double_ff": True,
        "sparse1d": True,
        "num_heads": 2,
        "head_dim": 16,
        "in_channels": 4,
        "out_channels": 4,
        "timestep_embed_dim": 32,
        "caption_channels": 32,
        "pooled_projection_dim": 16,
        "skip_connection": True,
        "skip_connection_zero_init": True,
        "dropout": 0.0,
        "attention_bias": True,
        "patch_size": 2,
        "patch_size_t": 1,
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": True,
        "norm_eps": 1e-6,
    }
