"""The trainer end to end on the tiny preset (gloo, real mp4 data, tiny frozen encoders)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from harness import run_distributed
from tiny_workspace import ROOT, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), num=4, cfg_rate=0.1)


@pytest.fixture(scope="module")
def ws_one(tmp_path_factory):
    """One clip, no caption drop: every global batch is the same sample (a repeated batch)."""
    return make_workspace(tmp_path_factory.mktemp("ws1"), num=1, cfg_rate=0.0)


def _run_config(tp=1, sp=False, gbs=1, iters=4, lr=1e-3, save=None, load=None, save_interval=1000,
                encoder_dp=False, distopt=True, adam_eps=1e-15):
    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig

    return RunConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, encoder_data_parallel=encoder_dp),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr, use_distributed_optimizer=distopt, adam_eps=adam_eps),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=gbs, train_iters=iters, seed=1234),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=save_interval),
    )


def _trainer(ws, run, **spec_changes):
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    spec = dataclasses.replace(load_model_json(ws["model"]), **spec_changes)
    return Trainer(spec, load_data_config(ws["data"]), run, data_num_workers=0)


def _fixed_noise(trainer):
    """Same sigma/noise/posterior sample at every micro-step: on a repeated batch the loss must fall."""
    step = trainer.forward_step

    def forward_step(it, model):
        trainer.noise_generator.manual_seed(0)
        trainer.vae_generator.manual_seed(0)
        return step(it, model)

    trainer.forward_step = forward_step


def _losses_on_repeated_batch(rank, world, ws, tp, sp):
    t = _trainer(ws, _run_config(tp=tp, sp=sp, gbs=2 if tp == 1 else 1, iters=6, lr=3e-3))
    _fixed_noise(t)
    return [r.loss for r in t.train()]


@pytest.mark.parametrize("tp,sp", [(2, True), (1, False)], ids=["tp2-sp", "dp2"])
def test_loss_finite_and_falling_on_repeated_batch(ws_one, tp, sp):
    losses = run_distributed(_losses_on_repeated_batch, 2, args=(ws_one, tp, sp), timeout=180)[0]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses


def _one_step_params(rank, world, ws, tp, init_ckpt):
    from mm.models.sparse_ummdit import gather_upstream_state_dict

    # Adam's first step is +-lr for any non-zero grad: a large eps keeps ~1e-9 grads (where TP and TP=1
    # differ in rounding, even in sign) from turning into lr-sized differences (MEGATRON_CPU.md item 14)
    t = _trainer(ws, _run_config(tp=tp, sp=tp > 1, gbs=1, iters=1, lr=1e-3, adam_eps=1e-6),
                 predictor_checkpoint=init_ckpt)
    loss = t.train()[0].loss
    return loss, gather_upstream_state_dict(t.model)


def test_one_optimizer_step_tp2_equals_tp1(ws, tmp_path):
    from mm.config_upstream import load_model_json
    from mm.models import SparseUMMDiT

    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save(SparseUMMDiT.from_upstream(load_model_json(ws["model"]).predictor).state_dict(), init)
    loss1, p1 = run_distributed(_one_step_params, 1, args=(ws, 1, str(init)), timeout=120)[0]
    loss2, p2 = run_distributed(_one_step_params, 2, args=(ws, 2, str(init)), timeout=120)[0]
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert p1.keys() == p2.keys()
    start = torch.load(init)
    moved = 0
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=2e-5, msg=k)
        moved += int(not torch.equal(p1[k], start[k]))
    assert moved > len(p1) // 2  # the step changed most parameters


def _train_and_save(rank, world, ws, ckpt, iters, load):
    t = _trainer(ws, _run_config(tp=2, sp=True, gbs=2, iters=iters, save=ckpt, save_interval=2, load=load))
    return [r.loss for r in t.train()], t.clipper.state_dict()


def test_resume_is_bitwise_identical(ws, tmp_path):
    ref, ref_clip = run_distributed(_train_and_save, 2, args=(ws, str(tmp_path / "a"), 4, None), timeout=180)[0]
    first, _ = run_distributed(_train_and_save, 2, args=(ws, str(tmp_path / "b"), 2, None), timeout=180)[0]
    second, clip = run_distributed(_train_and_save, 2, args=(ws, str(tmp_path / "b"), 4, str(tmp_path / "b")),
                                   timeout=180)[0]
    assert first + second == ref  # exact float equality
    assert clip == ref_clip


def _skip_bad_step(rank, world, ws):
    t = _trainer(ws, _run_config(tp=1, gbs=2, iters=1))
    t.train()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    real = t.optimizer.get_grad_norm
    t.optimizer.get_grad_norm = lambda: float("nan")
    t.run.training.train_iters = 2
    res = t.train()[-1]
    unchanged = all(torch.equal(before[n], p) for n, p in t.model.named_parameters())
    t.optimizer.get_grad_norm = real
    t.run.training.train_iters = 3
    res3 = t.train()[-1]
    changed = any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())
    return res.action, unchanged, t.clipper.num_skipped, res3.action, changed


def test_non_finite_grad_norm_skips_the_update(ws):
    action, unchanged, skipped, next_action, changed = run_distributed(_skip_bad_step, 2, args=(ws,), timeout=180)[0]
    assert action == "skip" and unchanged and skipped == 1
    assert next_action in ("update", "clip") and changed


def _consumed_latents(rank, world, ws, encoder_dp):
    t = _trainer(ws, _run_config(tp=2, sp=True, gbs=2, iters=2, encoder_dp=encoder_dp))
    t.encoders.sample_posterior = False  # compare features exactly: the posterior mean
    seen = []
    step = t.forward_step

    def forward_step(it, model):
        class Peek:
            def __next__(self_inner):
                f = next(it)
                seen.append((f.latents.clone(), f.pooled.clone()))
                return f

        return step(Peek(), model)

    t.forward_step = forward_step
    losses = [r.loss for r in t.train()]
    return seen, losses


def test_encoder_dp_gives_the_same_batches(ws):
    plain = run_distributed(_consumed_latents, 2, args=(ws, False), timeout=180)
    edp = run_distributed(_consumed_latents, 2, args=(ws, True), timeout=180)
    for r in range(2):  # every rank of the TP group sees the same micro-batches, in the same order
        assert len(edp[r][0]) == len(plain[r][0]) == 4
        for (a, pa), (b, pb) in zip(plain[r][0], edp[r][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert plain[0][1] == pytest.approx(edp[0][1], rel=1e-6)


def test_torchrun_entry_point_smoke(ws, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    ckpt = tmp_path / "ckpt"
    cmd = [torchrun, "--nproc_per_node", "2", str(ROOT / "pretrain_sora.py"), "--mm-model", ws["model"],
           "--mm-data", ws["data"], "--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size",
           "1", "--global-batch-size", "2", "--train-iters", "2", "--save", str(ckpt), "--save-interval", "2",
           "--data-num-workers", "0", "--num-layers", "32", "--swiglu"]
    env = dict(os.environ, MM_BACKEND="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "iteration        2/       2 |" in out.stdout
    assert "accepted but inert" in out.stdout + out.stderr
    assert (ckpt / "iter_0000002").is_dir() and (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    log = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert any((ckpt / "tensorboard").glob("events.out.tfevents.*"))
    bad = subprocess.run([sys.executable, str(ROOT / "pretrain_sora.py"), "--mm-model", ws["model"], "--mm-data",
                          ws["data"], "--no-such-flag"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def _train_from_feature_cache(rank, world, ws, feature_dir):
    from mm.builders import build_text_encoders, build_vae
    from mm.config_upstream import load_data_config, load_model_json
    from mm.data.extract_features import extract_features
    from mm.training.trainer import Trainer

    spec = load_model_json(ws["model"])
    cfg = load_data_config(ws["data"])
    t5, clip = build_text_encoders(spec)
    extract_features(cfg, feature_dir, vae=build_vae(spec), t5=t5, clip=clip, rank=0, world_size=1)
    cached = cfg.replace(load_video_features=True, load_text_features=True, feature_dir=feature_dir)
    t = Trainer(spec, cached, _run_config(tp=1, gbs=1, iters=2), data_num_workers=0)
    losses = [r.loss for r in t.train()]
    return losses, t.encoders.vae is None and t.encoders.t5 is None


def test_training_from_the_feature_cache(ws, tmp_path):
    losses, no_encoders = run_distributed(_train_from_feature_cache, 1, args=(ws, str(tmp_path / "feat")),
                                          timeout=180)[0]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert no_encoders  # the frozen encoders are not even built when training from the cache


def _logged_vs_micro_losses(rank, world, ws):
    t = _trainer(ws, _run_config(tp=1, gbs=2, iters=1))  # 2 micro-batches per step
    raw = []
    step = t.forward_step

    def forward_step(it, model):
        out, loss_func = step(it, model)

        def recording(output):
            loss, logged = loss_func(output)
            raw.append(float(logged["loss"]))
            return loss, logged

        return out, recording

    t.forward_step = forward_step
    return t.train()[0].loss, raw


def test_logged_loss_is_the_mean_over_micro_batches(ws):
    logged, raw = run_distributed(_logged_vs_micro_losses, 1, args=(ws,), timeout=120)[0]
    assert len(raw) == 2
    assert logged == pytest.approx(sum(raw) / 2, rel=1e-6)


def _stop_after_bad_steps(rank, world, ws, save):
    from mm.training.clipping import TooManyBadSteps

    run = _run_config(tp=1, gbs=2, iters=10, save=save, save_interval=100)
    run.optimizer.max_consecutive_bad_steps = 2
    t = _trainer(ws, run)
    t.optimizer.get_grad_norm = lambda: float("inf")
    try:
        t.train()
    except TooManyBadSteps as e:
        return str(e), t.iteration, t.clipper.num_skipped
    return None


def test_run_stops_after_consecutive_bad_steps_and_keeps_a_checkpoint(ws, tmp_path):
    from mm.training.checkpointing import latest_iteration

    msg, it, skipped = run_distributed(_stop_after_bad_steps, 2, args=(ws, str(tmp_path / "c")), timeout=180)[0]
    assert "2 consecutive steps skipped" in msg and skipped == 2
    assert latest_iteration(tmp_path / "c") == it
