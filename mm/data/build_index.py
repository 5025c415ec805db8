"""Build the on-disk sample index (``mm.data.index_store``) once, and open it (cached) for training,
``extract_features`` and ``inspect``.

``python -m mm.data.build_index --data data.json|data.txt --out DIR [--workers N] [--num-frames ...]``

The annotation files are streamed (a JSON list through ijson, JSON Lines line by line; never a whole list
in memory) and every record goes through ``mm.data.index.decide_record``, the same decision the in-memory
index makes. Work is split into chunks: byte ranges of a JSON Lines file, or runs of ``chunk_records``
records of a JSON list (one file is parsed by one worker); chunks run in parallel over ``--workers``
processes and each is written whole or not at all, so an interrupted build resumes where it stopped.
Records whose path is in the index's ``bad_samples.jsonl`` are dropped under the recorded reason.

``open_index(cfg, index_dir=None)`` returns the ``IndexStore`` for ``cfg``: ``index_dir`` or, by default,
``$MM_DATA_INDEX_CACHE/<key>`` (default ``~/.cache/mm/data_index``), the key hashing the filter config and
the source files (sizes, mtimes). A missing, stale (other config, changed sources) or damaged index is
(re)built under an exclusive ``flock`` on ``<dir>.lock``: the first process to get the lock builds, the
others wait and then open what it wrote (one rank per node with a local cache, one rank in all on shared
storage). The manifest is renamed into place last, so a reader sees a whole index or none.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from mm.data.annotations import annotation_format, iter_json_list, iter_jsonl, jsonl_ranges
from mm.data.config import DataConfig, load_data_config
from mm.data.index import MAX_EXAMPLES_PER_REASON, decide_record, drop_label, group_order, rare_shapes
from mm.data.index_store import (BY_SHAPE, CHUNK_DIR, INDEX_VERSION, MANIFEST, ORDER_DIR, SAMPLE_ROWS,
                                 ChunkWriter, IndexInvalid, IndexStore, bad_samples_hash, chunk_files_ok, file_lock,
                                 filter_config, index_key, read_bad_samples, read_chunk_columns, source_manifest,
                                 write_json_atomic)

logger = logging.getLogger(__name__)

# a chunk's columns are collected as Python lists before they are written: ~100 k records is ~60 MB
CHUNK_RECORDS = 100_000          # records per chunk of a JSON list
CHUNK_BYTES = 32 * 1024 * 1024   # bytes per chunk of a JSON Lines file (~100 k records of ~330 bytes)
CACHE_ENV = "MM_DATA_INDEX_CACHE"


def default_cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mm", "data_index")


def chunk_name(source: int, chunk: int) -> str:
    return f"c{source:05d}-{chunk:07d}"


# ------------------------------------------------------------------------------------------------------
# workers: one task = one JSON Lines byte range, or one JSON list file cut into record chunks
def _filter_one(writer: ChunkWriter, rec_id: int, raw: Any, task: dict[str, Any]) -> None:
    writer.records += 1
    entry = decide_record(raw, task["root"], task["cfg"], task["source"], rec_id)
    if not isinstance(entry, str) and entry.path in task["bad"]:
        entry = task["bad"][entry.path]
    if isinstance(entry, str):
        writer.drop(entry, drop_label(raw, task["path"], rec_id), MAX_EXAMPLES_PER_REASON)
    else:
        writer.add(entry, task["source"], rec_id, raw["path"])


def run_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Filter one task's records into chunk files; returns the metadata of the chunks it wrote."""
    chunk_dir, src, path = task["chunk_dir"], task["source"], task["path"]
    common = {"key": task["key"], "source": src}
    if task["format"] == "jsonl":
        writer = ChunkWriter()
        for rec_id, raw in iter_jsonl(path, task["start"], task["end"]):
            _filter_one(writer, rec_id, raw, task)
        meta = dict(common, chunk=task["chunk"], start=task["start"], end=task["end"], last=task["last"])
        return [writer.write(chunk_dir, chunk_name(src, task["chunk"]), meta)]
    # a JSON list is parsed once from the start; chunks already done are parsed through, not filtered
    n, done, written = task["chunk_records"], set(task["done"]), []
    records = iter_json_list(path)
    pending = next(records, None)
    k = 0
    while True:
        writer = None if k in done else ChunkWriter()
        count = 0
        while pending is not None and count < n:
            if writer is not None:
                _filter_one(writer, pending[0], pending[1], task)
            count += 1
            pending = next(records, None)
        if writer is not None:
            meta = dict(common, chunk=k, chunk_records=n, last=pending is None)
            written.append(writer.write(chunk_dir, chunk_name(src, k), meta))
        if pending is None:
            return written
        k += 1


