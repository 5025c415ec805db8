"""T2V -> I2V conversion: a text-to-video SUV checkpoint (any layout :func:`checkpoint_tools.cli.open_checkpoint`
reads) -> a released flat file in the I2V layout of :mod:`mm.models.conditioning`.

Every tensor is copied unchanged except ``patch_embed.proj.weight [D, C, p, p]``, which is widened to
``[D, 2C + ft, p, p]`` with the new input channels zero, so the converted model computes exactly the T2V
velocity until I2V training moves those weights (upstream v1.3 does the same with zero-initialised extra
embeddings: ``opensora/models/diffusion/opensora_v1_3/modeling_inpaint.py``). The model JSON that loads it adds
``"conditioning": {"type": "i2v", "mask_channels": ft}`` to its predictor block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_tools.keyspace import CheckpointError, weights_group
from mm.models.conditioning import I2VConditioning, widen_patch_embed

PATCH_KEY = "patch_embed.proj.weight"


def t2v_to_i2v(load: str, save: str, *, mask_channels: int, ema: bool | None = None) -> dict:
    """Convert; returns ``{"tensors", "group", "in_channels", "save"}``. Raises CheckpointError on a checkpoint that
    is already I2V-wide or has no patch embedding."""
    from checkpoint_tools.cli import open_checkpoint

    conditioning = I2VConditioning(mask_channels=mask_channels)
    if Path(save).suffix not in (".pt", ".safetensors"):
        raise CheckpointError(f"--save {save}: allowed a .pt or .safetensors file (a released flat state dict)")
    src = open_checkpoint(load)
    try:
        group = weights_group(src, ema)
        keys = src.keys(group)
        if PATCH_KEY not in keys:
            raise CheckpointError(f"{load}: no {PATCH_KEY} (not an SUV checkpoint with its first pipeline stage)")
        state = {k: src.read(group, k) for k in keys}
    finally:
        src.close()
    weight = state[PATCH_KEY]
    C = weight.shape[1]
    out_channels = state["proj_out.weight"].shape[0] // (weight.shape[2] * weight.shape[3])
    if C != out_channels:
        raise CheckpointError(f"{load}: patch_embed takes {C} channels but proj_out gives {out_channels}: already "
                              "an I2V checkpoint (or not a T2V SUV one)")
    state[PATCH_KEY] = widen_patch_embed(weight, conditioning)
    Path(save).parent.mkdir(parents=True, exist_ok=True)
    if save.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, save)
    else:
        torch.save(state, save)
    return {"tensors": len(state), "group": group, "in_channels": conditioning.input_channels(C), "save": save}
