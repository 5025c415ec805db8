"""kill -9 at chosen and at random points of short runs (during a step, while the shards are written,
while the manifest is written, at the rename, before the pointer update, between the two renames of a
re-save, while pruning), each followed by a restart: the run ends with the final loss of an
uninterrupted run and its last checkpoint in place (issue 13 "fault-injection tests")."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import pytest

from faults_common import run_config, trainer
from harness import DistributedTestError, run_distributed

ITERS, INTERVAL = 4, 2


def _run(root):
    return run_config(iters=ITERS, save=root, load=root, save_interval=INTERVAL, gbs=1, keep_last=1)


def _train(rank, world, ws, root, kill_at=None):
    t = trainer(ws, _run(root))
    if kill_at is not None:
        _arm(t, *kill_at)
    t.train()
    return t.iteration


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(t, point, iteration):
    """SIGKILL this process at ``point`` of the run, at or after ``iteration``."""
    from megatron.core import dist_checkpointing

    from mm.training import checkpoint_manifest, checkpointing

    def at_iteration():
        return t.iteration >= iteration

    if point == "step":  # in the middle of a step: after the forward/backward, before the optimizer update
        real = t._optimizer_step
        t._optimizer_step = lambda: _die() if t.iteration + 1 >= iteration else real()
    elif point == "shards":
        real_save = dist_checkpointing.save

        def save(*a, **k):
            real_save(*a, **k)
            if at_iteration():
                _die()
        dist_checkpointing.save = save
    elif point == "manifest":
        real_write = checkpoint_manifest.write_manifest
        checkpoint_manifest.write_manifest = lambda *a, **k: _die() if at_iteration() else real_write(*a, **k)
    elif point in ("rename", "pointer", "between_renames"):
        real_replace = os.replace

        def replace(src, dst):
            name = Path(dst).name
            hit = {"rename": name.startswith("iter_") and Path(src).name.endswith(".tmp"),
                   "pointer": name == checkpointing.LATEST,
                   "between_renames": Path(src).name.endswith(".tmp") and Path(dst).name.startswith("iter_")
                   and Path(str(dst) + ".old").exists()}[point]
            if hit and at_iteration():
                _die()
            return real_replace(src, dst)
        checkpointing.os.replace = replace
    elif point == "prune":
        real_prune = checkpointing._prune

        def prune(root, keep_last):
            if at_iteration():  # half-way: one old checkpoint's files partly deleted
                victim = sorted(checkpointing.complete_dirs(root).values())[0]
                next(p for p in victim.rglob("*.distcp")).unlink()
                _die()
            real_prune(root, keep_last)
        checkpointing._prune = prune
    else:
        raise ValueError(point)


def _final_loss(root) -> float:
    lines = [json.loads(ln) for ln in (Path(root) / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["iteration"] == ITERS][-1]


def _check_checkpoints(root):
    """The last checkpoint is in place and verifies; nothing half-written is left under a complete name."""
    from mm.training.checkpoint_manifest import verify_manifest
    from mm.training.checkpointing import complete_dirs, latest_iteration

    dirs = complete_dirs(root)
    assert latest_iteration(root) == ITERS and dirs[ITERS].name == f"iter_{ITERS:07d}", sorted(dirs)
    assert verify_manifest(dirs[ITERS]) == []
    assert not list(Path(root).glob("*.old"))


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ref") / "c")
    run_distributed(_train, 1, args=(ws, root), timeout=240)
    return _final_loss(root)


def _killed(ws, root, kill_at):
    with pytest.raises(DistributedTestError, match="exited without a result"):
        run_distributed(_train, 1, args=(ws, root, kill_at), timeout=240)


@pytest.mark.parametrize("kills", [
    # each kill is followed by a restart that resumes from the last complete checkpoint
    [("step", 3), ("shards", 4), ("manifest", 4), ("rename", 4)],
    # the pointer still names 2: the restart re-saves 4, dies between the two renames, then dies pruning
    [("pointer", 4), ("between_renames", 4), ("prune", 4)],
], ids=["step-shards-manifest-rename", "pointer-resave-prune"])
def test_kill_then_resume_matches_uninterrupted_run(ws, tmp_path, reference, kills):
    root = str(tmp_path / "c")
    for kill_at in kills:
        _killed(ws, root, kill_at)
    assert run_distributed(_train, 1, args=(ws, root), timeout=240)[0] == ITERS
    assert _final_loss(root) == reference  # exact: the resume is bitwise identical
    _check_checkpoints(root)


def _train_forever(ws, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from mm.distributed.init import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    _train(0, 1, ws, root)
    os._exit(0)


def test_kill_at_a_random_time_then_resume(ws, tmp_path, reference):
    """A SIGKILL from outside at a random moment (seeded), then a resume to the end."""
    rng = random.Random(13)
    root = str(tmp_path / "c")
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_train_forever, args=(ws, root))
    p.start()
    p.join(rng.uniform(1.0, 6.0))
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert run_distributed(_train, 1, args=(ws, root), timeout=240)[0] == ITERS
    assert _final_loss(root) == reference
    _check_checkpoints(root)
