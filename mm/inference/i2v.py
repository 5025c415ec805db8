"""Image-to-video inputs of inference: which images a prompt is conditioned on, reading them as training reads
frames, and the DiT's extra input channels (layout: :mod:`mm.models.conditioning`).

* ``--image PATH`` conditions every prompt on its first frame, ``--image PATH --last-image PATH`` on its first
  and last frames (transition); a prompt file line ``prompt<TAB>image[<TAB>last_image]`` sets them per prompt
  (relative paths are taken from the prompt file's folder) and wins over the flags.
* Images are decoded to RGB and centre-crop-resized + normalised with the training transforms
  (:func:`mm.data.transforms.center_crop_resize`, :func:`mm.data.transforms.ae_norm`).
* Conditioning latents: the WFVAE encodes the clip ``[first, x, ..., x]`` of ``num_frames`` frames, ``x`` the
  last image (transition) or the first; latent frame 0 is the first image's latent exactly (causal encoder),
  the last latent frame in transition mode is the latent of the last image held still over the last ``ft``
  frames, which is what training cut from the clip's own latents when the clip ends on that frame. Only the
  given latent frames survive :func:`mm.models.conditioning.conditioning_channels`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mm.data.transforms import ae_norm, center_crop_resize
from mm.models.conditioning import check_frames, conditioning_channels, latent_mask


@dataclass(frozen=True)
class ImageCondition:
    """The images one prompt is conditioned on (``first`` None: text only)."""

    first: str | None = None
    last: str | None = None

    def __post_init__(self):
        if self.last is not None and self.first is None:
            raise ValueError(f"a last image ({self.last}) needs a first image (--image): transition conditioning "
                             "takes both frames")
        for p in (self.first, self.last):
            if p is not None and not os.path.isfile(p):
                raise ValueError(f"conditioning image {p!r} does not exist")

    @property
    def mode(self) -> str:
        return "none" if self.first is None else "first" if self.last is None else "transition"

    def sidecar(self) -> dict:
        """Paths and SHA-256 prefixes of the images, for the sample's JSON sidecar."""
        from mm.inference.pipeline import sha256_prefix

        out = {"conditioning": self.mode}
        for name, p in (("image", self.first), ("last_image", self.last)):
            if p is not None:
                out[name] = os.path.abspath(p)
                out[f"{name}_sha256"] = sha256_prefix(p)
        return out


def split_prompt_images(prompts: Sequence[str], image: str | None = None, last_image: str | None = None,
                        base_dir: str | os.PathLike | None = None) -> tuple[list[str], list[ImageCondition]]:
    """``prompt[<TAB>image[<TAB>last_image]]`` lines -> (prompts, one :class:`ImageCondition` each); prompts
    without columns take ``image`` / ``last_image`` (the CLI flags). ValueError on a bad line or image."""
    if last_image is not None and image is None:
        raise ValueError("--last-image needs --image (transition conditioning takes the first and the last frame)")
    base = Path(base_dir) if base_dir is not None else Path(".")
    texts, conds = [], []
    for n, line in enumerate(prompts, start=1):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) > 3 or not cols[0] or any(not c for c in cols[1:]):
            raise ValueError(f"prompt {n} {line!r}: allowed 'prompt', 'prompt<TAB>image' or "
                             "'prompt<TAB>image<TAB>last_image' (no empty columns)")
        paths = [c if os.path.isabs(c) else str(base / c) for c in cols[1:]]
        if paths:
            conds.append(ImageCondition(paths[0], paths[1] if len(paths) > 1 else None))
        else:
            conds.append(ImageCondition(image, last_image))
        texts.append(cols[0])
    return texts, conds


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image file -> ``[3, height, width]`` float in [-1, 1], cropped and resized as training frames are."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"conditioning image {path!r} cannot be read as an image: {err}") from None
    frame = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W] in [0, 1]
    return ae_norm(center_crop_resize(frame, (height, width)))[0]


