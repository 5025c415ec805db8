"""Build the model parts from a parsed upstream JSON (``mm.config_upstream.ModelSpec``).

Shared by the trainer, the inference pipeline, the feature extractor and the demo, so that "what a
model JSON means" lives in one place. Frozen parts (WFVAE, T5, CLIP) run in their own dtype; the SUV is
built with the given TP layout and, when a released checkpoint is given, loads this rank's TP slices.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from mm.config_upstream import ModelSpec

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _existing(path: str | None, what: str) -> str | None:
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def build_vae(spec: ModelSpec, dtype: str | None = None, checkpoint: str | None = None, device=None):
    """Frozen WFVAE in ``dtype`` (default: the JSON's ``ae.dtype``)."""
    from mm.models.wfvae import WFVAE

    cfg = spec.vae_config()
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    ckpt = _existing(checkpoint if checkpoint is not None else spec.ae_checkpoint, "WFVAE checkpoint (ae.from_pretrained)")
    if ckpt is None:
        logger.warning("no WFVAE checkpoint given (ae.from_pretrained is empty): using a randomly initialised VAE")
    return WFVAE.from_upstream(cfg, ckpt, device=device)


def build_text_encoders(spec: ModelSpec, dtype: str | None = None, device=None):
    """Frozen (T5, CLIP) from the local directories named in the JSON."""
    from mm.models.text_encoders import CLIPTextEncoder, T5TextEncoder

    dt = torch_dtype(dtype or spec.weight_dtype)
    if not spec.text.t5 or not spec.text.clip:
        raise ValueError("the model JSON must name text_encoder.from_pretrained (T5) and "
                         "text_encoder_2.from_pretrained (CLIP) directories")
    t5 = T5TextEncoder.from_pretrained(spec.text.t5, dtype=dt, max_length=spec.text.t5_max_length, device=device,
                                       tokenizer_directory=spec.text.t5_tokenizer)
    clip = CLIPTextEncoder.from_pretrained(spec.text.clip, dtype=dt, device=device,
                                           tokenizer_directory=spec.text.clip_tokenizer)
    return t5, clip


def build_suv(spec: ModelSpec, parallel=None, params_dtype: torch.dtype = torch.float32,
              checkpoint: str | None = None, device=None, **chunk):
    """The SUV denoiser for this rank's TP layout on ``device`` (default: the parallel state's, else cpu);
    ``checkpoint`` = a released flat (TP-merged) state dict. ``chunk``: ``SparseUMMDiT`` keywords of a
    pipeline chunk (``block_range``, ``pipeline_replica``, ``init_seed``; ``mm.distributed.pipeline``)."""
    from mm.models.sparse_ummdit import SparseUMMDiT, load_upstream_checkpoint, load_upstream_state_dict

    if device is None:
        device = getattr(parallel, "device", None) or torch.device("cpu")
    if checkpoint is None:
        return SparseUMMDiT(spec.suv_config(), parallel, params_dtype, device=device, **chunk)
    state = load_upstream_checkpoint(_existing(checkpoint, "SUV checkpoint"))
    # no random init of what the checkpoint overwrites: build on meta, allocate, load this rank's slices
    model = SparseUMMDiT(spec.suv_config(), parallel, params_dtype, device="meta", **chunk)
    model.to_empty(device=device)
    load_upstream_state_dict(model, state)
    logger.info("loaded released SUV weights from %s", checkpoint)
    return model
