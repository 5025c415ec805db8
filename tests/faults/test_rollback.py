"""--rollback-on-spike FACTOR (issue 13 "loss-spike policy"): a loss above FACTOR x its running mean
reloads the last checkpoint and skips the offending batch; counted in the log, the JSON log and the
summary; a spike that keeps coming back ends the run with a reason."""

from __future__ import annotations

import dataclasses
import json

from faults_common import KeepLogs, replace_training, run_config, trainer
from harness import run_distributed


def _spiking(rank, world, ws, root, spikes):
    from mm.config import replace
    from mm.training.clipping import TooManyBadSteps

    keep = KeepLogs("mm.train")
    run = replace_training(run_config(iters=6, save=root, save_interval=4, gbs=1), rollback_on_spike=3.0)
    run = replace(run, optimizer=replace(run.optimizer, max_consecutive_bad_steps=2))  # 2 rollbacks per iteration
    t = trainer(ws, run)
    real = t.train_step
    fired = []

    def train_step(features):
        res = real(features)
        if res.iteration == 5 and len(fired) < spikes:  # a batch that blows the loss up
            fired.append(res.iteration)
            res = dataclasses.replace(res, loss=res.loss * 100)
        return res

    t.train_step = train_step
    try:
        t.train()
        stopped = None
    except TooManyBadSteps as e:
        stopped = str(e)
    s = t.loader.sampler
    return dict(iteration=t.iteration, rollbacks=t.rollbacks, consumed=s.epoch * s.epoch_length + s.consumed_samples,
                lines=keep.lines, stopped=stopped, iterations=[r.iteration for r in t.history])


def test_spike_rolls_back_and_skips_the_batch(ws, tmp_path):
    root = tmp_path / "c"
    out = run_distributed(_spiking, 1, args=(ws, str(root), 1), timeout=240)[0]
    assert out["stopped"] is None and out["iteration"] == 6 and out["rollbacks"] == 1
    # iteration 5 ran again from the iteration-4 checkpoint, with the batch of the spike dropped
    assert out["iterations"] == [1, 2, 3, 4, 5, 6]
    assert out["consumed"] == 7  # 6 steps of one sample + the skipped one
    assert any("iteration 5: loss" in ln and "rolling back" in ln for ln in out["lines"]), out["lines"]
    summary = next(ln for ln in out["lines"] if ln.startswith("run summary"))
    assert "loss-spike rollbacks: 1" in summary
    log = [json.loads(ln) for ln in (root / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["rollbacks"] == 1


def test_a_spike_that_keeps_coming_back_stops_the_run(ws, tmp_path):
    out = run_distributed(_spiking, 1, args=(ws, str(tmp_path / "c"), 99), timeout=240)[0]
    assert out["stopped"] and "spiked again after 2 rollbacks" in out["stopped"]
