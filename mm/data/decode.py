"""Reading pixels: videos with PyAV (decord when installed and asked for), images with PIL (spec §8.3).

Readers return ``uint8`` tensors ``[T, H, W, C]`` (RGB) and raise ``SampleError`` for every kind of bad
input (missing file, container or stream that does not decode, fewer frames than the index promised,
unreadable image), never a library-specific exception.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Sequence

import numpy as np
import torch

from mm.data.errors import SampleError

logger = logging.getLogger(__name__)


def decord_available() -> bool:
    return importlib.util.find_spec("decord") is not None


def resolve_video_backend(reader_type: str) -> str:
    """``DataConfig.video_reader_type`` -> ``"pyav"`` or ``"decord"``."""
    if reader_type in ("pyav", "av"):
        return "pyav"
    if reader_type == "decord":
        if not decord_available():
            raise ValueError("video_reader_type='decord' but decord is not installed; "
                             "use one of ('auto', 'decoder', 'pyav')")
        return "decord"
    if reader_type in ("auto", "decoder"):
        return "decord" if decord_available() else "pyav"
    raise ValueError(f"video_reader_type must be one of ('auto', 'decoder', 'pyav', 'av', 'decord'), "
                     f"got {reader_type!r}")


def _read_pyav(path: str, indices: Sequence[int]) -> np.ndarray:
    import av

    wanted = sorted(set(int(i) for i in indices))
    last = wanted[-1]
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SampleError("corrupt_video", path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            pos = 0
            want = set(wanted)
            # sequential decode: frame numbers are exact (no pts arithmetic, robust to VFR streams)
            for frame in container.decode(stream):
                if pos in want:
                    got[pos] = frame.to_ndarray(format="rgb24")
                if pos >= last:
                    break
                pos += 1
    except SampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        if not got:
            raise SampleError("corrupt_video", path, f"{type(e).__name__}: {e}") from e
        logger.debug("decode of %s stopped early: %s", path, e)
    if len(got) < len(wanted):
        raise SampleError("too_few_frames", path, f"decoded {len(got)} of {len(wanted)} needed frames "
                          f"(last needed index {last})")
    return np.stack([got[int(i)] for i in indices])


def _read_decord(path: str, indices: Sequence[int]) -> np.ndarray:
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError and RuntimeError variants
        raise SampleError("corrupt_video", path, f"{type(e).__name__}: {e}") from e
    if max(indices) >= len(vr):
        raise SampleError("too_few_frames", path, f"{len(vr)} frames, needed index {max(indices)}")
    try:
        return vr.get_batch(list(int(i) for i in indices)).asnumpy()
    except Exception as e:
        raise SampleError("corrupt_video", path, f"{type(e).__name__}: {e}") from e


def read_video(path: str, indices: Sequence[int], backend: str = "pyav") -> torch.Tensor:
    """Frames ``indices`` (source frame numbers, any order, repeats allowed) -> uint8 ``[T, H, W, C]``."""
    if len(indices) == 0:
        raise ValueError("read_video needs at least one frame index, got []")
    if not os.path.isfile(path):
        raise SampleError("missing_file", path)
    arr = _read_decord(path, indices) if backend == "decord" else _read_pyav(path, indices)
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_image(path: str) -> torch.Tensor:
    """An image file -> uint8 ``[1, H, W, C]`` RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise SampleError("missing_file", path)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleError("unreadable_image", path, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(arr.copy()).unsqueeze(0)
