"""Dataset list (``data.txt``) and annotation records (spec §8.1).

``data.txt`` holds one dataset per line, ``<root_folder>,<annotation.json>``; blank lines and lines
starting with ``#`` are skipped. **Relative roots and annotation paths resolve against the directory of
the data.txt file** (absolute paths are used as they are), so a dataset folder can be moved or referred
to from any working directory. A sample's file is ``root_folder/record["path"]``.

An annotation file is a JSON list of records (``*.json``) or JSON Lines, one record per line
(``*.jsonl``); records hold ``path``, ``cap`` str or list, ``resolution`` {height, width}, ``num_frames``,
``fps``, ``cut``, ``crop``, ``aesthetic``/``aes``. Both are streamed (``iter_annotations``; a JSON list
through ijson), never loaded whole. Each record has an id inside its file: its position in a JSON list,
the byte offset of its line in JSON Lines (so a byte range of a file can be read on its own). Records are
parsed into ``Record``; a malformed record (or JSON line) yields a drop reason instead of an exception, so
one bad line never stops indexing (§8.2 step 1).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import ijson

logger = logging.getLogger(__name__)

# §12.24: upstream recognised images by ".jpg" only
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class DatasetSource:
    """One ``data.txt`` line, paths already resolved."""

    root: str
    annotation: str


@dataclass(frozen=True)
class Record:
    """One validated annotation record."""

    path: str                   # absolute file path (root joined)
    kind: str                   # "video" | "image"
    captions: tuple[str, ...]
    height: int                 # effective size: the crop box size when ``crop`` is given
    width: int
    num_frames: int             # frames from the clip start (videos; 1 for images)
    fps: float
    start_frame: int            # cut[0]
    crop: tuple[int, int, int, int] | None  # (x0, x1, y0, y1)
    aesthetic: float | None


def read_data_txt(path: str | os.PathLike) -> list[DatasetSource]:
    """Parse ``data.txt``; relative entries are resolved against its directory."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data.txt not found: {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.rsplit(",", 1)]
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"{path}:{lineno}: expected '<root_folder>,<annotation.json>', got {line!r}")
            root, ann = (p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in parts)
            out.append(DatasetSource(root=root, annotation=ann))
    if not out:
        raise ValueError(f"data.txt {path!r} lists no dataset (expected lines '<root>,<annotation.json>')")
    return out


INVALID_JSON = object()  # stands for a JSON Lines line that does not parse (dropped as "bad_json")


def annotation_format(path: str) -> str:
    """``"jsonl"`` for ``*.jsonl``, ``"json"`` for ``*.json`` (a JSON list); anything else is an error."""
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "json"
    raise ValueError(f"annotation file {path!r} must end in .json (a JSON list) or .jsonl (JSON Lines)")


def iter_json_list(path: str) -> Iterator[tuple[int, Any]]:
    """``(position, record)`` of a JSON list file, streamed (floats as ``float``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
            if not head.startswith(b"["):
                kind = "nothing" if not head else f"text starting with {head[:1].decode(errors='replace')!r}"
                raise ValueError(f"annotation file {path!r} must hold a JSON list of records, got {kind}")
            f.seek(0)
            yield from enumerate(ijson.items(f, "item", use_float=True))
    except (OSError, ijson.JSONError) as e:
        raise ValueError(f"cannot read annotation file {path!r}: {e}") from e


def iter_jsonl(path: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(byte offset, record)`` of the JSON Lines starting in ``[start, end)`` (``start`` must be a line
    start); blank lines are skipped, a line that does not parse yields ``INVALID_JSON``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            pos = start
            for line in f:
                if end is not None and pos >= end:
                    break
                offset, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    yield offset, json.loads(line)
                except ValueError:
                    yield offset, INVALID_JSON
    except OSError as e:
        raise ValueError(f"cannot read annotation file {path!r}: {e}") from e


def jsonl_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split a JSON Lines file into byte ranges of about ``chunk_bytes``, each starting at a line start."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes)
            f.readline()  # to the next line start
            if f.tell() >= size:
                break
            bounds.append(f.tell())
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def iter_annotations(path: str) -> Iterator[tuple[int, Any]]:
    """Every ``(record id, record)`` of one annotation file, streamed, whatever its format."""
    return iter_jsonl(path) if annotation_format(path) == "jsonl" else iter_json_list(path)


def sample_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None


def _captions(cap) -> tuple[str, ...]:
    if isinstance(cap, str):
        return (cap,) if cap.strip() else ()
    if isinstance(cap, (list, tuple)):
        return tuple(c for c in cap if isinstance(c, str) and c.strip())
    return ()


def parse_record(raw: dict, root: str) -> Record | str:
    """Return a ``Record`` or the name of the reason the record is dropped."""
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        return "missing_path"
    kind = sample_kind(raw["path"])
    if kind is None:
        return "unsupported_extension"
    captions = _captions(raw.get("cap"))
    if not captions:
        return "missing_caption"
    res = raw.get("resolution")
    try:
        height, width = int(res["height"]), int(res["width"])
    except (TypeError, KeyError, ValueError):
        return "missing_resolution"
    if height <= 0 or width <= 0:
        return "missing_resolution"
    crop = raw.get("crop")
    if crop is not None:
        try:
            x0, x1, y0, y1 = (int(v) for v in crop)
        except (TypeError, ValueError):
            return "bad_crop"
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            return "bad_crop"
        crop = (x0, x1, y0, y1)
        height, width = y1 - y0, x1 - x0
    fps = raw.get("fps", DEFAULT_FPS)
    if kind == "video":
        try:
            num_frames = int(raw["num_frames"])
        except (TypeError, KeyError, ValueError):
            return "missing_num_frames"
        if num_frames <= 0:
            return "missing_num_frames"
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
            return "bad_fps"
        cut = raw.get("cut")
        try:
            start = int(cut[0]) if cut else 0
        except (TypeError, ValueError, IndexError):
            return "bad_cut"
        if start < 0:
            return "bad_cut"
    else:
        num_frames, start, fps = 1, 0, float(fps) if isinstance(fps, (int, float)) else DEFAULT_FPS
    aes = raw.get("aesthetic", raw.get("aes"))
    return Record(
        path=os.path.join(root, raw["path"]), kind=kind, captions=captions, height=height, width=width,
        num_frames=num_frames, fps=float(fps), start_frame=start, crop=crop,
        aesthetic=float(aes) if isinstance(aes, (int, float)) and not isinstance(aes, bool) else None,
    )
