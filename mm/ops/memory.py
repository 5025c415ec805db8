"""Device-agnostic memory statistics of this process: peak allocator bytes on an accelerator, RSS on the host.

The accelerator numbers come from ``torch.accelerator`` (cuda and npu alike); on the cpu backend there is no
caching allocator, so only the resident set size of the process is reported.
"""

from __future__ import annotations

import math

import psutil
import torch


def peak_memory(device: torch.device) -> dict[str, float]:
    """``{"peak_allocated_gib", "peak_reserved_gib", "rss_gib"}`` of this process; the first two are NaN on the
    cpu (no device allocator)."""
    rss = psutil.Process().memory_info().rss / 2**30
    if device.type == "cpu":
        return {"peak_allocated_gib": math.nan, "peak_reserved_gib": math.nan, "rss_gib": rss}
    index = device.index if device.index is not None else torch.accelerator.current_device_index()
    return {"peak_allocated_gib": torch.accelerator.max_memory_allocated(index) / 2**30,
            "peak_reserved_gib": torch.accelerator.max_memory_reserved(index) / 2**30, "rss_gib": rss}
