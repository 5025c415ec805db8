"""Analytic FLOP count of the SUV denoiser (accounts for Skiparse sparsity), throughput and MFU.

Matmul FLOPs = 2·m·n·k. Per block with ``Lv`` video and ``Lt`` text tokens, width ``D``, FFN ``4D``:

* projections: q/k/v + out for both streams: ``2·4·(Lv+Lt)·D²``;
* FFNs (``double_ff``: one per stream, no sharing): ``2·2·(Lv+Lt)·D·4D``;
* joint attention with sparsity ``k``: ``k`` sub-batches of ``Lv'/k + Lt`` tokens (``Lv'`` = Lv padded to a
  multiple of k²) each: ``QKᵀ`` and ``PV`` = ``2·2·k·(Lv'/k + Lt)²·D``;
* adaLN GEMMs: ``2·2·Dt·6D`` per sample (tiny).

Training counts forward + backward = 3 x forward (recomputation is not counted: model FLOPs, not
hardware FLOPs). Peak FLOP/s for MFU come from ``--peak-tflops`` or ``PEAK_TFLOPS``, a table of known
accelerators (H100/H200/H800/H20, A100/A800, Ascend 910B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Dense (no 2:4 sparsity) bf16 peak TFLOP/s per device, from the vendors' data sheets. Matched against the
# device name (``torch.cuda.get_device_name`` / ``torch_npu.npu.get_device_name``) in this order, first
# match wins, so the PCIe/NVL variants come before the SXM default of their family.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H200": 989.0,  # SXM ("NVIDIA H200"); same tensor cores as H100 SXM
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,  # SXM4 and PCIe
    "A800": 312.0,
    "910B": 313.0,  # Ascend 910B ("Ascend910B2", ...): one figure for the family; pass --peak-tflops for a variant
}


def peak_tflops_for(device_name: str) -> float | None:
    """Peak bf16 TFLOP/s of a device by its name (case and spaces ignored), or None if not in the table."""
    key = device_name.replace(" ", "").lower()
    for pattern, tflops in PEAK_TFLOPS.items():
        if pattern.replace(" ", "").lower() in key:
            return tflops
    return None


@dataclass(frozen=True)
class SUVShape:
    num_layers: tuple[int, ...]
    sparse_n: tuple[int, ...]
    hidden: int
    timestep_dim: int
    patch_size: int = 2
    patch_size_t: int = 1


def suv_block_flops(shape: SUVShape, latent_thw: tuple[int, int, int], text_len: int) -> list[float]:
    """Forward FLOPs of each block (global order) for one sample (also the pipeline cost model's unit)."""
    t, h, w = latent_thw
    lv = (t // shape.patch_size_t) * (h // shape.patch_size) * (w // shape.patch_size)
    d, lt = shape.hidden, text_len
    out = []
    for n_blocks, k in zip(shape.num_layers, shape.sparse_n):
        lv_pad = math.ceil(lv / (k * k)) * k * k
        per_block = (
            2 * 4 * (lv + lt) * d * d
            + 2 * 2 * (lv + lt) * d * 4 * d
            + 2 * 2 * k * (lv_pad / k + lt) ** 2 * d
            + 2 * 2 * shape.timestep_dim * 6 * d
        )
        out += [per_block] * n_blocks
    return out


def suv_forward_flops(shape: SUVShape, latent_thw: tuple[int, int, int], text_len: int, batch: int = 1) -> float:
    return batch * sum(suv_block_flops(shape, latent_thw, text_len))


def train_flops(shape: SUVShape, latent_thw, text_len: int, batch: int) -> float:
    return 3.0 * suv_forward_flops(shape, latent_thw, text_len, batch)


def mfu(flops: float, seconds: float, num_devices: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (num_devices * peak_tflops * 1e12)
