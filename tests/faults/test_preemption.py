"""Preemption and hangs (issue 13 item 7): SIGTERM / SIGUSR1 save at the next step boundary and stop on
every rank; --exit-interval / --exit-duration-in-mins stop with a checkpoint; a rank that makes no
progress is ended by its watchdog naming the phase; workers exit when their torchrun agent is killed
(that torchrun run also checks the quiet logs of item 9)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from faults_common import replace_training, run_config, trainer
from harness import DistributedTestError, run_distributed
from tiny_workspace import ROOT


def _signal_at(t, rank_to_signal, signum, iteration):
    step = t.forward_step

    def forward_step(it, model):
        if t.ps.rank == rank_to_signal and t.iteration + 1 == iteration:
            os.kill(os.getpid(), signum)  # arrives mid-step: acted on at the step boundary
        return step(it, model)

    t.forward_step = forward_step


def _preempted(rank, world, ws, root):
    t = trainer(ws, run_config(iters=50, save=root, save_interval=100))
    _signal_at(t, 1, signal.SIGUSR1, 3)
    t.train()
    return t.iteration, t.stop_reason


def test_signal_on_one_rank_saves_and_stops_every_rank(ws, tmp_path):
    from mm.training.checkpoint_manifest import verify_manifest
    from mm.training.checkpointing import iter_dir, latest_iteration

    root = str(tmp_path / "c")
    out = run_distributed(_preempted, 2, args=(ws, root), timeout=240)
    assert out == [(3, "received SIGUSR1")] * 2
    assert latest_iteration(root) == 3 and verify_manifest(iter_dir(root, 3)) == []


def _exit_flags(rank, world, ws, root):
    t = trainer(ws, run_config(iters=50, save=root, save_interval=100))
    t.run = replace_training(t.run, exit_interval=2)
    t.train()
    by_interval = (t.iteration, t.stop_reason)
    t.run = replace_training(t.run, exit_interval=None, exit_duration_in_mins=1e-9)
    t.train()
    by_duration = (t.iteration, t.stop_reason)
    t.run = replace_training(t.run, exit_duration_in_mins=None)
    _signal_at(t, 0, signal.SIGTERM, 5)
    t.train()
    return by_interval, by_duration, (t.iteration, t.stop_reason)


def test_sigterm_exit_interval_and_duration_stop_with_a_checkpoint(ws, tmp_path):
    from mm.training.checkpointing import complete_dirs

    root = str(tmp_path / "c")
    by_interval, by_duration, by_sigterm = run_distributed(_exit_flags, 1, args=(ws, root), timeout=240)[0]
    assert by_interval == (2, "--exit-interval 2 reached")
    assert by_duration == (3, "--exit-duration-in-mins 1e-09 reached")
    assert by_sigterm == (5, "received SIGTERM")  # before: SIGTERM killed the run with nothing saved
    assert sorted(complete_dirs(root)) == [2, 3, 5]


def _hang(rank, world, ws, log_dir):
    import logging

    from mm.config import replace

    handler = logging.FileHandler(Path(log_dir) / f"rank{rank}.log")
    logging.getLogger("mm.watchdog").addHandler(handler)
    t = trainer(ws, run_config(iters=50))  # built with the default timeouts: a slow build is no hang
    t.run = replace(t.run, parallel=replace(t.run.parallel, distributed_timeout_minutes=0.05))  # the watchdog's
    step = t.forward_step

    def forward_step(it, model):
        if rank == 1 and t.iteration == 1:
            while True:  # a rank stuck outside any collective (a wedged reader, a deadlock)
                time.sleep(1)
        return step(it, model)

    t.forward_step = forward_step
    t.train()


def test_a_rank_that_stops_making_progress_ends_the_run(ws, tmp_path):
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_hang, 2, args=(ws, str(tmp_path)), timeout=200)
    assert "timed out after" not in str(e.value)  # both ranks ended on their own, nobody hung
    stuck = (tmp_path / "rank1.log").read_text()
    assert "rank 1: no progress" in stuck and "at iteration 2 in the training step" in stuck, stuck


def test_workers_exit_when_the_torchrun_agent_is_killed(ws, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", str(ROOT / "pretrain_sora.py"), "--mm-model", ws["model"],
           "--mm-data", ws["data"], "--train-iters", "100000", "--global-batch-size", "2", "--data-num-workers", "0",
           "--save", str(tmp_path / "c"), "--save-interval", "100000"]
    env = dict(os.environ, MM_BACKEND="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    err = open(tmp_path / "stderr", "w")
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in agent.stdout], daemon=True).start()
    try:
        before = []
        while not any("iteration        1/  100000 |" in ln for ln in before):  # until the workers train
            try:
                before.append(lines.get(timeout=240))
            except queue.Empty:
                pytest.fail("no first iteration after 240 s without output:\n" + "".join(before)[-3000:])
        workers = psutil.Process(agent.pid).children()
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=120)
        assert not alive, [p.pid for p in alive]
    finally:
        if agent.poll() is None:
            agent.kill()
        for p in psutil.Process().children(recursive=True):
            p.kill()
        err.close()
    # the first to notice names the cause; its peer may instead fail on the closed connection
    assert "is gone; exiting instead of training on as an orphan" in (tmp_path / "stderr").read_text()
    # quiet logs (item 9): no megatron bucket dump, each library warning once (rank 0), one line format
    log = "".join(before)
    assert "Params for bucket" not in log
    library_on_rank1 = [ln for ln in before if "[rank 1]" in ln and not re.search(r" (INFO|WARNING|ERROR) mm\.", ln)]
    assert not library_on_rank1, library_on_rank1
    assert log.count("Falling back to Torch optimizers") == 1
    assert before[0][:4].isdigit() and " [rank 0] " in before[0]
    assert (tmp_path / "stderr").read_text().count("add_prefix_space") == 1  # rank 0 only
