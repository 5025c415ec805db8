"""Checkpoint manifests: per-file sizes and SHA-256 checksums, so a checkpoint can be trusted before use.

``write_manifest(ckpt_dir)`` records every file under the checkpoint directory in ``manifest.json``
inside it. The trainer writes it into ``iter_N.tmp/`` before the atomic rename, so a directory named
``iter_N`` always carries the manifest of its complete contents. ``verify_manifest(ckpt_dir)`` returns
the problems found (each naming the bad file), an empty list when the checkpoint is intact.

Format (``manifest.json``)::

    {"format": "mm-checkpoint-manifest", "version": 1,
     "files": {"<path relative to ckpt_dir>": {"size": <bytes>, "sha256": "<hex>"}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "mm-checkpoint-manifest"
VERSION = 1
_CHUNK = 8 * 2**20


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of one file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of every file in a checkpoint except the manifest itself."""
    root = Path(ckpt_dir)
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in rels if rel != MANIFEST)


def file_entries(ckpt_dir: str | os.PathLike, rel_paths: list[str]) -> dict[str, dict]:
    """Manifest entries (size + checksum) for the given files of a checkpoint."""
    root = Path(ckpt_dir)
    return {rel: {"size": (root / rel).stat().st_size, "sha256": file_digest(root / rel)} for rel in rel_paths}


def write_manifest(ckpt_dir: str | os.PathLike, entries: dict[str, dict] | None = None) -> Path:
    """Write ``manifest.json`` covering every file in ``ckpt_dir``; returns its path.

    ``entries`` may hold checksums already computed elsewhere (e.g. spread over ranks); they must cover
    exactly the files present, so a manifest never vouches for a file it did not see.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    files = checkpoint_files(root)
    if entries is None:
        entries = file_entries(root, files)
    elif sorted(entries) != files:
        missing = sorted(set(files) - set(entries))
        extra = sorted(set(entries) - set(files))
        raise ValueError(f"manifest entries for {root} do not match its files: without an entry {missing}, "
                         f"entries for absent files {extra}")
    path = root / MANIFEST
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "files": dict(sorted(entries.items()))},
                              indent=1) + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, dict]:
    """The ``files`` table of a checkpoint's manifest; ValueError naming the file when it is unreadable."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (checkpoint written without a manifest, or its save did not finish)")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path}: not a checkpoint manifest (expected format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')!r}, this code reads version {VERSION}")
    return data["files"]


def verify_manifest(ckpt_dir: str | os.PathLike) -> list[str]:
    """Problems with a checkpoint (each naming the bad file); empty when every file matches its manifest."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return [f"{root}: checkpoint directory does not exist"]
    try:
        files = read_manifest(root)
    except ValueError as e:
        return [str(e)]
    return check_entries(root, files, sorted(files)) + unlisted_files(root, files)


def unlisted_files(ckpt_dir: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """Problems for files present in a checkpoint but absent from its manifest table."""
    root = Path(ckpt_dir)
    return [f"{root / rel}: not listed in {MANIFEST} (added after the checkpoint was written)"
            for rel in checkpoint_files(root) if rel not in files]


def check_entries(ckpt_dir: str | os.PathLike, files: dict[str, dict], rel_paths: list[str]) -> list[str]:
    """Problems with the given files of a checkpoint against its manifest table (size, then checksum)."""
    root = Path(ckpt_dir)
    problems = []
    for rel in rel_paths:
        entry = files[rel]
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{path}: size {size} bytes, manifest says {entry.get('size')} (truncated or rewritten)")
        elif file_digest(path) != entry.get("sha256"):
            problems.append(f"{path}: checksum mismatch (corrupted)")
    return problems
