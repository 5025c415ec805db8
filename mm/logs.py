"""One logging set-up for every entry point: the same line format and timestamp, rank-aware, quiet libraries.

* format ``2026-01-31 12:00:00 [rank 0] INFO mm.train: ...`` everywhere (``setup_logging``); megatron's
  iteration line drops the colon after the name (``PARSEABLE_FORMAT``) for upstream's log parsers;
* rank 0 logs at ``MM_LOG_LEVEL`` (default INFO), the other ranks warnings and errors only;
* megatron's INFO chatter (the per-parameter bucket dump, config dumps) is shown only with
  ``MM_LOG_LEVEL=DEBUG``;
* library warnings (Python ``warnings`` and library loggers) are printed by rank 0 only, each distinct
  message once; our own warnings (``mm.*``) are never deduplicated or hidden.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
# megatron's iteration line (``extra={"parseable": True}``): no colon after the name, so the line has exactly the
# two colons of megatron's own timestamp before its fields and upstream's ``awk -F ':' '{print$5}'`` finds the ms
PARSEABLE_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
OURS = ("mm", "megatron_patches", "__main__")
CHATTY = ("megatron",)  # INFO-level dumps that drown a log


class _Formatter(logging.Formatter):
    """``FORMAT``, or ``PARSEABLE_FORMAT`` for a record logged with ``extra={"parseable": True}``."""

    def __init__(self, rank: int):
        super().__init__(FORMAT.format(rank=rank), DATEFMT)
        self.parseable = logging.Formatter(PARSEABLE_FORMAT.format(rank=rank), DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        return self.parseable.format(record) if getattr(record, "parseable", False) else super().format(record)


class _LibraryOnce(logging.Filter):
    """Drop repeats of a library's message (ours always pass)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OURS:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_logging(stream=None) -> int:
    """Configure the root logger for this process (idempotent); returns the global rank."""
    rank = int(os.environ.get("RANK", "0"))
    level = os.environ.get("MM_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"MM_LOG_LEVEL={level!r}: allowed DEBUG, INFO, WARNING, ERROR")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter(rank))
    handler.addFilter(_LibraryOnce())
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_mm_handler", False)]:
        root.removeHandler(h)
    handler._mm_handler = True
    root.addHandler(handler)
    root.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    if level != "DEBUG":
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python warnings -> the "py.warnings" logger, deduplicated above
    if rank != 0:  # library warnings once, from rank 0 (the other ranks repeat the same ones)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers sets its own level on import
        for name in ("py.warnings", "transformers", "megatron", "torch"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return rank
