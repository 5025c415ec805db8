"""EMA-AdamW inside megatron's distributed optimizer: closed form, sharding over DP, checkpoint round trip."""

import copy

import pytest
import torch

from harness import run_distributed
from megatron_toys import toy_training as _train_objects, train_step as _step
from mm.training.ema_adamw import EMA_KEY, EmaAdamW, ema_decay, ema_model_state_dict


def test_ema_decay_warmup_closed_form():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(8, 0.9999) == pytest.approx(9 / 18)
    assert ema_decay(10**7, 0.9999) == 0.9999


def test_ema_adamw_matches_closed_form():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = p.detach().clone()
    opt = EmaAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, ema_decay_cap=0.9999)
    plain = torch.optim.AdamW([ref_p := torch.nn.Parameter(ref.clone())], lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.01)
    e = ref.clone()
    for u in range(4):
        g = torch.randn(5)
        p.grad, ref_p.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
        d = ema_decay(u, 0.9999)
        e = d * e + (1 - d) * ref_p.detach()
        torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p][EMA_KEY], e, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["ema_steps"] == 4
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = EmaAdamW([q], lr=0.1, ema_decay_cap=0.9999)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["ema_steps"] == 4
    torch.testing.assert_close(opt2.state[q][EMA_KEY], e, rtol=1e-6, atol=1e-7)


def _distopt_ema_resume(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig())
    torch.manual_seed(100 + rank)
    xs = [torch.randn(4, 8) for _ in range(3)]
    model, ddp, opt = _train_objects(1, seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, ddp, opt, xs[0])
    _step(model, ddp, opt, xs[1])
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    model_sd = make_sharded_tensors_for_checkpoint(model.state_dict(keep_vars=True), "model.")
    sd = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, metadata=meta)}
    import os

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(sd, ckpt_dir)
    _step(model, ddp, opt, xs[2])
    after_uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_uninterrupted = ema_model_state_dict(opt, model)

    model2, ddp2, opt2 = _train_objects(1, seed=1)  # different init: everything must come from the checkpoint
    model2_sd = make_sharded_tensors_for_checkpoint(model2.state_dict(keep_vars=True), "model.")
    loaded = dist_checkpointing.load({"model": model2_sd,
                                      "optimizer": opt2.sharded_state_dict(model2_sd, is_loading=True, metadata=meta)},
                                     ckpt_dir)
    model2.load_state_dict({k[len("model."):]: v for k, v in loaded["model"].items()})
    opt2.load_state_dict(loaded["optimizer"])
    steps = {float(s["step"]) for s in opt2.optimizer.state.values()}
    assert steps == {2.0}, steps
    assert opt2.optimizer.param_groups[0]["ema_steps"] == 2
    _step(model2, ddp2, opt2, xs[2])
    for n, p in model2.named_parameters():
        torch.testing.assert_close(p.detach(), after_uninterrupted[n], rtol=1e-5, atol=1e-6)
    ema2 = ema_model_state_dict(opt2, model2)
    for n in ema2:
        torch.testing.assert_close(ema2[n], ema_uninterrupted[n], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ema2[n], init[n])
    return True


def test_distributed_ema_adamw_checkpoint_resume(tmp_path):
    assert run_distributed(_distopt_ema_resume, 2, args=(str(tmp_path / "ckpt"),), timeout=120) == [True, True]
