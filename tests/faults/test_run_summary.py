"""The end-of-run report says how a run ended (issue 22 item 5): SIGTERM -> preempted (after the preemption save),
an exception in a step -> fault (written without a collective); both with the checkpoints written."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from faults_common import trainer, run_config
from harness import run_distributed
from test_preemption import _signal_at


def _preempted_then_faulted(rank, world, ws, root):
    t = trainer(ws, run_config(iters=50, save=root, save_interval=2))
    _signal_at(t, 0, signal.SIGTERM, 3)
    t.train()
    preempted = json.loads((Path(root) / "run_summary.json").read_text())
    step = t.forward_step

    def forward_step(it, model):
        if t.iteration == 4:
            raise RuntimeError("a broken device")
        return step(it, model)

    t.forward_step = forward_step
    with pytest.raises(RuntimeError):  # the injected fault ends the run
        t.train()
    t.close()
    return preempted, json.loads((Path(root) / "run_summary.json").read_text())


def test_summary_says_preempted_and_fault(ws, tmp_path):
    root = tmp_path / "c"
    preempted, fault = run_distributed(_preempted_then_faulted, 1, args=(ws, str(root)), timeout=240)[0]
    assert preempted["ended"] == "preempted" and preempted["reason"] == "received SIGTERM"
    assert preempted["iterations"]["last"] == 3 and preempted["checkpoints_written"] == [2, 3]
    assert preempted["wall_time_s"]["checkpoint_save"] > 0
    assert fault["ended"] == "fault" and fault["reason"] == "RuntimeError: a broken device"
    assert fault["iterations"]["last"] == 4 and fault["checkpoints_written"] == [2, 3, 4]
    md = (root / "run_summary.md").read_text()
    assert "ended: **fault** (RuntimeError: a broken device)" in md and "checkpoints written: 2, 3, 4" in md
