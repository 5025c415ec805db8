"""The ``npu`` patch set: megatron-core 0.19 on Ascend NPUs *without* MindSpeed's megatron adaptor.

No MindSpeed release pairs with megatron-core 0.19 (its branches track core 0.12.x), so
``mindspeed.megatron_adaptor`` is not imported. Instead:

* ``transfer_to_npu`` (pre-import): torch_npu's own redirect of ``torch.cuda.*`` / ``"cuda"`` devices /
  NCCL to ``torch.npu`` / ``"npu"`` / HCCL, so megatron's ~200 CUDA call sites address the NPU;
* ``npu_type_names``: megatron's optimizers compare ``param.type()`` with ``'torch.cuda.*Tensor'`` names
  and raise on ``'torch.npu.*Tensor'``; for megatron callers the npu names are reported as cuda ones
  (MindSpeed's adaptor does the same);
* from the cpu set, the two patches that are about the *install*, not the device: the stub for the
  unguarded ``import triton`` (no triton on Ascend) and the no-apex/no-TE distributed-optimizer resume
  fixes (conditional on megatron's own ``HAVE_APEX_OR_TE``).

The kernels come from torch_npu (``mm/ops/npu.py``). Unverified on hardware in this repository: the
first NPU run is ``make device-check`` (README: Ascend NPU).
"""

from __future__ import annotations

import functools
import importlib

from megatron_patches.cpu import PATCHES as _CPU
from megatron_patches.patch import Patch, called_from_megatron


def _import(module: str):
    def build(_original):
        return importlib.import_module(module)

    return build


def _npu_type_names(original):
    @functools.wraps(original)
    def wrapper(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None or kwargs:
            return original(self, dtype, non_blocking, **kwargs)
        name = original(self)
        return name.replace("torch.npu.", "torch.cuda.") if called_from_megatron() else name

    return wrapper


_FROM_CPU = ("paged_stash_stub", "torch_adamw_distopt_ckpt.")

PATCHES = [
    Patch("transfer_to_npu", "sys.modules:torch_npu.contrib.transfer_to_npu", _import("torch_npu.contrib.transfer_to_npu"),
          "torch_npu's cuda->npu redirect must precede megatron", phase="pre_import"),
    *[p for p in _CPU if p.name.startswith(_FROM_CPU)],
    Patch("npu_type_names", "torch:Tensor.type", _npu_type_names,
          "megatron's optimizers accept only 'torch.cuda.*Tensor' param.type() names"),
]
