"""The ``npu`` patch set: activate MindSpeed's megatron adaptor, from this one place.

MindSpeed (Ascend) must be imported before megatron-core: ``torch_npu.contrib.transfer_to_npu``
redirects cuda calls to npu globally and ``mindspeed.megatron_adaptor`` patches megatron for HCCL,
fused kernels and the NPU optimizer. Both are optional extras (README: NPU).
"""

import importlib

from megatron_patches.patch import Patch


def _import(module: str):
    def build(_original):
        return importlib.import_module(module)

    return build


PATCHES = [
    Patch("transfer_to_npu", "sys.modules:torch_npu.contrib.transfer_to_npu", _import("torch_npu.contrib.transfer_to_npu"),
          "torch_npu's cuda->npu redirect must precede megatron", phase="pre_import"),
    Patch("mindspeed_adaptor", "sys.modules:mindspeed.megatron_adaptor", _import("mindspeed.megatron_adaptor"),
          "MindSpeed patches megatron-core for NPU (HCCL, fused ops, optimizer)", phase="pre_import"),
]
