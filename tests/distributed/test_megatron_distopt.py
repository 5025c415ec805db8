"""megatron-core ``DistributedDataParallel`` + distributed optimizer (torch-AdamW fallback) on CPU + gloo
(MEGATRON_CPU.md experiments 6 and 7), checked against a single-process ``torch.optim.AdamW``:

* DP=2 and TP=2 with sequence parallelism: parameters after 3 steps equal the reference (Adam magnifies
  ~1e-7 grad differences, so the tolerance is ~1e-5, item 14).
* checkpoint resume: 2 steps, ``dist_checkpointing`` save of model + optimizer (``torch_dist``,
  ``fully_reshardable``), a fresh model + optimizer loads it (same layout, and resharded TP2 -> DP2),
  1 more step == 3 uninterrupted steps, and every parameter's AdamW ``step`` reads 3 (without patch P7 the
  params share one step tensor that advances once per param per step: a silently wrong bias correction).

Model: LayerNorm -> ColumnParallelLinear -> GeLU -> RowParallelLinear on ``[S, B, H]``. Loss: the global
MSE, whatever the layout: DP ranks average (DDP scales grads by 1/DP); with SP each rank sums its
sequence shard and divides by the global element count, so the TP ranks' losses add up to it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_distributed

S, B, H, FFN = 8, 4, 16, 32
LR, WD, CLIP = 1e-2, 0.1, 1.0
ATOL, RTOL = 1e-5, 1e-5
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


# ----------------------------------------------------------------------------------------------- model
def _reference():
    """Full model and data, identical on every rank (same seed)."""
    torch.manual_seed(0)
    ref = torch.nn.ModuleDict(
        {"norm": torch.nn.LayerNorm(H), "fc1": torch.nn.Linear(H, FFN), "fc2": torch.nn.Linear(FFN, H)}
    )
    with torch.no_grad():  # non-trivial norm params
        ref["norm"].weight.add_(0.1 * torch.randn(H))
        ref["norm"].bias.add_(0.1 * torch.randn(H))
    data = [(torch.randn(S, B, H), torch.randn(S, B, H)) for _ in range(3)]
    return ref, data


def _ref_forward(ref, x):
    return ref["fc2"](F.gelu(ref["fc1"](ref["norm"](x))))


def _reference_run(num_steps: int):
    """torch AdamW with megatron's default groups (no weight decay on biases and 1-D params) and clipping."""
    ref, data = _reference()
    decay = [p for n, p in ref.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in ref.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for x, t in data[:num_steps]:
        opt.zero_grad()
        F.mse_loss(_ref_forward(ref, x), t).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
    return ref


def _build(state):
    """megatron model (DDP-wrapped) + distributed optimizer for the current parallel layout."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN,
        tensor_model_parallel_size=state.tp_size, sequence_parallel=state.sequence_parallel,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.norm = WrappedTorchNorm(config, H, eps=1e-5)
            self.fc1 = ColumnParallelLinear(H, FFN, config=config, init_method=torch.nn.init.zeros_, bias=True,
                                            gather_output=False)
            self.fc2 = RowParallelLinear(FFN, H, config=config, init_method=torch.nn.init.zeros_, bias=True,
                                         input_is_parallel=True, skip_bias_add=False)

        def forward(self, x):  # [S(/TP with SP), B, H] -> same
            h, _ = self.fc1(self.norm(x))
            y, _ = self.fc2(F.gelu(h))
            return y

    net = Net()
    ref, _ = _reference()
    r, tp = state.tp_rank, state.tp_size
    ffn = slice(r * FFN // tp, (r + 1) * FFN // tp)
    with torch.no_grad():
        net.norm.weight.copy_(ref["norm"].weight)
        net.norm.bias.copy_(ref["norm"].bias)
        net.fc1.weight.copy_(ref["fc1"].weight[ffn])
        net.fc1.bias.copy_(ref["fc1"].bias[ffn])
        net.fc2.weight.copy_(ref["fc2"].weight[:, ffn])
        net.fc2.bias.copy_(ref["fc2"].bias)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), net
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.999,
                        adam_eps=1e-8, clip_grad=CLIP, use_distributed_optimizer=True, bf16=False, fp16=False,
                        params_dtype=torch.float32),
        [ddp],
    )
    # megatron marks biases / 1-D params with wd_mult=0; its LR/WD scheduler (Megatron-LM's
    # OptimizerParamScheduler) turns that into each group's weight_decay. No scheduler here, so do it.
    for group in opt.param_groups:
        group["weight_decay"] = WD * group["wd_mult"]
    return net, ddp, opt


def _train(state, ddp, opt, steps: tuple[int, int]):
    """Train on reference batches ``steps[0]:steps[1]``, sliced for this rank's DP / SP shard."""
    from megatron.core.distributed import finalize_model_grads

    _, data = _reference()
    for x, t in data[steps[0]:steps[1]]:
        if state.dp_size > 1:  # DP ranks take disjoint samples
            b = slice(state.dp_rank * B // state.dp_size, (state.dp_rank + 1) * B // state.dp_size)
            x, t = x[:, b], t[:, b]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        if state.sequence_parallel:  # TP ranks take disjoint sequence shards; the loss sums over them
            s = slice(state.tp_rank * S // state.tp_size, (state.tp_rank + 1) * S // state.tp_size)
            loss = (ddp(x[s]) - t[s]).pow(2).sum() / t.numel()
        else:
            loss = F.mse_loss(ddp(x), t)
        loss.backward()
        finalize_model_grads([ddp])  # DP reduce-scatter + TP all-reduce of the SP norm grads
        ok, grad_norm, _ = opt.step()
        assert ok


def _gathered(net, state) -> dict[str, torch.Tensor]:
    """Full parameters: TP shards all-gathered along their partition dim."""
    out = {}
    for name, p in net.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and state.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(state.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=state.tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t
    return out


def _assert_matches_reference(net, state, ref, atol=ATOL, rtol=RTOL):
    got = _gathered(net, state)
    want = {n: p.detach() for n, p in ref.named_parameters()}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")
    return max((got[n] - want[n]).abs().max().item() for n in want)


def _adam_steps(opt) -> list[float]:
    """The torch AdamW ``step`` of every param (shard) this rank's distributed optimizer owns."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    steps = []
    for o in getattr(opt, "chained_optimizers", [opt]):  # get_megatron_optimizer returns a chain
        assert isinstance(o, DistributedOptimizer), type(o)
        assert isinstance(o.optimizer, torch.optim.AdamW), type(o.optimizer)
        steps += [float(st["step"]) for st in o.optimizer.state.values()]
    return steps


def _layout(tp: int):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    return init_parallel(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                                        distributed_timeout_minutes=1))


# ----------------------------------------------------------------------------------------------- tests
def _train_matches_torch_adamw(rank, world, tp):
    state = _layout(tp)
    assert state.dp_size == world // tp
    net, ddp, opt = _build(state)
    _train(state, ddp, opt, (0, 3))
    assert _adam_steps(opt) and all(s == 3 for s in _adam_steps(opt)), _adam_steps(opt)
    return _assert_matches_reference(net, state, _reference_run(3))


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2_sp"])
def test_distributed_optimizer_matches_torch_adamw(tp):
    errs = run_distributed(_train_matches_torch_adamw, 2, args=(tp,), timeout=60)
    assert max(errs) <= ATOL, errs


def _resume_matches_uninterrupted(rank, world, save_tp, load_tp, ckpt_dir):
    from megatron.core import dist_checkpointing

    # 2 steps in the saving layout, then save the unwrapped module + optimizer (pitfall 11).
    state = _layout(save_tp)
    net, ddp, opt = _build(state)
    _train(state, ddp, opt, (0, 2))
    model_sd = net.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=False, metadata=SHARDING)},
        ckpt_dir, content_metadata=SHARDING,
    )
    dist.barrier()

    # Loading layout: an uninterrupted 3-step run, and a fresh model + optimizer resumed from the checkpoint.
    state = _layout(load_tp)
    net_a, ddp_a, opt_a = _build(state)
    _train(state, ddp_a, opt_a, (0, 3))

    net_c, ddp_c, opt_c = _build(state)
    model_sd = net_c.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": opt_c.sharded_state_dict(model_sd, is_loading=True, metadata=SHARDING)},
        ckpt_dir,
    )
    net_c.load_state_dict(loaded["model"])
    opt_c.load_state_dict(loaded["optimizer"])
    assert all(s == 2 for s in _adam_steps(opt_c)), f"after load: AdamW steps {_adam_steps(opt_c)}, want 2"
    _train(state, ddp_c, opt_c, (2, 3))

    steps = _adam_steps(opt_c)
    assert steps and all(s == 3 for s in steps), f"AdamW step per param after resume: {steps}, want 3 (P7)"
    # same layout: bit-for-bit the same arithmetic; resharded: reductions regroup, so Adam-level tolerance
    tol = dict(atol=1e-7, rtol=1e-6) if save_tp == load_tp else dict(atol=ATOL, rtol=RTOL)
    a, c = _gathered(net_a, state), _gathered(net_c, state)
    for n in a:
        torch.testing.assert_close(c[n], a[n], **tol, msg=lambda m, n=n: f"resumed vs uninterrupted {n}: {m}")
    return _assert_matches_reference(net_c, state, _reference_run(3))


@pytest.mark.parametrize("save_tp,load_tp", [(1, 1), (2, 1)], ids=["dp2_to_dp2", "tp2sp_to_dp2"])
def test_distributed_optimizer_checkpoint_resume(tmp_path, save_tp, load_tp):
    errs = run_distributed(_resume_matches_uninterrupted, 2, args=(save_tp, load_tp, str(tmp_path)), timeout=60)
    assert max(errs) <= ATOL, errs
