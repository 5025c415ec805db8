"""Checkpoint manifests: every kind of damage is reported with the file's name; an intact checkpoint passes."""

import json

import pytest

from mm.training.checkpoint_manifest import MANIFEST, verify_manifest, write_manifest


def _ckpt(tmp_path):
    d = tmp_path / "iter_0000002"
    (d / "rng").mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x" * 1000)
    (d / "common.pt").write_bytes(b"common")
    (d / "rng" / "rank_00000.pt").write_bytes(b"rng")
    return d


def test_intact_checkpoint_verifies(tmp_path):
    d = _ckpt(tmp_path)
    path = write_manifest(d)
    assert path == d / MANIFEST
    assert sorted(json.loads(path.read_text())["files"]) == ["__0_0.distcp", "common.pt", "rng/rank_00000.pt"]
    assert verify_manifest(d) == []


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "__0_0.distcp").write_bytes(b"x" * 500), ["__0_0.distcp", "truncated"]),
    (lambda d: (d / "__0_0.distcp").write_bytes(b"y" * 1000), ["__0_0.distcp", "checksum"]),
    (lambda d: (d / "rng" / "rank_00000.pt").unlink(), ["rank_00000.pt", "missing"]),
    (lambda d: (d / "stray.bin").write_bytes(b""), ["stray.bin", "not listed"]),
    (lambda d: (d / MANIFEST).unlink(), [MANIFEST, "missing"]),
    (lambda d: (d / MANIFEST).write_text("{"), [MANIFEST, "unreadable"]),
])
def test_damage_is_named(tmp_path, damage, words):
    d = _ckpt(tmp_path)
    write_manifest(d)
    damage(d)
    problems = verify_manifest(d)
    assert len(problems) == 1, problems
    assert all(w in problems[0] for w in words), problems


def test_missing_directory(tmp_path):
    assert "does not exist" in verify_manifest(tmp_path / "nope")[0]


def test_entries_must_cover_the_files(tmp_path):
    d = _ckpt(tmp_path)
    with pytest.raises(ValueError, match="common.pt"):
        write_manifest(d, entries={"__0_0.distcp": {"size": 1000, "sha256": "0"},
                                   "rng/rank_00000.pt": {"size": 3, "sha256": "0"}})
