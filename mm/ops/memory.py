"""Device-agnostic memory statistics of this process (peak allocator bytes on an accelerator, RSS on the host)
and the release of freed host memory between the steps of a long computation (the WFVAE's blocks).

The accelerator numbers come from ``torch.accelerator`` (cuda and npu alike); on the cpu backend there is no
caching allocator, so only the resident set size of the process is reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


# below this activation size a trim is not worth its cost: it walks every free block of the heap (measured:
# about 13 ms per call with 10,000 free blocks), and small activations leave small holes
TRIM_MIN_BYTES = 8 * 2**20


def release_host_memory(activation: torch.Tensor) -> bool:
    """Return the host heap's free pages to the OS (glibc ``malloc_trim(0)``) after a step that produced
    ``activation``; True if it ran.

    glibc keeps freed memory in its heap for reuse. A network that frees and allocates activations of
    changing sizes (the WFVAE's blocks, chunk after chunk) leaves holes in that heap which stay resident, so
    the peak resident set grows with the number of chunks although the live tensors do not. Runs only for
    CPU activations of at least ``TRIM_MIN_BYTES``; a no-op for accelerator tensors (their caching
    allocators do not use the host heap) and with other C libraries (the peak is then as the allocator
    leaves it).
    """
    if activation.device.type != "cpu" or activation.nbytes < TRIM_MIN_BYTES:
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
