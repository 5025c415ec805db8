"""The one exception a sample load raises for bad input (spec §8.3 "errors ... retry"; issue: bad input
never kills a run). The dataset catches it, replaces the sample and reports ``reason``."""

from __future__ import annotations

REASONS = ("missing_file", "corrupt_video", "too_few_frames", "unreadable_image", "bad_crop", "decode_error")


class SampleError(Exception):
    """A sample cannot be loaded; ``reason`` is one of ``REASONS``, ``detail`` is free text."""

    def __init__(self, reason: str, path: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.path = path
        self.detail = detail
