"""The on-disk columnar sample index: the kept samples of a dataset as memory-mapped Arrow shards (spec §8.2
at the scale of the v1.5 run: 40 M videos, 1.1 B images).

Written by ``mm.data.build_index`` with the same filter decisions as the in-memory ``mm.data.index`` (one
implementation, ``decide_record``); read here. Layout of an index directory::

    chunks/cSSSSS-KKKKKKK.arrow   kept samples of chunk K of dataset S (Arrow IPC file, uncompressed, one
                                  record batch: memory-mapped without copying)
    chunks/cSSSSS-KKKKKKK.cap     their captions: one JSON list per sample, addressed by cap_offset/cap_length
    chunks/cSSSSS-KKKKKKK.json    chunk metadata, written last: records read, drops per reason with example
                                  paths, file sizes (a chunk counts as done only when its sizes match)
    by_shape.npy                  sample indices grouped by shape (groups in sampler order, ascending
                                  inside), so a shape group is a slice of one memory-mapped array
    sample_rows.npy               sample -> global row, only when ``min_samples_per_shape`` removed rows
    bad_samples.jsonl             paths found bad after the build ({"path", "reason"}; excluded by the next
                                  build; never deleted by a rebuild)
    orders/                       epoch orders of the sampler, shared by the ranks (``mm.data.sampler``)
    manifest.json                 written last, atomically: version, key, filter config, source files with
                                  sizes and mtimes, counts, drops, shape table, chunk table

An index is valid when its manifest exists, its ``key`` (filter config + source files, ``index_key``) and
the hash of ``bad_samples.jsonl`` match, and every shard has the size the manifest recorded (a truncated
shard is detected without reading it). Per-process state is O(shape groups + chunks): entries are read
from the shards on demand, captions lazily, and the processes of a node share one page-cache copy.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import mmap
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa

from mm.data.annotations import read_data_txt
from mm.data.config import DataConfig
from mm.data.index import FILTER_FIELDS, SampleEntry, format_summary

INDEX_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
BY_SHAPE = "by_shape.npy"
SAMPLE_ROWS = "sample_rows.npy"
BAD_SAMPLES = "bad_samples.jsonl"
ORDER_DIR = "orders"
KINDS = ("video", "image")
SCHEMA = pa.schema([
    ("source", pa.int32()), ("record", pa.int64()), ("path", pa.string()), ("kind", pa.int8()),
    ("num_frames", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
    ("frame_start", pa.int64()), ("frame_span", pa.int64()), ("frame_step", pa.float64()),
    ("num_candidates", pa.int32()), ("crop_x0", pa.int32()), ("crop_x1", pa.int32()), ("crop_y0", pa.int32()),
    ("crop_y1", pa.int32()), ("aesthetic", pa.float64()), ("cap_offset", pa.int64()), ("cap_length", pa.int32()),
])


class IndexInvalid(Exception):
    """The directory holds no usable index for this config (the message says why); it gets rebuilt."""


def file_stat(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_manifest(cfg: DataConfig) -> dict[str, Any]:
    """The data.txt and every annotation file with size and mtime: a change in any of them changes the key."""
    if not cfg.data_path:
        raise ValueError("DataConfig.data_path must name a data.txt, got ''")
    datasets = []
    for src in read_data_txt(cfg.data_path):
        if not os.path.isfile(src.annotation):
            raise ValueError(f"annotation file not found: {src.annotation!r} (listed in {cfg.data_path})")
        datasets.append({"root": src.root, **file_stat(src.annotation)})
    return {"data_txt": file_stat(cfg.data_path), "datasets": datasets}


def filter_config(cfg: DataConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: d[k] for k in FILTER_FIELDS}


def index_key(cfg: DataConfig, sources: Mapping[str, Any]) -> str:
    """Hash of the filter config, the source files (paths, sizes, mtimes) and the format version."""
    payload = json.dumps({"version": INDEX_VERSION, "filters": filter_config(cfg), "sources": sources},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def read_bad_samples(index_dir: str) -> dict[str, str]:
    """Path -> reason of the samples recorded bad in ``index_dir`` (empty when none)."""
    path = os.path.join(index_dir, BAD_SAMPLES)
    if not os.path.isfile(path):
        return {}
    bad = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    doc = json.loads(line)
                    bad[str(doc["path"])] = str(doc["reason"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected {{\"path\": ..., \"reason\": ...}}, got {line!r}") from e
    return bad


def bad_samples_hash(index_dir: str) -> str:
    bad = read_bad_samples(index_dir)
    return hashlib.sha256(json.dumps(sorted(bad.items())).encode()).hexdigest()[:16] if bad else ""


def record_bad_samples(index_dir: str, bad: Mapping[str, str]) -> int:
    """Add ``{path: reason}`` to the index's bad-sample table; the next open rebuilds the index without
    them (dropped under their reason). Returns how many paths were new."""
    known = read_bad_samples(index_dir)
    new = {p: r for p, r in bad.items() if p not in known}
    if new:
        os.makedirs(index_dir, exist_ok=True)
        with open(os.path.join(index_dir, BAD_SAMPLES), "a", encoding="utf-8") as f:
            for p, r in sorted(new.items()):
                f.write(json.dumps({"path": p, "reason": r}) + "\n")
    return len(new)


@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), released when the block ends or the process
    dies: the first process builds, the others wait."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            raise ValueError(f"cannot lock {path} ({e}); this file system has no flock: build the index once with "
                             "python -m mm.data.build_index and pass --data-index") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_json_atomic(path: str, doc: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------
_CAPTIONS = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps(..., ensure_ascii=False) builds one per call


class ChunkWriter:
    """Collects the kept samples and drop counts of one chunk, then writes its three files."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []  # one tuple per kept sample, in SCHEMA order
        self.captions = bytearray()
        self.records = 0
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, entry: SampleEntry, source: int, record: int, rel_path: str) -> None:
        cap = _CAPTIONS.encode(list(entry.captions)).encode()
        x0, x1, y0, y1 = entry.crop if entry.crop is not None else (-1, -1, -1, -1)
        self.rows.append((
            source, record, rel_path, KINDS.index(entry.kind), entry.num_frames, entry.height, entry.width,
            entry.frame_start, entry.frame_span, entry.frame_step, entry.num_candidates, x0, x1, y0, y1,
            np.nan if entry.aesthetic is None else entry.aesthetic, len(self.captions), len(cap)))
        self.captions += cap

    def drop(self, reason: str, label: str, max_examples: int) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < max_examples:
            ex.append(label)

    def write(self, chunk_dir: str, name: str, meta: dict[str, Any]) -> dict[str, Any]:
        base = os.path.join(chunk_dir, name)
        columns = list(zip(*self.rows)) if self.rows else [[] for _ in SCHEMA]
        table = pa.table({f.name: pa.array(col, type=f.type) for f, col in zip(SCHEMA, columns)}, schema=SCHEMA)
        with pa.OSFile(base + ".arrow", "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
            w.write_table(table, max_chunksize=max(1, table.num_rows))
        with open(base + ".cap", "wb") as f:
            f.write(self.captions)
        meta = dict(meta, name=name, records=self.records, rows=table.num_rows, dropped=dict(self.dropped),
                    examples=self.examples, arrow_size=os.path.getsize(base + ".arrow"),
                    cap_size=len(self.captions))
        write_json_atomic(base + ".json", meta)  # last: the chunk is done once this exists
        return meta


def chunk_files_ok(chunk_dir: str, meta: Mapping[str, Any]) -> bool:
    base = os.path.join(chunk_dir, meta["name"])
    try:
        return (os.path.getsize(base + ".arrow") == meta["arrow_size"]
                and os.path.getsize(base + ".cap") == meta["cap_size"])
    except OSError:
        return False


def read_chunk_columns(chunk_dir: str, name: str) -> dict[str, Any]:
    """A chunk's columns, memory-mapped: numeric columns as zero-copy numpy arrays, ``path`` as Arrow."""
    try:
        table = pa.ipc.open_file(pa.memory_map(os.path.join(chunk_dir, name + ".arrow"))).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise IndexInvalid(f"chunk {name} in {chunk_dir} cannot be read: {e}") from e
    if table.num_rows == 0:  # an empty table may be written without a record batch
        table = pa.Table.from_batches([pa.RecordBatch.from_pylist([], schema=SCHEMA)])
    if any(table.column(f.name).num_chunks != 1 for f in SCHEMA):
        raise IndexInvalid(f"chunk {name} in {chunk_dir} must hold one record batch")
    # chunk(0), not combine_chunks(): a view of the mapped file, no copy
    cols: dict[str, Any] = {"path": table.column("path").chunk(0)}
    for f in SCHEMA:
        if f.name != "path":
            cols[f.name] = table.column(f.name).chunk(0).to_numpy(zero_copy_only=True)
    return cols


# ------------------------------------------------------------------------------------------------------
class IndexStore:
    """Read access to a valid index directory (``IndexInvalid`` otherwise); ``key`` is checked when given.

    Answers the same questions as the in-memory ``DataIndex``: ``len``, ``entry(i)``, ``shape_groups()``,
    ``group(key)``, ``dropped``, ``examples``, ``num_records``, ``shape_counts()``, ``summary()``."""

    def __init__(self, index_dir: str, key: str | None = None) -> None:
        self.dir = index_dir
        path = os.path.join(index_dir, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                m = json.load(f)
        except FileNotFoundError:
            raise IndexInvalid(f"no {MANIFEST} in {index_dir}") from None
        except (OSError, ValueError) as e:
            raise IndexInvalid(f"{path} cannot be read: {e}") from e
        if m.get("version") != INDEX_VERSION:
            raise IndexInvalid(f"{path}: format version {m.get('version')!r}, this code reads {INDEX_VERSION}")
        if key is not None and m["key"] != key:
            raise IndexInvalid(f"{index_dir} was built for another data config or other source files "
                               f"(key {m['key']}, this run {key})")
        if m["bad_hash"] != bad_samples_hash(index_dir):
            raise IndexInvalid(f"{BAD_SAMPLES} in {index_dir} changed since the build")
        self.chunk_dir = os.path.join(index_dir, CHUNK_DIR)
        for c in m["chunks"]:
            if not chunk_files_ok(self.chunk_dir, c):
                raise IndexInvalid(f"chunk {c['name']} in {self.chunk_dir} is missing or truncated")
        self.manifest = m
        self.num_records: int = m["num_records"]
        self.num_samples: int = m["num_samples"]
        self.dropped = Counter(m["dropped"])
        self.examples: dict[str, list[str]] = m["examples"]
        self.roots = [d["root"] for d in m["sources"]["datasets"]]
        self.chunk_names = [c["name"] for c in m["chunks"]]
        self.chunk_starts = np.cumsum([0] + [c["rows"] for c in m["chunks"]]).tolist()
        self._shapes: list[tuple[str, int]] = [tuple(s) for s in m["shapes"]]
        self._by_shape = self._load_array(BY_SHAPE, self.num_samples)
        self._sample_rows = self._load_array(SAMPLE_ROWS, self.num_samples) if m["sample_rows"] else None
        self._chunks: dict[int, tuple[dict[str, Any], mmap.mmap | None]] = {}

    def _load_array(self, name: str, size: int) -> np.ndarray:
        try:
            arr = np.load(os.path.join(self.dir, name), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise IndexInvalid(f"{name} in {self.dir} cannot be read: {e}") from e
        if arr.shape != (size,):
            raise IndexInvalid(f"{name} in {self.dir} holds {arr.shape} entries, the manifest says {size}")
        return arr

    # pickled into DataLoader workers without its memory maps; each process maps what it reads
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_chunks", "_by_shape", "_sample_rows")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._by_shape = self._load_array(BY_SHAPE, self.num_samples)
        self._sample_rows = self._load_array(SAMPLE_ROWS, self.num_samples) if self.manifest["sample_rows"] else None
        self._chunks = {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def order_dir(self) -> str:
        """Where the sampler shares its epoch orders (``GroupedDistributedSampler(order_dir=...)``)."""
        return os.path.join(self.dir, ORDER_DIR)

    def shape_counts(self) -> dict[str, int]:
        return dict(self._shapes)

    def shape_groups(self) -> dict[str, np.ndarray]:
        """Shape key -> ascending sample indices (slices of the memory-mapped ``by_shape``), sampler order."""
        out, pos = {}, 0
        for k, n in self._shapes:
            out[k] = self._by_shape[pos:pos + n]
            pos += n
        return out

    def group(self, shape_key: str) -> np.ndarray:
        return self.shape_groups()[shape_key]

    def _chunk(self, c: int) -> tuple[dict[str, Any], mmap.mmap | None]:
        if c not in self._chunks:
            name = self.chunk_names[c]
            cols = read_chunk_columns(self.chunk_dir, name)
            cap = None
            if self.manifest["chunks"][c]["cap_size"]:
                with open(os.path.join(self.chunk_dir, name + ".cap"), "rb") as f:
                    cap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._chunks[c] = (cols, cap)
        return self._chunks[c]

    def entry(self, i: int) -> SampleEntry:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
        row = int(self._sample_rows[i]) if self._sample_rows is not None else int(i)
        c = bisect.bisect_right(self.chunk_starts, row) - 1
        cols, cap = self._chunk(c)
        j = row - self.chunk_starts[c]
        off, length = int(cols["cap_offset"][j]), int(cols["cap_length"][j])
        captions = tuple(json.loads(cap[off:off + length])) if cap is not None else ()
        crop = tuple(int(cols[k][j]) for k in ("crop_x0", "crop_x1", "crop_y0", "crop_y1"))
        aes = float(cols["aesthetic"][j])
        return SampleEntry(
            path=os.path.join(self.roots[int(cols["source"][j])], cols["path"][j].as_py()),
            kind=KINDS[int(cols["kind"][j])], captions=captions, num_frames=int(cols["num_frames"][j]),
            height=int(cols["height"][j]), width=int(cols["width"][j]), frame_start=int(cols["frame_start"][j]),
            frame_span=int(cols["frame_span"][j]), frame_step=float(cols["frame_step"][j]),
            num_candidates=int(cols["num_candidates"][j]), crop=None if crop[0] < 0 else crop,
            aesthetic=None if np.isnan(aes) else aes)

    def summary(self) -> str:
        return format_summary(self.num_records, self.num_samples, self.dropped, self.examples, self.shape_counts())
