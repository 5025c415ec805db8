"""megatron ``dist_checkpointing`` (``torch_dist``) on CPU + gloo reshards tensor-parallel weights
(MEGATRON_CPU.md experiment 7): a model saved at TP=2 (2 ranks) loads at TP=1 (1 rank), and back, with
every weight exactly equal to the full reference.

The unwrapped module's ``sharded_state_dict()`` is what is saved: the DDP wrapper's adds a ``module.``
prefix (pitfall 11), which would make a checkpoint depend on whether the saver used DDP.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed

H, FFN = 16, 32


def _full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
        "norm.bias": 0.1 * torch.randn(H, generator=g),
        "fc1.weight": torch.randn(FFN, H, generator=g),
        "fc1.bias": torch.randn(FFN, generator=g),
        "fc2.weight": torch.randn(H, FFN, generator=g),
        "fc2.bias": torch.randn(H, generator=g),
    }


def _build(tp: int):
    """LayerNorm -> ColumnParallelLinear -> RowParallelLinear at TP=``tp`` (weights zero-initialised)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    state = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, distributed_timeout_minutes=1))
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN,
                               tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               params_dtype=torch.float32)

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.norm = WrappedTorchNorm(config, H)
            self.fc1 = ColumnParallelLinear(H, FFN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                                            gather_output=False)
            self.fc2 = RowParallelLinear(FFN, H, config=config, init_method=torch.nn.init.zeros_, bias=True,
                                         input_is_parallel=True, skip_bias_add=False)

    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return state, config, net


def _shard(full: dict[str, torch.Tensor], tp: int, r: int) -> dict[str, torch.Tensor]:
    ffn = slice(r * FFN // tp, (r + 1) * FFN // tp)
    out = dict(full)
    out["fc1.weight"], out["fc1.bias"], out["fc2.weight"] = full["fc1.weight"][ffn], full["fc1.bias"][ffn], \
        full["fc2.weight"][:, ffn]
    return out


def _save(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    state, config, net = _build(tp=world)
    with torch.no_grad():
        for name, w in _shard(_full_weights(), state.tp_size, state.tp_rank).items():
            net.get_parameter(name).copy_(w)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), net)
    assert all(k.startswith("module.") for k in ddp.sharded_state_dict()), "pitfall 11 changed upstream"
    sd = net.sharded_state_dict()
    assert {k for k in sd if not k.endswith("._extra_state")} == set(_full_weights()), sorted(sd)
    dist_checkpointing.save(sd, ckpt_dir)
    dist.barrier()


def _load(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing

    state, _, net = _build(tp=world)
    missing, unexpected = net.load_state_dict(dist_checkpointing.load(net.sharded_state_dict(), ckpt_dir))
    assert not missing and not unexpected, (missing, unexpected)
    want = _shard(_full_weights(), state.tp_size, state.tp_rank)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return {name: p.detach().clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("save_tp,load_tp", [(2, 1), (1, 2)], ids=["tp2_to_tp1", "tp1_to_tp2"])
def test_dist_checkpoint_reshards_tensor_parallel(tmp_path, save_tp, load_tp):
    run_distributed(_save, save_tp, args=(str(tmp_path),), timeout=60)
    loaded = run_distributed(_load, load_tp, args=(str(tmp_path),), timeout=60)
    assert len(loaded) == load_tp
    if load_tp == 1:  # the single-rank load holds the full weights
        full = _full_weights()
        assert {n: t.shape for n, t in loaded[0].items()} == {n: t.shape for n, t in full.items()}
