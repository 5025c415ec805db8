"""Runtime patches of megatron-core per backend; the only place third-party code is patched.

``apply(backend)`` applies the backend's pre-import patches, imports ``megatron.core`` and applies the
post-import ones. It is idempotent and logged; ``restore()`` undoes everything. Never applied at import
time: ``mm.ops.select_backend`` calls it once per process.
"""

from __future__ import annotations

import importlib
import logging
import warnings

from megatron_patches.patch import Patch, apply_patches, disabled, is_patch_applied, restore

logger = logging.getLogger("megatron_patches")

_applied_backends: set[str] = set()


def patches_for(backend: str) -> list[Patch]:
    if backend not in ("cpu", "cuda", "npu"):
        raise ValueError(f"backend must be one of cpu, cuda, npu; got {backend!r}")
    return list(importlib.import_module(f"megatron_patches.{backend}").PATCHES)


def is_applied(backend: str) -> bool:
    return backend in _applied_backends


def apply(backend: str) -> list[str]:
    """Apply the patch set of ``backend``; returns the names applied by this call."""
    patches = patches_for(backend)
    done = apply_patches(patches, phase="pre_import")
    import megatron.core  # noqa: F401  (after the pre-import patches)

    if backend == "cpu":
        from megatron_patches.cpu import VERIFIED_MEGATRON

        if megatron.core.__version__.split("+")[0] != VERIFIED_MEGATRON:
            warnings.warn(
                f"cpu megatron patches were verified on megatron-core {VERIFIED_MEGATRON}, "
                f"found {megatron.core.__version__}; run tests/unit/test_megatron_patches.py"
            )
    done += apply_patches(patches, phase="post_import")
    _applied_backends.add(backend)
    if done:  # one line at INFO; each patch (target, reason) at DEBUG
        logger.info("megatron-core %s: applied %d %s patches (%s)", megatron.core.__version__, len(done), backend,
                    ", ".join(done))
    return done


__all__ = ["Patch", "apply", "restore", "disabled", "is_applied", "is_patch_applied", "patches_for"]
