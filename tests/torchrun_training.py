"""Run ``pretrain_sora.py`` under ``torchrun`` on a tiny workspace (cpu backend) and read its logged losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_workspace import ROOT


def torchrun_losses(ws: dict[str, str], nproc: int, flags: list[str], save: Path, iters: int,
                    global_batch: int, log_interval: int = 1) -> tuple[list[float], str]:
    """Train ``iters`` steps (seed 1234, lr 1e-3, micro-batch 1, a log line per ``log_interval`` steps) with the
    extra ``flags``; returns the losses of ``save/train_log.jsonl`` and the console output. Fails the test on a
    non-zero exit."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(nproc), str(ROOT / "pretrain_sora.py"), "--mm-model", ws["model"],
           "--mm-data", ws["data"], *flags, "--micro-batch-size", "1", "--global-batch-size", str(global_batch),
           "--train-iters", str(iters), "--seed", "1234", "--lr", "1e-3", "--min-lr", "1e-3", "--log-interval", str(log_interval),
           "--save", str(save), "--save-interval", "100", "--data-num-workers", "0"]
    env = dict(os.environ, MM_BACKEND="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(save / "train_log.jsonl") as f:
        return [json.loads(line)["loss"] for line in f], proc.stdout + proc.stderr
