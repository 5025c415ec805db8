"""``TE_DType``: torch dtype -> the kernels' output-type enum (``transformer_engine_torch.DType``)."""

import torch

from transformer_engine_torch import DType

TE_DType = {torch.float32: DType.kFloat32, torch.float16: DType.kFloat16, torch.bfloat16: DType.kBFloat16}
