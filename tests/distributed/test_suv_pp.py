"""Pipeline parallelism of the U-shaped SUV on megatron's own schedules (gloo ranks, issue 14): PP = 2, PP = 4,
PP = 2 with interleaving (VPP = 2), PP2 x TP2 + SP and PP2 x CP2 (PP4 with full, PP2 x TP2 + SP with selective
activation recompute) give the one-process losses and EVERY
gradient (conditioning embedder, long-skip merges, blocks, head), with random skip weights so that a dropped
skip path cannot pass. Pure helpers (cost model, cuts, packing) are checked here too."""

from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from mm.models import SparseUMMDiT
from suv_testing import random_inputs, random_state_dict, tiny_config

NUM_MICRO = 4  # a multiple of PP (interleaving needs it)
# name -> (world, parallel config kwargs, blocks per virtual stage, vpp, W, L)
RECOMPUTE = {"pp4": "full", "pp2_tp2_sp": "selective"}
CASES = {
    "pp2": (2, {}, [7, 7], 1, 10, 6),
    "pp4": (4, {}, [3, 4, 4, 3], 1, 10, 6),
    "pp2_vpp2": (2, {}, [3, 4, 4, 3], 2, 10, 6),
    "pp2_tp2_sp": (4, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, [5, 9], 1, 8, 8),
    "pp2_cp2": (4, {"context_parallel_size": 2}, [9, 5], 1, 10, 6),
}


def _micro_batches(cfg, W, L):
    out = []
    for m in range(NUM_MICRO):
        inputs = random_inputs(cfg, W=W, L=L, seed=20 + m)
        weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(40 + m))
        out.append((inputs, weight))
    return out


def _reference(W, L):
    cfg = tiny_config()
    model = SparseUMMDiT(cfg)
    full_sd = random_state_dict(model, seed=3)
    model.load_state_dict(full_sd)
    model.train()
    micro = _micro_batches(cfg, W, L)
    losses = []
    for inputs, weight in micro:
        loss = (model(*inputs) * weight).sum() / NUM_MICRO
        loss.backward()
        losses.append(float(loss.detach()) * NUM_MICRO)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return full_sd, micro, losses, grads


def _pp_run(rank, world, par, stage_blocks, vpp, full_sd, micro, recompute):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.parallelize import apply_recompute, wrap_ddp_chunks
    from mm.distributed.pipeline import build_pipeline_chunks, configure_pipeline, run_chunk, schedule_seq_length
    from mm.models.sparse_ummdit import gather_upstream_state_dict, load_upstream_state_dict

    pp = len(stage_blocks) // vpp
    ps = init_parallel(ParallelConfig(pipeline_model_parallel_size=pp,
                                      virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None, **par))
    chunks = build_pipeline_chunks(tiny_config(), ps, stage_blocks, torch.float32, vpp=vpp)
    for chunk in chunks:
        load_upstream_state_dict(chunk, full_sd)
        chunk.train()
        apply_recompute(chunk, recompute, chunk.block_range[1] - chunk.block_range[0])
    configure_pipeline(chunks, ps, vpp)
    ddps = wrap_ddp_chunks(chunks, use_distributed_optimizer=False)

    def forward_step(data_iterator, module):
        inputs, weight = next(data_iterator)
        out = run_chunk(module, module.module, *inputs)
        return out, lambda o: ((o * weight).sum() / ps.cp_size, {"loss": (o * weight).sum().detach()})

    iters = [iter(micro) for _ in chunks]
    inputs0 = micro[0][0]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if vpp > 1 else iters[0],
        model=ddps, num_microbatches=NUM_MICRO, micro_batch_size=2, forward_only=False,
        seq_length=schedule_seq_length(chunks[0], inputs0[0], inputs0[2].shape[1]))
    grads = {}
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad:
                p.grad = p.main_grad
        grads[chunk.block_range] = gather_upstream_state_dict(chunk, grads=True)
    return ps.pp_rank, [float(d["loss"]) for d in losses], grads


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(case):
    world, par, stage_blocks, vpp, W, L = CASES[case]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full_sd, micro, ref_losses, ref_grads = _reference(W, L)
    finally:
        torch.set_num_threads(n)
    results = run_distributed(_pp_run, world, args=(par, stage_blocks, vpp, full_sd, micro, RECOMPUTE.get(case)),
                              timeout=240)
    pp = len(stage_blocks) // vpp
    last = [r for r in results if r[0] == pp - 1]
    for _, losses, _ in last:  # the last stage reports the micro-batch losses
        assert len(losses) == NUM_MICRO
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    seen: dict[str, list[torch.Tensor]] = {}
    for _, _, per_chunk in results:
        for grads in per_chunk.values():
            for key, g in grads.items():
                seen.setdefault(key, []).append(g)
    assert set(seen) == set(ref_grads), set(seen) ^ set(ref_grads)
    # CP ranks hold CP x their tokens' share; megatron DDP averaged them over DP x CP: all copies equal the ref
    for key, copies in seen.items():
        ref = ref_grads[key]
        assert float(ref.abs().max()) > 0, key  # every path matters (random skip weights)
        for g in copies:  # the replicated embedder: every chunk's copy holds the PP-summed gradient
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())),
                                       msg=lambda m: f"{case} {key}: {m}")
    embed_copies = len(seen["time_text_embed.timestep_embedder.linear_1.weight"])
    assert embed_copies == len(stage_blocks) * world // pp  # one per chunk per TP/CP rank


