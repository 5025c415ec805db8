"""Resume semantics (issue 13 item 1, 2): the command line's LR schedule wins unless the checkpoint's is
asked for; --no-load-optim / --no-load-rng / --finetune act; an optimizer-kind switch stops before the build."""

from __future__ import annotations

import math

import pytest
import torch

from faults_common import KeepLogs, run_config, trainer
from harness import run_distributed


def _cosine(i, decay, lr=1e-3, min_lr=1e-5):
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(i, decay) / decay))


def _schedules(rank, world, ws, root):
    from mm.config import replace

    keep = KeepLogs("mm.train")
    base = run_config(iters=4, save=root, save_interval=4, lr=1e-3, min_lr=1e-5, decay_style="cosine")
    first = [r.lr for r in trainer(ws, base).train()]
    longer = replace(base, training=replace(base.training, train_iters=8),
                     optimizer=replace(base.optimizer, lr_decay_iters=16),
                     checkpoint=replace(base.checkpoint, load=root, save=None))
    t = trainer(ws, longer)
    resumed = [(r.iteration, r.lr) for r in t.train()]
    kept = replace(longer, checkpoint=replace(longer.checkpoint, use_checkpoint_opt_param_scheduler=True))
    kept_lrs = [r.lr for r in trainer(ws, kept).train()]
    return first, resumed, kept_lrs, keep.lines


def test_command_line_schedule_wins_on_resume(ws, tmp_path):
    first, resumed, kept, lines = run_distributed(_schedules, 1, args=(ws, str(tmp_path / "c")), timeout=240)[0]
    assert first == pytest.approx([_cosine(i, 4) for i in range(1, 5)], rel=1e-6)
    # before the fix iterations 5-8 ran at min_lr: the checkpoint's 4-step schedule had ended
    assert [i for i, _ in resumed] == [5, 6, 7, 8]
    assert [lr for _, lr in resumed] == pytest.approx([_cosine(i, 16) for i in range(5, 9)], rel=1e-6)
    assert any("replaces the checkpoint's" in ln and "lr_decay_steps 4 -> 16" in ln for ln in lines), lines
    # --use-checkpoint-opt_param-scheduler keeps the finished 4-step schedule
    assert kept == pytest.approx([1e-5] * 4, rel=1e-6)


def _adam_moments(t):
    opts = getattr(t.optimizer, "chained_optimizers", [t.optimizer])
    return [o.optimizer.state[p]["exp_avg"].abs().sum().item() for o in opts for g in o.optimizer.param_groups
            for p in g["params"]]


def _ema_equals_master(t):
    from mm.training.ema_adamw import EMA_KEY

    opts = getattr(t.optimizer, "chained_optimizers", [t.optimizer])
    return all(torch.equal(o.optimizer.state[p][EMA_KEY], p.detach()) for o in opts
               for g in o.optimizer.param_groups for p in g["params"])


def _load_flags(rank, world, ws, root):
    from mm.config import ConfigErrors, replace

    base = run_config(iters=2, save=root, save_interval=2)
    t = trainer(ws, base)
    t.train()
    saved = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    resume = replace(base, checkpoint=replace(base.checkpoint, load=root, save=None))
    out = {}
    for name, changes in (("full", {}), ("no_optim", {"load_optim": False}), ("no_rng", {"load_rng": False}),
                          ("finetune", {"finetune": True})):
        torch.manual_seed(99)  # a state the checkpoint does not hold
        t = trainer(ws, replace(resume, checkpoint=replace(resume.checkpoint, **changes)))
        out[name] = dict(
            iteration=t.iteration, rng_is_checkpoints=torch.equal(torch.get_rng_state(), t_rng(root, 2)),
            weights=all(torch.equal(saved[n], p) for n, p in t.model.named_parameters()),
            moments=sum(_adam_moments(t)), ema_is_weights=_ema_equals_master(t),
            sampler=t.loader.state_dict())
    plain = replace(resume, optimizer=replace(resume.optimizer, use_distributed_optimizer=False))
    try:
        trainer(ws, plain)
        out["switch"] = None
    except ConfigErrors as e:
        out["switch"] = e.problems
    t = trainer(ws, replace(plain, checkpoint=replace(plain.checkpoint, load_optim=False),
                            training=replace(plain.training, train_iters=3)))
    out["switch_no_optim"] = [r.iteration for r in t.train()]
    return out


def t_rng(root, it):
    from mm.training.checkpointing import iter_dir

    return torch.load(iter_dir(root, it) / "rng" / "rank_00000.pt", weights_only=False)["torch"]


def test_load_flags_act_and_optimizer_switch_stops_early(ws, tmp_path):
    out = run_distributed(_load_flags, 1, args=(ws, str(tmp_path / "c")), timeout=240)[0]
    full, no_optim, no_rng, fine = out["full"], out["no_optim"], out["no_rng"], out["finetune"]
    assert full["iteration"] == 2 and full["weights"] and full["rng_is_checkpoints"] and full["moments"] > 0
    assert not full["ema_is_weights"]  # the checkpoint's EMA lags the weights
    # --no-load-optim: weights, iteration and data order resume; Adam moments restart, the EMA from the weights
    assert no_optim["iteration"] == 2 and no_optim["weights"] and no_optim["moments"] == 0
    assert no_optim["ema_is_weights"] and no_optim["sampler"] == full["sampler"]
    assert no_rng["iteration"] == 2 and no_rng["moments"] > 0 and not no_rng["rng_is_checkpoints"]
    # --finetune: the weights only, from iteration 0
    assert fine["iteration"] == 0 and fine["weights"] and fine["moments"] == 0 and not fine["rng_is_checkpoints"]
    assert fine["sampler"] != full["sampler"]
    # distributed -> plain optimizer: stopped before the build with what to do; --no-load-optim proceeds
    assert out["switch"] and "--no-load-optim" in out["switch"][0] and "distributed optimizer" in out["switch"][0]
    assert out["switch_no_optim"] == [3]
