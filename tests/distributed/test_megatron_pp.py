"""megatron-core pipeline parallelism on CPU + gloo: PP=2, non-interleaved 1F1B, 4 microbatches
(MEGATRON_CPU.md experiment 4) equals a single-process run of the same 4-layer MLP.

Stage r holds layers 2r and 2r+1 of the reference. The schedule moves activations and their grads over
gloo p2p (recv buffers at ``torch.cuda.current_device()`` and ``total_num_tokens`` on ``device="cuda"``
are redirected by the cpu patches). The stage module has what the schedule requires of a model:
``model_type``, ``config`` with ``pipeline_dtype`` and ``set_input_tensor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import run_distributed

S, B, H = 4, 2, 16
NUM_MICROBATCHES = 4
NUM_LAYERS = 4


class _Stage(torch.nn.Module):
    """Two tanh-Linear layers; the first stage reads the batch, later stages the received activation."""

    def __init__(self, layers, config, first: bool):
        super().__init__()
        from megatron.core.enums import ModelType

        self.layers = torch.nn.ModuleList(layers)
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.first = first
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):
        # the schedule passes a one-element list: [received activation] (or [None] on the first stage)
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, x):
        h = x if self.first else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h  # [S, B, H]


def _reference_layers():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(H, H) for _ in range(NUM_LAYERS)]
    batches = [{"x": torch.randn(S, B, H), "target": torch.randn(S, B, H)} for _ in range(NUM_MICROBATCHES)]
    return layers, batches


def _pp_1f1b_matches_single_process(rank, world):
    import copy

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving
    from megatron.core.transformer import TransformerConfig

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    state = init_parallel(ParallelConfig(pipeline_model_parallel_size=2, distributed_timeout_minutes=1))
    assert state.pp_size == 2 and state.pp_rank == rank

    layers, batches = _reference_layers()

    # Single-process reference: the mean of the per-microbatch losses, as the schedule scales them.
    ref = copy.deepcopy(layers)
    ref_losses = []
    for mb in batches:
        h = mb["x"]
        for layer in ref:
            h = torch.tanh(layer(h))
        loss = F.mse_loss(h, mb["target"])
        (loss / NUM_MICROBATCHES).backward()
        ref_losses.append(loss.item())

    config = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=H, num_attention_heads=2, pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
    )
    mine = slice(2 * state.pp_rank, 2 * state.pp_rank + 2)
    stage = _Stage(copy.deepcopy(layers[mine]), config, first=state.pp_rank == 0)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["x"])

        def loss_func(output):
            loss = F.mse_loss(output, mb["target"])
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    assert fwd_bwd is forward_backward_pipelining_without_interleaving
    results = fwd_bwd(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[stage],
        num_microbatches=NUM_MICROBATCHES, seq_length=S, micro_batch_size=B, forward_only=False,
    )

    if state.pp_rank == 1:  # the last stage reports the losses
        losses = [r["loss"].item() for r in results]
        torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=1e-6)
    else:
        assert not results
    for got, want in zip(stage.layers, ref[mine]):
        torch.testing.assert_close(got.weight.grad, want.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.bias.grad, want.bias.grad, atol=1e-6, rtol=1e-5)
    return max((g.weight.grad - w.weight.grad).abs().max().item() for g, w in zip(stage.layers, ref[mine]))


def test_pp2_1f1b_matches_single_process():
    errs = run_distributed(_pp_1f1b_matches_single_process, 2, timeout=60)
    assert max(errs) <= 1e-6, errs
