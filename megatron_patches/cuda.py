"""The ``cuda`` patch set: empty. megatron-core runs on CUDA as shipped.

The no-apex/no-TE distributed-optimizer resume fix (cpu P7) also applies to a CUDA install without
Transformer Engine or apex; it is conditional on megatron's own ``HAVE_APEX_OR_TE`` flag.
"""

from megatron_patches.cpu import PATCHES as _CPU

PATCHES = [p for p in _CPU if p.name.startswith("torch_adamw_distopt_ckpt.")]
