"""megatron-core tensor parallelism on CPU + gloo: ColumnParallelLinear -> GeLU -> RowParallelLinear at TP=2
equals one ``nn.Linear`` pair (MEGATRON_CPU.md experiment 2), with and without sequence parallelism.

Each rank builds the full reference from the same seed, slices its shard of the weights into the megatron
layers, runs forward/backward on both, gathers the TP shards (outputs, input grads, weight grads) and
compares. Layout is megatron's ``[S, B, H]``; with SP the input/output are split along S over the TP group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_distributed

S, B, H, FFN = 8, 2, 16, 32
ATOL = RTOL = 1e-5


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather ``t`` over ``group`` and concatenate along ``dim`` (test-side, no autograd)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _tp_mlp_matches_dense(rank, world, sequence_parallel):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    state = init_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                                         distributed_timeout_minutes=1))
    tp, tp_rank, group = state.tp_size, state.tp_rank, state.tp_group
    assert tp == 2 and ps.get_tensor_model_parallel_world_size() == 2

    # Reference: identical on every rank (same seed).
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(H, FFN), torch.nn.Linear(FFN, H)
    x = torch.randn(S, B, H)
    g = torch.randn(S, B, H)  # loss = <y, g>: every output element gets a distinct upstream grad
    x_ref = x.clone().requires_grad_(True)
    y_ref = fc2(F.gelu(fc1(x_ref)))
    (y_ref * g).sum().backward()

    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    col = ColumnParallelLinear(H, FFN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                               gather_output=False)
    row = RowParallelLinear(FFN, H, config=config, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    ffn_shard = slice(tp_rank * FFN // tp, (tp_rank + 1) * FFN // tp)
    with torch.no_grad():
        col.weight.copy_(fc1.weight[ffn_shard])  # column parallel: output dim (0) split
        col.bias.copy_(fc1.bias[ffn_shard])
        row.weight.copy_(fc2.weight[:, ffn_shard])  # row parallel: input dim (1) split
        row.bias.copy_(fc2.bias)  # replicated; added after the reduce(-scatter)

    seq_shard = slice(tp_rank * S // tp, (tp_rank + 1) * S // tp)
    x_in = (x[seq_shard] if sequence_parallel else x).clone().requires_grad_(True)
    h, _ = col(x_in)
    y, _ = row(F.gelu(h))
    assert y.shape == ((S // tp) if sequence_parallel else S, B, H)
    (y * (g[seq_shard] if sequence_parallel else g)).sum().backward()

    if sequence_parallel:
        y_full, dx_full = _gather(y.detach(), 0, group), _gather(x_in.grad, 0, group)
        # The row bias is added after the reduce-scatter, so each rank's grad covers its own sequence
        # shard only: partial. megatron tags it and finalize_model_grads all-reduces it over TP.
        assert getattr(row.bias, "sequence_parallel", False) is True
        partial = row.bias.grad.clone()
        container = torch.nn.Module()
        container.col, container.row = col, row
        container.ddp_config = DistributedDataParallelConfig()
        _allreduce_non_tensor_model_parallel_grads([container], config, group)
        assert not torch.allclose(partial, fc2.bias.grad, atol=ATOL, rtol=RTOL), "SP row bias grad was not partial"
    else:
        y_full, dx_full = y.detach(), x_in.grad

    close = dict(atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y_full, y_ref.detach(), **close)
    torch.testing.assert_close(dx_full, x_ref.grad, **close)
    torch.testing.assert_close(_gather(col.weight.grad, 0, group), fc1.weight.grad, **close)
    torch.testing.assert_close(_gather(col.bias.grad, 0, group), fc1.bias.grad, **close)
    torch.testing.assert_close(_gather(row.weight.grad, 1, group), fc2.weight.grad, **close)
    torch.testing.assert_close(row.bias.grad, fc2.bias.grad, **close)
    return (y_full - y_ref).abs().max().item()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_column_row_parallel_mlp_matches_dense(sequence_parallel):
    errs = run_distributed(_tp_mlp_matches_dense, 2, args=(sequence_parallel,), timeout=60)
    assert all(e <= ATOL for e in errs), errs
