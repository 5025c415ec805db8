"""SparseUMMDiT under megatron tensor parallelism (2 gloo ranks): TP = 2 and TP = 2 + sequence parallel
give the same outputs and (full-key-space, gathered) gradients as one process (spec §3.2, §10.1)."""

import pytest
import torch

from harness import run_distributed
from mm.models import SparseUMMDiT
from mm.models.sparse_ummdit import gather_upstream_state_dict, load_upstream_state_dict
from suv_testing import random_inputs, random_state_dict, tiny_config


def _tp_step(rank, world, sequence_parallel, full_sd, inputs, loss_weight):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.tp_layers import allreduce_sequence_parallel_grads

    ps = init_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel))
    model = SparseUMMDiT(tiny_config(), ps)
    load_upstream_state_dict(model, full_sd)
    model.train()
    out = model(*inputs)
    (out * loss_weight).sum().backward()
    allreduce_sequence_parallel_grads(model, ps.tp_group)  # what finalize_model_grads does under SP
    grads = gather_upstream_state_dict(model, grads=True)
    params = gather_upstream_state_dict(model)
    tagged = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    sharded = {k: tuple(v.global_shape) for k, v in model.sharded_state_dict().items() if isinstance(v, ShardedTensor)}
    # fresh init at TP = 2 from the same seed equals the TP = 1 init (megatron builds full master weights)
    torch.manual_seed(123)
    fresh = gather_upstream_state_dict(SparseUMMDiT(tiny_config(), ps))
    # a parallel=None (TP = 1, no group needed) model also works inside an initialised TP = 2 world
    single = SparseUMMDiT(tiny_config())
    single.load_state_dict(full_sd)
    with torch.no_grad():
        single_out = single(*inputs)
    return out.detach(), grads, params, tagged, sharded, fresh, single_out


@pytest.fixture(scope="module")
def reference():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config()
        model = SparseUMMDiT(cfg)
        full_sd = random_state_dict(model, seed=7)
        model.load_state_dict(full_sd)
        model.train()
        inputs = random_inputs(cfg, seed=8)
        loss_weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(9))
        out = model(*inputs)
        (out * loss_weight).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.manual_seed(123)
        fresh = SparseUMMDiT(cfg).state_dict()
    finally:
        torch.set_num_threads(n)
    return full_sd, inputs, loss_weight, out.detach(), grads, fresh


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_matches_single_process(reference, sequence_parallel):
    full_sd, inputs, loss_weight, ref_out, ref_grads, ref_fresh = reference
    results = run_distributed(_tp_step, 2, args=(sequence_parallel, full_sd, inputs, loss_weight), timeout=60)
    for out, grads, params, tagged, sharded, fresh, single_out in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single_out, ref_out, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        assert params.keys() == full_sd.keys() and all(torch.equal(params[k], full_sd[k]) for k in full_sd)
        assert sharded == {k: tuple(v.shape) for k, v in full_sd.items()}
        assert fresh.keys() == ref_fresh.keys() and all(torch.equal(fresh[k], ref_fresh[k]) for k in ref_fresh)
        if sequence_parallel:
            # LayerNorms, skip linears, the head's norms and row-parallel biases see sequence shards
            assert "transformer_blocks.0.0.norm1.norm.weight" in tagged
            assert "transformer_blocks.3.1.attn1.to_out.0.bias" in tagged
            assert "skip_norm_linear_enc.1.1.weight" in tagged and "norm_out.norm.bias" in tagged
            assert not any("norm_q" in k or ".linear." in k or "proj_out" in k for k in tagged)
        else:
            assert tagged == []
