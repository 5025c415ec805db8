"""Tiny megatron models + DDP + (EMA) distributed optimizer, shared by the checkpoint and optimizer tests."""

import torch


def toy_model(tp_group_size, seed=0):
    from megatron.core import tensor_parallel
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp_group_size)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = tensor_parallel.ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.normal_,
                                                            bias=True, gather_output=False)
            self.fc2 = tensor_parallel.RowParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.normal_,
                                                         bias=True, input_is_parallel=True, skip_bias_add=False)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.fc2(torch.tanh(self.fc1(x)[0]))[0])

    torch.manual_seed(seed)
    return cfg, Toy()


def toy_training(tp, seed=0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mm.training.ema_adamw import make_ema_optimizer

    cfg, model = toy_model(tp, seed)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.05, adam_eps=1e-8, clip_grad=0.0,
                                                 use_distributed_optimizer=True), [ddp])
    make_ema_optimizer(opt, 0.9999)
    return model, ddp, opt


def train_step(model, ddp, opt, x):
    ddp.zero_grad_buffer()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    ddp.finish_grad_sync()
    opt.step()
