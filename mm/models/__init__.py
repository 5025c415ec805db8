"""Models: SUV denoiser, WFVAE, frozen text encoders.

Exports are lazy so that importing one model does not import the others (the VAE and text encoders
need no megatron). Importing the SUV selects the backend first (``$MM_BACKEND``, default ``auto``),
because megatron-core must be patched before it is imported on cpu/npu.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SparseUMMDiT": "mm.models.sparse_ummdit",
    "WFVAE": "mm.models.wfvae",
    "T5TextEncoder": "mm.models.text_encoders",
    "CLIPTextEncoder": "mm.models.text_encoders",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mm.models' has no attribute {name!r}")
    if name == "SparseUMMDiT":
        from mm.ops import current_backend

        current_backend()
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = list(_EXPORTS)
