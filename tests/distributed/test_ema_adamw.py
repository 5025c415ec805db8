"""The weight EMA composed onto megatron's inner optimizer: closed form, sharding over DP, checkpoint round
trip, with torch AdamW and with a stand-in for TE/apex ``FusedAdam`` (another class, per-group ``step``,
state created on the first step), which megatron builds when either library is installed."""

import contextlib
import copy

import pytest
import torch

from harness import run_distributed
from megatron_toys import toy_training as _train_objects, train_step as _step
from mm.training.ema_adamw import EMA_KEY, EmaAdamW, EmaStep, attach_ema, ema_decay, ema_model_state_dict


class FusedAdamStandIn(torch.optim.Optimizer):
    """Stands in for apex/TE ``FusedAdam``: not a torch Adam subclass, ``step`` counted per param group,
    ``exp_avg``/``exp_avg_sq`` created when a parameter's state is empty, megatron's constructor kwargs."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 capturable=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (b1, b2), t = group["betas"], group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(update, alpha=group["lr"])


@contextlib.contextmanager
def megatron_with_fused_adam():
    """megatron as it is with apex installed: it builds ``FusedAdamStandIn`` and takes its apex code paths
    (the cpu patch set's torch-AdamW checkpoint fixes are conditional on *no* apex/TE: lifted too)."""
    import megatron.core.optimizer as mo
    import megatron.core.optimizer.distrib_optimizer as do
    import megatron_patches

    saved = [(mo, "Adam"), (mo, "USING_PYTORCH_OPTIMIZER"), (do, "Adam"), (do, "HAVE_APEX_OR_TE"),
             (do, "USING_APEX_OPTIMIZER")]
    saved = [(m, k, getattr(m, k)) for m, k in saved]
    mo.Adam, mo.USING_PYTORCH_OPTIMIZER = FusedAdamStandIn, False
    do.Adam, do.HAVE_APEX_OR_TE, do.USING_APEX_OPTIMIZER = FusedAdamStandIn, True, True
    try:
        with contextlib.ExitStack() as stack:
            for name in ("torch_adamw_distopt_ckpt.sharded_state_dict", "torch_adamw_distopt_ckpt.set_states",
                         "torch_adamw_distopt_ckpt.load_state_dict"):
                stack.enter_context(megatron_patches.disabled(name))
            yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def test_ema_decay_warmup_closed_form():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(8, 0.9999) == pytest.approx(9 / 18)
    assert ema_decay(10**7, 0.9999) == 0.9999



def _steps_match_closed_form(opt, plain, p, ref_p, steps: int) -> torch.Tensor:
    """Step ``opt`` (with EMA) and ``plain`` (without) on the same grads: the weights stay bitwise equal
    (the inner step is untouched) and the EMA follows ``e <- d*e + (1-d)*w`` with the warm-up decay."""
    e = p.detach().clone()
    for u in range(steps):
        g = torch.randn(p.numel())
        p.grad, ref_p.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
        d = ema_decay(u, 0.9999)
        e = d * e + (1 - d) * ref_p.detach()
        torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p][EMA_KEY], e, rtol=1e-6, atol=1e-7)
    return e

def test_ema_adamw_matches_closed_form():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = p.detach().clone()
    opt = EmaAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, ema_decay_cap=0.9999)
    plain = torch.optim.AdamW([ref_p := torch.nn.Parameter(ref.clone())], lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.01)
    e = _steps_match_closed_form(opt, plain, p, ref_p, 4)
    assert opt.param_groups[0]["ema_steps"] == 4
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = EmaAdamW([q], lr=0.1, ema_decay_cap=0.9999)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["ema_steps"] == 4
    torch.testing.assert_close(opt2.state[q][EMA_KEY], e, rtol=1e-6, atol=1e-7)


def test_ema_composes_onto_another_optimizer_class():
    """On a non-torch-Adam class the EMA is created at the first step from the weights *before* the update."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    ref_p = torch.nn.Parameter(p.detach().clone())
    opt = attach_ema(FusedAdamStandIn([p], lr=0.1, weight_decay=0.01), 0.9999)
    plain = FusedAdamStandIn([ref_p], lr=0.1, weight_decay=0.01)
    assert isinstance(opt, FusedAdamStandIn) and isinstance(opt, EmaStep) and type(opt).__name__ == "EmaFusedAdamStandIn"
    assert len(opt.state[p]) == 0  # nothing put into the state the inner class initialises itself
    e = _steps_match_closed_form(opt, plain, p, ref_p, 3)
    assert opt.param_groups[0]["ema_steps"] == 3 and opt.param_groups[0]["step"] == 3


def _distopt_ema_resume(rank, world, ckpt_dir, fused=False):
    with megatron_with_fused_adam() if fused else contextlib.nullcontext():
        return _distopt_ema_resume_body(rank, ckpt_dir, fused)


def _distopt_ema_resume_body(rank, ckpt_dir, fused):
    from megatron.core import dist_checkpointing

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig())
    torch.manual_seed(100 + rank)
    xs = [torch.randn(4, 8) for _ in range(3)]
    model, ddp, opt = _train_objects(1, seed=0)
    inner_cls = FusedAdamStandIn if fused else torch.optim.AdamW
    assert isinstance(opt.optimizer, inner_cls) and isinstance(opt.optimizer, EmaStep), type(opt.optimizer).__mro__
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
    if fused:  # apex/TE count steps per param group
        assert {g["step"] for g in opt2.optimizer.param_groups if g["params"]} == {2}
    else:
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


@pytest.mark.parametrize("fused", [False, True], ids=["torch_adamw", "fused_adam_stand_in"])
def test_distributed_ema_checkpoint_resume(tmp_path, fused):
    assert run_distributed(_distopt_ema_resume, 2, args=(str(tmp_path / "ckpt"), fused), timeout=120) == [True, True]
