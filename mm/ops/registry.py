"""Backend selection and the kernel registry (ARCHITECTURE.md principle 3).

One backend (``cpu`` reference, ``cuda``, ``npu``) is chosen once per process, *before* megatron-core
is imported, because two of them (cpu, npu) must patch megatron at import time. ``auto`` picks cuda if
an accelerator of type cuda is present, else npu if ``torch_npu`` is installed, else cpu. Asking for a
backend that is not installed raises ``BackendUnavailableError``; there is no silent fallback.

Kernels hold no parameters, so checkpoint keys are the same on every backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("cpu", "cuda", "npu")
KERNELS = ("attention", "rms_norm", "layer_norm", "apply_rope")
# kernels only some backends provide; asking for a missing one is an error naming the backend
OPTIONAL_KERNELS = ("attention_block", "attention_block_backward")
ENV_VAR = "MM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run in this process (library or device missing)."""


@dataclass(frozen=True)
class Backend:
    """What the rest of the code needs to know about the selected backend."""

    name: str
    device_type: str
    dist_backend: str
    kernels: dict[str, Callable] = field(repr=False, compare=False)
    describe_device: Callable[[torch.device], str] = field(repr=False, compare=False, default=lambda d: str(d))

    def device(self, index: int | None = None) -> torch.device:
        if self.device_type == "cpu" or index is None:
            return torch.device(self.device_type)
        return torch.device(self.device_type, index)

    def local_device(self) -> torch.device:
        """This process's device: ``cuda:LOCAL_RANK`` / ``npu:LOCAL_RANK`` (torchrun sets LOCAL_RANK), or ``cpu``."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK", "0")
        if not local.isdigit():
            raise ValueError(f"LOCAL_RANK must be a non-negative integer, got {local!r}")
        return self.device(int(local))

    def device_name(self) -> str:
        """Marketing name of this process's device (e.g. ``NVIDIA H100 80GB HBM3``), for the MFU peak table."""
        return self.describe_device(self.local_device())

    def kernel_table(self) -> dict[str, str]:
        """``{kernel name: implementing function}`` for the start-up summary."""
        return {k: f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}" for k, fn in self.kernels.items()}


_selected: Backend | None = None


def _accelerator_type() -> str | None:
    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available():
        return None
    return acc.current_accelerator().type


def available_backends() -> list[str]:
    names = ["cpu"]
    if _accelerator_type() == "cuda":
        names.append("cuda")
    if importlib.util.find_spec("torch_npu") is not None:
        names.append("npu")
    return names


def resolve_backend_name(name: str | None) -> str:
    """Turn ``None``/``auto``/an explicit name into a concrete backend name, validating it."""
    name = (name or os.environ.get(ENV_VAR) or "auto").lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    avail = available_backends()
    if name == "auto":
        for cand in ("cuda", "npu", "cpu"):
            if cand in avail:
                return cand
    if name not in avail:
        why = {
            "cuda": "no CUDA device is visible to torch (torch.accelerator reports none)",
            "npu": "torch_npu is not installed (see README: NPU extras)",
        }[name]
        raise BackendUnavailableError(f"backend {name!r} requested but unavailable: {why}; available: {avail}")
    return name


def backend_module(name: str):
    """The module implementing backend ``name`` (``mm.ops.reference`` for cpu)."""
    return importlib.import_module(f"mm.ops.{'reference' if name == 'cpu' else name}")


def _load_kernels(module) -> dict[str, Callable]:
    kernels = module.kernels()
    missing = set(KERNELS) - set(kernels)
    assert not missing, f"backend {module.__name__} lacks kernels {missing}"
    return kernels


def select_backend(name: str | None = None, *, patch_megatron: bool = True) -> Backend:
    """Select the process-wide backend (idempotent for the same name).

    Must run before ``import megatron.core`` when the backend patches megatron (cpu, npu); a late call
    raises instead of leaving megatron half-patched.
    """
    global _selected
    resolved = resolve_backend_name(name)
    if _selected is not None:
        if resolved != _selected.name:
            raise RuntimeError(f"backend already selected as {_selected.name!r}; cannot switch to {resolved!r}")
        return _selected
    if patch_megatron:
        import megatron_patches

        if "megatron.core" in sys.modules and not megatron_patches.is_applied(resolved):
            needs = [p.name for p in megatron_patches.patches_for(resolved) if p.phase == "pre_import"]
            if needs:
                raise RuntimeError(
                    f"megatron.core was imported before backend {resolved!r} was selected; "
                    f"select the backend first (pre-import patches: {needs})"
                )
        megatron_patches.apply(resolved)
    dist = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[resolved]
    module = backend_module(resolved)
    _selected = Backend(resolved, resolved, dist, _load_kernels(module), module.device_name)
    logger.info("backend %s selected (dist %s)", resolved, dist)
    return _selected


def current_backend() -> Backend:
    """The selected backend; selects from ``$MM_BACKEND`` (default ``auto``) on first use."""
    return _selected if _selected is not None else select_backend()


def kernel(name: str) -> Callable:
    backend = current_backend()
    if name not in backend.kernels and name in OPTIONAL_KERNELS:
        raise BackendUnavailableError(
            f"kernel {name!r} (ring attention block with log-sum-exp) is not implemented for backend "
            f"{backend.name!r}; ring / hybrid context parallelism needs it (cpu, cuda and npu have it), use "
            "--context-parallel-algo ulysses_cp_algo on this one")
    return backend.kernels[name]
