"""bf16 training on CPU (the accelerator recipe, minus the accelerator): TP=2 + SP, megatron's distributed
optimizer with fp32 main params + the EMA, save at step 2 and resume bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch

from harness import run_distributed
from tiny_workspace import make_workspace, tiny_trainer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws_bf16"), num=2, cfg_rate=0.0)


def _train(rank, world, ws, ckpt, iters, load):
    from mm.training.ema_adamw import EMA_KEY

    t = tiny_trainer(ws, tp=2, sp=True, iters=iters, bf16=True, save=ckpt, load=load)
    losses = [r.loss for r in t.train()]
    inner = t.optimizer.optimizer
    main = [p for g in inner.param_groups for p in g["params"]]
    dtypes = {"model": {p.dtype for p in t.model.parameters()}, "main": {p.dtype for p in main},
              "ema": {inner.state[p][EMA_KEY].dtype for p in main}}
    params = {n: p.detach().float().clone() for n, p in t.model.named_parameters()}
    return losses, dtypes, params, t.optimizer.param_groups[0]["ema_steps"]


def test_bf16_tp2_sp_distopt_trains_and_resumes_bit_exactly(ws, tmp_path):
    ref, dtypes, ref_params, ema_steps = run_distributed(_train, 2, args=(ws, str(tmp_path / "a"), 4, None),
                                                         timeout=240)[0]
    assert dtypes == {"model": {torch.bfloat16}, "main": {torch.float32}, "ema": {torch.float32}}
    assert all(math.isfinite(x) for x in ref) and ema_steps == 4
    first = run_distributed(_train, 2, args=(ws, str(tmp_path / "b"), 2, None), timeout=240)[0][0]
    second, _, params, ema_steps = run_distributed(_train, 2, args=(ws, str(tmp_path / "b"), 4, str(tmp_path / "b")),
                                                   timeout=240)[0]
    assert first + second == ref  # exact float equality across the save/resume boundary
    assert ema_steps == 4  # the EMA warm-up counter came back from the checkpoint
    for n in ref_params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=0, msg=n)
