"""``fuse_inner_optimizers`` names the AdamW implementation torch really runs on the CPU (the trainer's start-up
summary prints it): the per-parameter for-loop, not foreach and not fused."""

import types

import torch
import torch.optim.adam as torch_adam

from mm.training.ema_adamw import EmaAdamW, fuse_inner_optimizers


def test_cpu_description_is_the_path_torch_runs(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    inner = EmaAdamW(params, lr=1e-3)
    kind = fuse_inner_optimizers(types.SimpleNamespace(optimizer=inner), torch.device("cpu"))
    assert kind == "torch.optim.AdamW(for-loop; not fused on cpu) + EMA"

    ran = []

    def recorded(name, original):
        def run(*args, **kwargs):
            ran.append(name)
            return original(*args, **kwargs)

        return run

    for name in ("_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"):
        monkeypatch.setattr(torch_adam, name, recorded(name, getattr(torch_adam, name)))
    for p in params:
        p.grad = torch.ones_like(p)
    inner.step()
    assert ran == ["_single_tensor_adam"]
