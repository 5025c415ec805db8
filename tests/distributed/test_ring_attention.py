"""The ring-attention driver (``mm.distributed.ring_attention``) against one-process masked attention, in
fp64 on gloo: outputs and q/k/v gradients at ring sizes 2 and 4, with a key-padding mask that leaves whole
ring blocks fully masked for some rows (the finite-bias case); bf16 blocks (fp32 merge and dK/dV
accumulators) close to fp64; and the fp32 log-sum-exp merge itself."""

import pytest
import torch

from harness import run_distributed

B, S, H, D = 2, 3, 2, 8  # per-rank block: S queries and S keys


def _inputs(world):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, world * S, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(B, world * S, dtype=torch.bool)
    keep[1, S:] = False  # sample 1: only rank 0's keys are valid -> every other block fully masked
    keep[0, 1::2] = False  # sample 0: scattered padding
    dout = torch.randn(B, world * S, H, D, generator=g, dtype=torch.float64)
    return q, k, v, keep, dout


def _ring(rank, world, dtype=torch.float64):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.ring_attention import ring_attention
    from mm.ops.reference import MASKED_BIAS

    ps = init_parallel(ParallelConfig(context_parallel_size=world, context_parallel_algo="megatron_cp_algo"))
    q, k, v, keep, dout = _inputs(world)
    own = slice(ps.cp_rank * S, (ps.cp_rank + 1) * S)
    ql, kl, vl = (t[:, own].to(dtype).requires_grad_() for t in (q, k, v))
    bias = torch.zeros(keep.shape, dtype=torch.float32).masked_fill_(~keep, MASKED_BIAS)
    biases = [bias[:, j * S:(j + 1) * S] for j in range(world)]
    out = ring_attention(ql, kl, vl, biases, 0.3, ps.cp_group)
    assert out.dtype == dtype
    out.backward(dout[:, own].to(dtype))
    return ps.cp_rank, out.detach(), ql.grad, kl.grad, vl.grad


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_masked_attention(world):
    import mm.ops

    q, k, v, keep, dout = _inputs(world)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = mm.ops.attention(q, k, v, key_mask=keep, scale=0.3)
    ref.backward(dout)
    for rank, out, dq, dk, dv in run_distributed(_ring, world, timeout=120):
        own = slice(rank * S, (rank + 1) * S)
        torch.testing.assert_close(out, ref.detach()[:, own], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dq, q.grad[:, own], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dk, k.grad[:, own], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dv, v.grad[:, own], rtol=1e-12, atol=1e-12)


def test_bf16_ring_is_close_to_fp64():
    import mm.ops

    q, k, v, keep, dout = _inputs(2)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = mm.ops.attention(q, k, v, key_mask=keep, scale=0.3)
    ref.backward(dout)
    for rank, out, dq, dk, dv in run_distributed(_ring, 2, args=(torch.bfloat16,), timeout=120):
        own = slice(rank * S, (rank + 1) * S)
        for got, want in ((out, ref.detach()), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), want[:, own], rtol=5e-2, atol=5e-2)


def test_merge_blocks_is_attention_over_the_union():
    import mm.ops
    from mm.distributed.ring_attention import merge_blocks

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out = lse = None
    for part in (slice(0, 2), slice(2, 4)):
        out, lse = merge_blocks(out, lse, *mm.ops.attention_block(q, k[:, part], v[:, part]))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32  # bf16 blocks merge in fp32
    ref = mm.ops.attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