def test_live_skips_and_packing():
    from mm.distributed.pipeline import pack_state, unpack_state
    from mm.models.sparse_ummdit import StageState, live_skips_at

    cfg = tiny_config()  # 7 stages x 2 blocks: pushes after blocks 1, 3, 5; pops before 8, 10, 12
    assert [live_skips_at(cfg, b) for b in range(15)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 2, 2, 1, 1, 0, 0]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    skips = [(torch.randn(6, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)) for _ in range(2)]
    packed = pack_state(StageState(x, y, skips))
    assert packed.shape == (27, 2, 4) and packed._base is None
    back = unpack_state(packed, (6, 3), 2)
    assert torch.equal(back.x, x) and torch.equal(back.y, y)
    assert all(torch.equal(a, b) for p, q in zip(back.skips, skips) for a, b in zip(p, q))
    padded = unpack_state(torch.cat([packed, torch.zeros(9, 2, 4)]), (6, 3), 2)  # the interleaved schedule's
    assert torch.equal(padded.skips[1][1], skips[1][1])


def test_cost_model_cuts():
    from mm.distributed.pipeline import balanced_stage_blocks, block_costs, resolve_stage_blocks
    from mm.models.suv_config import released_suv_config

    released = released_suv_config()
    # 121x576x1024 video: latent 16x72x128 -> 36,864 tokens; the sparse middle blocks are cheaper
    costs = block_costs(released, (16, 72, 128), 512)
    assert costs[0] > costs[16] > 0
    assert sum(resolve_stage_blocks(released, 4, None, (16, 72, 128), 512)) == 32
    assert balanced_stage_blocks([1.0] * 8, 4) == [2, 2, 2, 2]
    assert balanced_stage_blocks([4.0, 1, 1, 1, 1, 4.0], 3) == [1, 4, 1]
    # long sequences: dense outer blocks dominate, so the outer chunks get fewer blocks than the middle ones
    cut = balanced_stage_blocks(costs, 4)
    assert cut[0] < cut[1] and cut[3] < cut[2], cut
    with pytest.raises(ValueError, match="need 4 counts"):
        resolve_stage_blocks(released, 4, [8, 8, 16], (16, 72, 128), 512)
    with pytest.raises(ValueError, match="cannot cut"):
        balanced_stage_blocks([1.0] * 3, 4)


def test_chunk_keys_are_the_released_ones():
    """Chunks partition the released key space (global block names), and a full dict loads into each."""
    cfg = tiny_config()
    full = SparseUMMDiT(cfg).state_dict()
    keys: list[str] = []
    for b0, b1 in ((0, 3), (3, 7), (7, 11), (11, 14)):
        chunk = SparseUMMDiT(cfg, block_range=(b0, b1))
        chunk.load_state_dict(full)
        own = [k for k in chunk.state_dict() if not k.startswith("time_text_embed.")]
        keys += own
        assert (chunk.pre_process, chunk.post_process) == (b0 == 0, b1 == 14)
    assert sorted(keys) == sorted(k for k in full if not k.startswith("time_text_embed."))
    assert "transformer_blocks.3.1.attn1.to_q.weight" in SparseUMMDiT(cfg, block_range=(7, 11)).state_dict()
    with pytest.raises(ValueError, match="block_range"):
        SparseUMMDiT(cfg, block_range=(5, 15))
