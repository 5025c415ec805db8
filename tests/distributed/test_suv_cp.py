"""SparseUMMDiT under Ulysses context parallelism (gloo ranks, spec §3.3): CP = 2 alone and together with
TP = 2 (+ SP) gives the same outputs as one process, and the per-rank gradients averaged over CP (what
megatron DDP's average over DP x CP does) equal the one-process gradients. Plus a trainer smoke test."""

import math

import pytest
import torch

from harness import run_distributed
from mm.models import SparseUMMDiT
from mm.models.sparse_ummdit import gather_upstream_state_dict, load_upstream_state_dict
from suv_testing import random_inputs, random_state_dict, tiny_config

# (TP, SP, num_heads, W, L): W / L keep the per-(CP x TP)-rank sequences whole under SP
CASES = {"cp2": (1, False, 2, 10, 6), "cp2_tp2": (2, False, 4, 10, 6), "cp2_tp2_sp": (2, True, 4, 8, 8)}


def _cp_step(rank, world, tp, sp, heads, full_sd, inputs, loss_weight):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.tp_layers import allreduce_sequence_parallel_grads

    ps = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=2, sequence_parallel=sp))
    assert ps.cp_size == 2
    model = SparseUMMDiT(tiny_config(num_heads=heads), ps)
    load_upstream_state_dict(model, full_sd)
    model.train()
    latents, timestep, text, *rest = inputs
    latents, text = latents.clone().requires_grad_(), text.clone().requires_grad_()
    out = model(latents, timestep, text, *rest)  # every CP rank gets the full inputs and the full output
    (out * loss_weight).sum().backward()
    allreduce_sequence_parallel_grads(model, ps.tp_group)  # what finalize_model_grads does under SP
    grads = gather_upstream_state_dict(model, grads=True)
    return ps.cp_rank, out.detach(), grads, latents.grad, text.grad


def _reference(heads, W, L):
    cfg = tiny_config(num_heads=heads)
    model = SparseUMMDiT(cfg)
    full_sd = random_state_dict(model, seed=7)
    model.load_state_dict(full_sd)
    model.train()
    inputs = random_inputs(cfg, W=W, L=L, seed=8)
    loss_weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(9))
    latents, timestep, text, *rest = inputs
    latents, text = latents.clone().requires_grad_(), text.clone().requires_grad_()
    out = model(latents, timestep, text, *rest)
    (out * loss_weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return full_sd, inputs, loss_weight, out.detach(), grads, latents.grad, text.grad


@pytest.mark.parametrize("case", list(CASES))
def test_cp2_matches_single_process(case):
    tp, sp, heads, W, L = CASES[case]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full_sd, inputs, loss_weight, ref_out, ref_grads, ref_dlat, ref_dtext = _reference(heads, W, L)
    finally:
        torch.set_num_threads(n)
    results = run_distributed(_cp_step, 2 * tp, args=(tp, sp, heads, full_sd, inputs, loss_weight), timeout=120)
    assert sorted(r[0] for r in results) == sorted([0, 1] * tp)
    for _, out, grads, dlat, dtext in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        # input grads: the split's backward gathers (CP x own chunk) and divides by CP -> the full gradient
        torch.testing.assert_close(dlat, ref_dlat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dtext, ref_dtext, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
    # parameter grads: rank r holds CP x (contribution of its own frames/tokens); the mean over CP (megatron
    # DDP averages over DP x CP) is the one-process gradient. TP ranks hold identical gathered grads.
    for key in ref_grads:
        mean = torch.stack([r[2][key] for r in results]).mean(0)
        ref = ref_grads[key]  # the two halves are summed in another order: tolerance relative to the grad scale
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())),
                                   msg=lambda m: f"{key}: {m}")


def _cp_bad_inputs(rank, world):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    ps = init_parallel(ParallelConfig(context_parallel_size=2))
    errors = []
    try:
        SparseUMMDiT(tiny_config(num_heads=3, head_dim=16), ps)
    except ValueError as e:
        errors.append(str(e))
    model = SparseUMMDiT(tiny_config(), ps)
    for T, L in ((3, 6), (2, 5)):
        try:
            model(*random_inputs(model.suv_config, T=T, L=L, masks=False))
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_cp_divisibility_errors():
    errors = run_distributed(_cp_bad_inputs, 2, timeout=60)[0]
    assert len(errors) == 3, errors
    assert "num_heads=3" in errors[0] and "CP = 1 x 2" in errors[0]
    assert "latent frames (3)" in errors[1] and "CP size 2" in errors[1]
    assert "text tokens (5)" in errors[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tiny_workspace import make_workspace

    return make_workspace(tmp_path_factory.mktemp("ws_cp"), num=2, frames=9, cfg_rate=0.0)


def _train_cp(rank, world, ws):
    import dataclasses

    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    run = RunConfig(
        parallel=ParallelConfig(context_parallel_size=2),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-3),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=2, seed=1234),
        checkpoint=CheckpointConfig(save=None),
    )
    t = Trainer(dataclasses.replace(load_model_json(ws["model"])), load_data_config(ws["data"]), run,
                data_num_workers=0)
    assert (t.ps.cp_size, t.ps.dp_size) == (2, 1)
    return [r.loss for r in t.train()]


def test_trainer_cp2_trains(ws):
    results = run_distributed(_train_cp, 2, args=(ws,), timeout=180)
    assert all(len(losses) == 2 and all(math.isfinite(x) for x in losses) for losses in results), results
    assert results[0] == results[1]  # both CP ranks compute the same loss on the full output
