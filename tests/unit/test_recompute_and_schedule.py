import math

import pytest
import torch

from mm.distributed.parallelize import apply_recompute, iter_blocks


def _tiny_model(seed=0):
    from mm.models import SparseUMMDiT
    from mm.models.suv_config import tiny_suv_config

    torch.manual_seed(seed)
    return SparseUMMDiT.from_upstream(tiny_suv_config()).train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([100.0, 900.0]), torch.randn(2, 6, 32, generator=g),
            torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), torch.randn(2, 16, generator=g))


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recompute_gives_identical_outputs_and_grads(granularity):
    ref, rc = _tiny_model(), _tiny_model()
    n = apply_recompute(rc, granularity, 5)
    assert n == 5
    outs = []
    for m in (ref, rc):
        out = m(*_inputs())
        out.square().mean().backward()
        outs.append((out.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert outs[0][1].keys() == outs[1][1].keys()
    for k in outs[0][1]:
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], rtol=1e-6, atol=1e-7, msg=k)


def test_recompute_reruns_the_wrapped_part_in_backward():
    m = _tiny_model()
    apply_recompute(m, "selective", 1)
    block = next(iter_blocks(m))
    count = {"n": 0}
    fn = block.ffn_part.__wrapped__

    def counted(*a):
        count["n"] += 1
        return fn(*a)

    from mm.distributed.parallelize import _checkpointed

    block.ffn_part = _checkpointed(counted)
    m(*_inputs()).sum().backward()
    assert count["n"] == 2  # forward + recomputation in backward
    with pytest.raises(ValueError, match="granularity"):
        apply_recompute(_tiny_model(), "everything", 2)


def _scheduler_lrs(style, warmup, iters, lr=1e-3, min_lr=1e-5, init=0.0):
    from mm.config import OptimizerConfig, RunConfig, TrainingConfig
    from mm.training.trainer import Trainer

    class FakeOpt:
        param_groups = [{"lr": 0.0, "wd_mult": 1.0, "lr_mult": 1.0, "weight_decay": 0.0}]

    t = Trainer.__new__(Trainer)
    t.run = RunConfig(optimizer=OptimizerConfig(lr=lr, min_lr=min_lr, lr_decay_style=style, lr_warmup_iters=warmup,
                                                lr_warmup_init=init),
                      training=TrainingConfig(train_iters=iters))
    t.optimizer = FakeOpt()
    s = t._build_scheduler()
    out = []
    for _ in range(iters):
        out.append(FakeOpt.param_groups[0]["lr"])
        s.step(increment=1)
    return out


def test_lr_schedules():
    assert _scheduler_lrs("constant", 0, 5, lr=2e-5, min_lr=2e-5) == [2e-5] * 5
    warm = _scheduler_lrs("constant", 4, 8, lr=1e-3, min_lr=1e-3)
    assert warm[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]) and warm[5:] == pytest.approx([1e-3] * 3)
    cos = _scheduler_lrs("cosine", 0, 11, lr=1e-3, min_lr=1e-5)
    assert cos[0] == pytest.approx(1e-3)
    assert cos[5] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 5 / 11)))
    assert all(a >= b for a, b in zip(cos, cos[1:]))