# ------------------------------------------------------------------------------------------------------
def _existing_chunks(chunk_dir: str, key: str) -> dict[str, dict[str, Any]]:
    """Chunks of an earlier, interrupted build of the same key (damaged or foreign ones are deleted)."""
    done: dict[str, dict[str, Any]] = {}
    if not os.path.isdir(chunk_dir):
        return done
    names = os.listdir(chunk_dir)
    for fn in names:
        if fn.endswith(".json"):
            try:
                with open(os.path.join(chunk_dir, fn), encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if meta.get("key") == key and chunk_files_ok(chunk_dir, meta):
                done[meta["name"]] = meta
    for fn in names:
        if os.path.splitext(fn)[0] not in done:
            os.remove(os.path.join(chunk_dir, fn))
    return done


def _discard(chunk_dir: str, done: dict[str, dict[str, Any]], name: str) -> None:
    done.pop(name)
    for ext in (".json", ".arrow", ".cap"):
        if os.path.exists(os.path.join(chunk_dir, name + ext)):
            os.remove(os.path.join(chunk_dir, name + ext))


def _plan(cfg: DataConfig, sources: dict[str, Any], chunk_dir: str, key: str, bad: dict[str, str],
          done: dict[str, dict[str, Any]], chunk_records: int, chunk_bytes: int) -> list[dict[str, Any]]:
    """The tasks still to run; done chunks cut differently (other chunk sizes) are discarded."""
    tasks = []
    for src, ds in enumerate(sources["datasets"]):
        base = {"cfg": cfg, "chunk_dir": chunk_dir, "key": key, "bad": bad, "source": src, "path": ds["path"],
                "root": ds["root"]}
        mine = {m["name"]: m for m in done.values() if m["source"] == src}
        if annotation_format(ds["path"]) == "jsonl":
            ranges = jsonl_ranges(ds["path"], chunk_bytes) or [(0, 0)]
            for name, m in mine.items():
                if m["chunk"] >= len(ranges) or (m.get("start"), m.get("end")) != ranges[m["chunk"]]:
                    _discard(chunk_dir, done, name)
            for k, (a, b) in enumerate(ranges):
                if chunk_name(src, k) not in done:
                    tasks.append(dict(base, format="jsonl", chunk=k, start=a, end=b, last=k == len(ranges) - 1))
        else:
            for name, m in mine.items():
                if m.get("chunk_records") != chunk_records:
                    _discard(chunk_dir, done, name)
            chunks = sorted(m["chunk"] for m in done.values() if m["source"] == src)
            lasts = [m["chunk"] for m in done.values() if m["source"] == src and m["last"]]
            if not (lasts and chunks == list(range(lasts[0] + 1))):
                tasks.append(dict(base, format="json", chunk_records=chunk_records, done=chunks))
    return tasks


def _run_tasks(tasks: list[dict[str, Any]], workers: int, progress: bool) -> tuple[list[dict[str, Any]], int]:
    from tqdm import tqdm

    metas: list[dict[str, Any]] = []
    bar = tqdm(total=len(tasks), unit="chunk", desc="index", disable=not progress, file=sys.stderr)
    t0, records = time.time(), 0
    if workers <= 1 or len(tasks) <= 1:
        results: Any = map(run_task, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(run_task, tasks)
    try:
        for written in results:
            metas.extend(written)
            records += sum(m["records"] for m in written)
            bar.update(1)
            bar.set_postfix(records=records, rec_per_s=f"{records / max(time.time() - t0, 1e-9):,.0f}")
    except BaseException:
        if pool is not None:
            pool.terminate()  # a failed task (e.g. an unreadable file) stops the others at once
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return metas, records


def _finalize(cfg: DataConfig, out_dir: str, key: str, sources: dict[str, Any], metas: list[dict[str, Any]],
              build_info: dict[str, Any]) -> None:
    """Merge the chunks: totals, drops, shape table, ``by_shape`` (and ``sample_rows``), then the manifest."""
    chunk_dir = os.path.join(out_dir, CHUNK_DIR)
    metas = sorted(metas, key=lambda m: (m["source"], m["chunk"]))
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for m in metas:
        dropped.update(m["dropped"])
        for reason, ex in m["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(ex[:MAX_EXAMPLES_PER_REASON - len(have)])

    def codes(cols: dict[str, Any]) -> np.ndarray:
        return ((cols["num_frames"].astype(np.int64) << 42) | (cols["height"].astype(np.int64) << 21)
                | cols["width"].astype(np.int64))

    def key_of(code: int) -> str:
        return f"{code >> 42}x{(code >> 21) & 0x1FFFFF}x{code & 0x1FFFFF}"

    counts: Counter = Counter()
    for m in metas:
        u, n = np.unique(codes(read_chunk_columns(chunk_dir, m["name"])), return_counts=True)
        counts.update(dict(zip(u.tolist(), n.tolist())))
    shape_counts = {key_of(c): n for c, n in counts.items()}
    rare = rare_shapes(shape_counts, cfg)
    rare_codes = np.array(sorted(c for c in counts if key_of(c) in rare), dtype=np.int64)
    kept_counts = {k: n for k, n in shape_counts.items() if k not in rare}
    order = group_order(kept_counts)
    num_samples = sum(kept_counts.values())
    sorted_codes = np.array(sorted(c for c in counts if key_of(c) not in rare), dtype=np.int64)
    gid_of_code = np.array([order.index(key_of(c)) for c in sorted_codes], dtype=np.int64)
    cursor = np.cumsum([0] + [kept_counts[k] for k in order])[:-1]
    dtype = np.int32 if num_samples < 2 ** 31 else np.int64
    by_shape = np.lib.format.open_memmap(os.path.join(out_dir, BY_SHAPE + ".tmp.npy"), mode="w+", dtype=dtype,
                                         shape=(num_samples,))
    row_base = sample_base = 0
    rows_kept: list[np.ndarray] = []
    for m in metas:
        cols = read_chunk_columns(chunk_dir, m["name"])
        c = codes(cols)
        keep = ~np.isin(c, rare_codes) if len(rare_codes) else np.ones(len(c), dtype=bool)
        if len(rare_codes):
            for j in np.flatnonzero(~keep):
                if dropped["shape_too_rare"] < MAX_EXAMPLES_PER_REASON:
                    root = sources["datasets"][int(cols["source"][j])]["root"]
                    examples.setdefault("shape_too_rare", []).append(os.path.join(root, cols["path"][int(j)].as_py()))
                dropped["shape_too_rare"] += 1
            rows_kept.append(row_base + np.flatnonzero(keep))
        gid = gid_of_code[np.searchsorted(sorted_codes, c[keep])]
        samples = sample_base + np.arange(len(gid), dtype=np.int64)
        perm = np.argsort(gid, kind="stable")
        for g, members in zip(*_split_sorted(gid[perm], samples[perm])):
            by_shape[cursor[g]:cursor[g] + len(members)] = members
            cursor[g] += len(members)
        row_base += len(c)
        sample_base += len(gid)
    by_shape.flush()
    del by_shape
    os.replace(os.path.join(out_dir, BY_SHAPE + ".tmp.npy"), os.path.join(out_dir, BY_SHAPE))
    if len(rare_codes):
        np.save(os.path.join(out_dir, SAMPLE_ROWS), np.concatenate(rows_kept).astype(np.int64))
    manifest = {
        "version": INDEX_VERSION, "key": key, "bad_hash": bad_samples_hash(out_dir), "filters": filter_config(cfg),
        "sources": sources, "num_records": sum(m["records"] for m in metas), "num_samples": num_samples,
        "dropped": dict(dropped), "examples": examples, "shapes": [[k, kept_counts[k]] for k in order],
        "sample_rows": bool(len(rare_codes)),
        "chunks": [{k: m[k] for k in ("name", "source", "chunk", "records", "rows", "arrow_size", "cap_size")}
                   for m in metas],
        "build": build_info,
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)


def _split_sorted(gid: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Runs of equal ``gid`` (already sorted) -> (group ids, their values)."""
    if len(gid) == 0:
        return [], []
    cuts = np.flatnonzero(np.diff(gid)) + 1
    return gid[np.concatenate([[0], cuts])].tolist(), np.split(values, cuts)


def build_store(cfg: DataConfig, out_dir: str, *, workers: int = 1, chunk_records: int = CHUNK_RECORDS,
                chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> dict[str, Any]:
    """Build (or finish building) the index of ``cfg`` in ``out_dir``; the caller holds the lock.
    Returns the build figures (records, seconds, records/s, workers, resumed chunks)."""
    if workers < 1 or chunk_records < 1 or chunk_bytes < 1:
        raise ValueError(f"workers, chunk_records and chunk_bytes must be >= 1, got {workers}, {chunk_records}, "
                         f"{chunk_bytes}")
    t0 = time.time()
    sources = source_manifest(cfg)
    key = index_key(cfg, sources)
    chunk_dir = os.path.join(out_dir, CHUNK_DIR)
    os.makedirs(chunk_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))  # from here on readers see no index until the new one
    for name in (BY_SHAPE, SAMPLE_ROWS):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, ORDER_DIR), ignore_errors=True)  # orders of the old samples
    chunk_key = f"{key}:{bad_samples_hash(out_dir)}"  # chunks filtered with another bad list are redone
    done = _existing_chunks(chunk_dir, chunk_key)
    bad = read_bad_samples(out_dir)
    tasks = _plan(cfg, sources, chunk_dir, chunk_key, bad, done, chunk_records, chunk_bytes)
    logger.info("building the data index of %s in %s: %d tasks, %d chunks already done, %d workers",
                cfg.data_path, out_dir, len(tasks), len(done), workers)
    metas, records = _run_tasks(tasks, workers, progress)
    by_name = dict(done)
    by_name.update((m["name"], m) for m in metas)
    seconds = time.time() - t0
    info = {"records_filtered": records, "seconds": round(seconds, 3),
            "records_per_s": round(records / max(seconds, 1e-9), 1), "workers": workers, "resumed_chunks": len(done)}
    _finalize(cfg, out_dir, key, sources, list(by_name.values()), info)
    logger.info("data index %s: %d records filtered in %.1f s (%.0f records/s, %d workers)", out_dir, records,
                seconds, info["records_per_s"], workers)
    return info


PARALLEL_MIN_BYTES = 256 * 1024 * 1024  # below this a pool costs more than it saves


def default_workers(cfg: DataConfig) -> int:
    """Processes for a build started from a library call: up to 8 for large sources, 1 for small ones or
    inside a daemonic process (which may not start children)."""
    size = sum(d["size"] for d in source_manifest(cfg)["datasets"])
    if size < PARALLEL_MIN_BYTES or multiprocessing.current_process().daemon:
        return 1
    return min(8, os.cpu_count() or 1)


def open_index(cfg: DataConfig, index_dir: str | None = None, *, workers: int | None = None,
               progress: bool = False, chunk_records: int = CHUNK_RECORDS,
               chunk_bytes: int = CHUNK_BYTES) -> IndexStore:
    """The index of ``cfg``: opened when valid, else (re)built first (see the module docstring)."""
    key = index_key(cfg, source_manifest(cfg))
    out_dir = index_dir or os.path.join(default_cache_root(), key)
    try:
        return IndexStore(out_dir, key)
    except IndexInvalid as e:
        reason = str(e)
    with file_lock(out_dir.rstrip("/") + ".lock"):
        try:
            return IndexStore(out_dir, key)  # built by another process while this one waited
        except IndexInvalid as e:
            reason = str(e)  # still missing or stale: this process builds it
        logger.warning("data index: building %s (%s)", out_dir, reason)
        build_store(cfg, out_dir, workers=workers or default_workers(cfg), progress=progress,
                    chunk_records=chunk_records, chunk_bytes=chunk_bytes)
        return IndexStore(out_dir, key)


# ------------------------------------------------------------------------------------------------------
def add_filter_overrides(p: argparse.ArgumentParser) -> None:
    """The filter overrides shared by ``build_index`` and ``inspect``."""
    for name, typ in FILTER_OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"override {name}")
    p.add_argument("--height", type=int, default=None, help="alias of --max-height")
    p.add_argument("--width", type=int, default=None, help="alias of --max-width")
    p.add_argument("--multi-resolution", action="store_true", help="force_resolution=false")


FILTER_OVERRIDES = {
    "num_frames": int, "min_num_frames": int, "max_height": int, "max_width": int, "max_hxw": int,
    "min_hxw": int, "train_fps": float, "speed_factor": float, "hw_stride": int,
    "min_samples_per_shape": int,
}


def config_from_args(a: argparse.Namespace) -> DataConfig:
    """``--data`` plus the filter overrides -> ``DataConfig`` (``ValueError`` on bad values)."""
    overrides = {k: getattr(a, k) for k in FILTER_OVERRIDES if getattr(a, k) is not None}
    if a.height is not None:
        overrides["max_height"] = a.height
    if a.width is not None:
        overrides["max_width"] = a.width
    if a.multi_resolution:
        overrides["force_resolution"] = False
    if "num_frames" in overrides and "min_num_frames" not in overrides:
        overrides["min_num_frames"] = min(overrides["num_frames"], 29)
    if ("max_height" in overrides or "max_width" in overrides) and "max_hxw" not in overrides:
        overrides["max_hxw"] = overrides.get("max_height", 576) * overrides.get("max_width", 1024)
        overrides.setdefault("min_hxw", overrides["max_hxw"] if not a.multi_resolution else 0)
    return load_data_config(a.data, **overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.data.build_index", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data.json (upstream format) or data.txt")
    p.add_argument("--out", default=None, help=f"index directory (default: ${CACHE_ENV}/<key>, the cache the "
                                               "trainer, extract_features and inspect use)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: CPUs)")
    p.add_argument("--chunk-records", type=int, default=CHUNK_RECORDS, help="records per chunk of a JSON list")
    p.add_argument("--chunk-mb", type=int, default=CHUNK_BYTES >> 20, help="MiB per chunk of a JSON Lines file")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid index exists")
    add_filter_overrides(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if a.workers < 1 or a.chunk_records < 1 or a.chunk_mb < 1:
            raise ValueError(f"--workers, --chunk-records and --chunk-mb must be >= 1, got {a.workers}, "
                             f"{a.chunk_records}, {a.chunk_mb}")
        cfg = config_from_args(a)
        key = index_key(cfg, source_manifest(cfg))
        out = a.out or os.path.join(default_cache_root(), key)
        with file_lock(out.rstrip("/") + ".lock"):
            try:
                if a.force:
                    raise IndexInvalid("--force")
                store = IndexStore(out, key)
                print(f"index up to date: {out}")
            except IndexInvalid:
                info = build_store(cfg, out, workers=a.workers, chunk_records=a.chunk_records,
                                   chunk_bytes=a.chunk_mb << 20, progress=True)
                store = IndexStore(out, key)
                print(f"index built: {out}  ({info['records_filtered']} records in {info['seconds']:.1f} s, "
                      f"{info['records_per_s']:,.0f} records/s, {a.workers} workers)")
    except ValueError as e:
        p.error(str(e))
    print(store.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
