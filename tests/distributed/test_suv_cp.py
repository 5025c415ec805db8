"""SparseUMMDiT under context parallelism (gloo ranks, spec §3.3): Ulysses, ring (megatron_cp_algo) and
the hybrid (Ulysses x ring) alone and with TP = 2 (+ SP), with a padded caption and a padded video mask and
frame counts CP does not divide (the flattened sequences are padded and split), give the same outputs as
one process, and the per-rank gradients averaged over CP (what megatron DDP's average over DP x CP does)
equal the one-process gradients. The trainer: ``test_trainer_cp.py``."""

import pytest
import torch

from harness import run_distributed
from mm.models import SparseUMMDiT
from mm.models.sparse_ummdit import gather_upstream_state_dict, load_upstream_state_dict
from suv_testing import random_inputs, random_state_dict, tiny_config

# name: (algo, CP, Ulysses degree (hybrid), TP, SP, num_heads, T, W, L). Ulysses cases keep T and L divisible
# by CP as before; the ring / hybrid cases use T = 3 latent frames and L = 5 caption tokens (padded).
CASES = {
    "cp2": ("ulysses_cp_algo", 2, None, 1, False, 2, 2, 10, 6),
    "cp2_tp2": ("ulysses_cp_algo", 2, None, 2, False, 4, 2, 10, 6),
    "cp2_tp2_sp": ("ulysses_cp_algo", 2, None, 2, True, 4, 2, 8, 8),
    "cp2_odd_frames": ("ulysses_cp_algo", 2, None, 1, False, 2, 3, 10, 5),
    "ring2": ("megatron_cp_algo", 2, None, 1, False, 2, 3, 10, 5),
    "ring2_tp2_sp": ("megatron_cp_algo", 2, None, 2, True, 2, 3, 10, 5),
    "ring4": ("megatron_cp_algo", 4, None, 1, False, 1, 3, 10, 5),
    "hybrid2x2": ("hybrid_cp_algo", 4, 2, 1, False, 2, 3, 10, 5),
    # tiny sparse_n [1, 2, 4, 4, 4, 2, 1]: at CP 2 every sparse stage keeps whole sub-sequences (dense: Ulysses);
    # at CP 4 the k = 4 stages do, the k = 2 and dense ones run the ring (2 heads)
    "skiparse2": ("skiparse_cp_algo", 2, None, 1, False, 2, 3, 10, 5),
    "skiparse2_tp2_sp": ("skiparse_cp_algo", 2, None, 2, True, 4, 3, 10, 5),
    "skiparse4": ("skiparse_cp_algo", 4, None, 1, False, 2, 3, 10, 5),
}


def _cp_step(rank, world, case, full_sd, inputs, loss_weight):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.tp_layers import allreduce_sequence_parallel_grads

    algo, cp, uly, tp, sp, heads = CASES[case][:6]
    ps = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
                                      context_parallel_algo=algo, ulysses_degree_in_cp=uly))
    assert ps.cp_size == cp
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


def _reference(heads, T, W, L):
    cfg = tiny_config(num_heads=heads)
    model = SparseUMMDiT(cfg)
    full_sd = random_state_dict(model, seed=7)
    model.load_state_dict(full_sd)
    model.train()
    inputs = random_inputs(cfg, T=T, W=W, L=L, seed=8)
    loss_weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(9))
    latents, timestep, text, *rest = inputs
    latents, text = latents.clone().requires_grad_(), text.clone().requires_grad_()
    out = model(latents, timestep, text, *rest)
    (out * loss_weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return full_sd, inputs, loss_weight, out.detach(), grads, latents.grad, text.grad


@pytest.mark.parametrize("case", list(CASES))
def test_cp_matches_single_process(case):
    algo, cp, uly, tp, sp, heads, T, W, L = CASES[case]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full_sd, inputs, loss_weight, ref_out, ref_grads, ref_dlat, ref_dtext = _reference(heads, T, W, L)
    finally:
        torch.set_num_threads(n)
    results = run_distributed(_cp_step, cp * tp, args=(case, full_sd, inputs, loss_weight), timeout=180)
    assert sorted(r[0] for r in results) == sorted(list(range(cp)) * tp)
    for _, out, grads, dlat, dtext in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        # input grads: the split's backward gathers (CP x own chunk) and divides by CP -> the full gradient
        torch.testing.assert_close(dlat, ref_dlat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dtext, ref_dtext, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
    # parameter grads: rank r holds CP x (contribution of its own tokens); the mean over CP (megatron DDP
    # averages over DP x CP) is the one-process gradient. TP ranks hold identical gathered grads.
    for key in ref_grads:
        mean = torch.stack([r[2][key] for r in results]).mean(0)
        ref = ref_grads[key]  # the parts are summed in another order: tolerance relative to the grad scale
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())),
                                   msg=lambda m: f"{key}: {m}")


def _cp_heads(rank, world):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    errors = []
    for algo in ("ulysses_cp_algo", "megatron_cp_algo"):
        ps = init_parallel(ParallelConfig(context_parallel_size=2, context_parallel_algo=algo))
        try:
            SparseUMMDiT(tiny_config(num_heads=3), ps)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_cp_head_constraint_is_ulysses_only():
    errors = run_distributed(_cp_heads, 2, timeout=60)[0]
    assert len(errors) == 1, errors  # the ring builds 3 heads at CP = 2
    assert "num_heads=3" in errors[0] and "Ulysses-CP = 1 x 2" in errors[0] and "megatron_cp_algo" in errors[0]


def test_cp_algo_config_errors():
    from mm.config import ParallelConfig

    with pytest.raises(ValueError, match=r"ulysses_degree_in_cp.*one of \[1, 2, 4\]"):
        ParallelConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=3)
    with pytest.raises(ValueError, match="unset unless context_parallel_algo is hybrid_cp_algo"):
        ParallelConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo", ulysses_degree_in_cp=2)
    with pytest.raises(ValueError, match="context_parallel_algo"):
        ParallelConfig(context_parallel_size=2, context_parallel_algo="ring")
    assert ParallelConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo",
                          ulysses_degree_in_cp=2).ulysses_size == 2