def check_request(conds: Sequence[ImageCondition], conditioning, num_frames: int) -> None:
    """Before anything is built: images only for an I2V model, and frame counts that can carry the modes."""
    used = [c for c in conds if c.first is not None]
    if used and conditioning is None:
        raise ValueError(f"conditioning image {used[0].first!r} given but the predictor has no I2V conditioning "
                         "(add \"conditioning\": {\"type\": \"i2v\"} and I2V weights: "
                         "python -m checkpoint_tools to-i2v)")
    if conditioning is not None:
        from mm.models.wfvae import SCALE_FACTOR

        if conditioning.mask_channels != SCALE_FACTOR[0]:
            raise ValueError(f"predictor conditioning.mask_channels={conditioning.mask_channels}: allowed the WFVAE's "
                             f"temporal compression {SCALE_FACTOR[0]}")
        for c in used:
            check_frames(num_frames, c.mode, conditioning.mask_channels)


def check_checkpoint_channels(checkpoint: str | None, suv_config) -> None:
    """A released flat DiT file whose patch embedding does not take the JSON's input channels (a T2V file with an
    I2V JSON or the reverse) is refused before anything is built."""
    if not checkpoint or not os.path.isfile(checkpoint):
        return
    key = "patch_embed.proj.weight"
    if checkpoint.endswith(".safetensors"):  # read the header only, not the tensors
        from safetensors import safe_open

        with safe_open(checkpoint, "pt") as f:
            shape = f.get_slice(key).get_shape() if key in f.keys() else None
    else:  # memory-mapped: nothing but the one tensor is read
        from mm.models.sparse_ummdit import load_upstream_checkpoint

        weight = load_upstream_checkpoint(checkpoint).get(key)
        shape = None if weight is None else tuple(weight.shape)
    want = suv_config.patch_in_channels
    if shape is not None and shape[1] != want:
        hint = ("convert it: python -m checkpoint_tools to-i2v" if suv_config.conditioning is not None
                else "an I2V checkpoint needs \"conditioning\": {\"type\": \"i2v\"} in the predictor block")
        raise ValueError(f"DiT checkpoint {checkpoint}: patch_embed takes {shape[1]} input channels, the "
                         f"predictor config {want} ({hint})")


@torch.no_grad()
def condition_channels(vae, conds: Sequence[ImageCondition], num_frames: int, height: int, width: int,
                       mask_channels: int, device) -> torch.Tensor:
    """One :class:`ImageCondition` per sample -> the DiT's extra input ``[B, C + ft, t, h, w]`` (fp32)."""
    latents = []
    for c in conds:
        if c.first is None:
            latents.append(None)
            continue
        first = load_image(c.first, height, width)
        rest = load_image(c.last, height, width) if c.last is not None else first
        clip = torch.stack([first] + [rest] * (num_frames - 1), dim=1)  # [3, T, H, W]
        latents.append(vae.encode(clip[None].to(device=device, dtype=vae.dtype))[0].float())
    shape = next((z.shape for z in latents if z is not None), None)
    if shape is None:  # no image in the batch: T2V mode, all zero
        ft, fh, fw = vae.vae_scale_factor
        shape = (vae.config.latent_dim, 1 + (num_frames - 1) // ft, height // fh, width // fw)
    z = torch.stack([torch.zeros(shape, device=device) if v is None else v for v in latents])
    mask = latent_mask([c.mode for c in conds], num_frames, mask_channels)
    return conditioning_channels(z, mask)


def pipeline_condition(pipeline, images: Sequence[ImageCondition] | None, batch: int, cfg) -> torch.Tensor | None:
    """The extra DiT input for a batch of ``batch`` prompts: None for a T2V predictor (which takes no image),
    the I2V channels otherwise (all-zero "none" mode for prompts without an image)."""
    conditioning = pipeline.dit.suv_config.conditioning
    images = list(images) if images is not None else [ImageCondition()] * batch
    if len(images) != batch:
        raise ValueError(f"need one ImageCondition per prompt: {batch} prompts, {len(images)} given")
    check_request(images, conditioning, cfg.num_frames)
    if conditioning is None:
        return None
    return condition_channels(pipeline.vae, images, cfg.num_frames, cfg.height, cfg.width,
                              conditioning.mask_channels, pipeline.device)
