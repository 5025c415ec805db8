"""Open every file of a dataset before training on it (``python -m mm.data.inspect --verify``).

For each annotation record of every ``data.txt`` line: the file exists and is not empty, its content is
what its name says (magic bytes: a PNG renamed ``.mp4`` is caught), it decodes, it has the annotated
number of frames (the last annotated frame is decoded) and the annotated size (when no crop is given).
Records the annotation parser already drops are counted under ``annotation:<reason>``. The report counts
problems per reason with a few example paths; files are checked by a thread pool (decoding releases
the GIL) behind a progress bar.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mm.data.annotations import Record, iter_annotations, parse_record, read_data_txt
from mm.data.decode import read_image, read_video, resolve_video_backend
from mm.data.errors import SampleError

EXAMPLES_PER_REASON = 3

# leading bytes -> what the file really holds (enough to tell images from videos)
_MAGIC = (
    (0, b"\x89PNG", "image"), (0, b"\xff\xd8\xff", "image"), (0, b"BM", "image"), (0, b"GIF8", "image"),
    (4, b"ftyp", "video"), (4, b"moov", "video"), (4, b"mdat", "video"), (4, b"wide", "video"),
    (4, b"free", "video"), (0, b"\x1a\x45\xdf\xa3", "video"),
)


def sniff_kind(path: str) -> str | None:
    """'image' / 'video' from the file's first bytes (RIFF: AVI or WEBP), None when unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF":
        return {b"AVI ": "video", b"WEBP": "image"}.get(head[8:12])
    for offset, magic, kind in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return kind
    return None


def check_file(rec: Record, video_backend: str = "pyav") -> tuple[str, str] | None:
    """``(reason, detail)`` of the first problem with a record's file, None when it is good."""
    if not os.path.isfile(rec.path):
        return "missing_file", "no such file"
    if os.path.getsize(rec.path) == 0:
        return "empty_file", "0 bytes"
    actual = sniff_kind(rec.path)
    if actual is not None and actual != rec.kind:
        article = {"image": "an image", "video": "a video"}
        return "wrong_kind", f"holds {article[actual]}, named like {article[rec.kind]}"
    try:
        if rec.kind == "image":
            pixels = read_image(rec.path)
        else:  # the last annotated frame: decodes the clip through and proves the frame count
            pixels = read_video(rec.path, [rec.start_frame + rec.num_frames - 1], video_backend)
    except SampleError as e:
        return e.reason, e.detail
    if rec.crop is None and tuple(pixels.shape[1:3]) != (rec.height, rec.width):
        return "size_mismatch", (f"{pixels.shape[1]}x{pixels.shape[2]} on disk, annotation says "
                                 f"{rec.height}x{rec.width}")
    return None


@dataclass
class VerifyReport:
    checked: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bad_files: dict[str, str] = field(default_factory=dict)  # path -> reason, every file that failed a check

    def add(self, reason: str, example: str) -> None:
        self.problems[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(example)

    @property
    def num_bad(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        lines = [f"verified {self.checked} records: {self.checked - self.num_bad} good, {self.num_bad} bad"]
        for reason, n in self.problems.most_common():
            lines.append(f"  {reason}: {n}  e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)


def verify_dataset(data_path: str, video_reader_type: str = "auto", workers: int = 4,
                   progress: bool = True) -> VerifyReport:
    """Check every record of every dataset listed in ``data_path`` (a data.txt)."""
    from tqdm import tqdm

    backend = resolve_video_backend(video_reader_type)
    report = VerifyReport()
    records: list[Record] = []
    for src in read_data_txt(data_path):
        for rec_id, raw in iter_annotations(src.annotation):
            rec = parse_record(raw, src.root)
            report.checked += 1
            if isinstance(rec, str):
                report.add(f"annotation:{rec}", f"{src.annotation} record {rec_id}")
            else:
                records.append(rec)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda r: check_file(r, backend), records)
        for rec, problem in tqdm(zip(records, results), total=len(records), unit="file", desc="verify",
                                 disable=not progress):
            if problem is not None:
                reason, detail = problem
                report.add(reason, f"{rec.path} ({detail})" if detail else rec.path)
                report.bad_files[rec.path] = reason
    return report
