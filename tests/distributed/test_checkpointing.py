"""Atomic dist_checkpointing saves: resume exactness, resharding TP2 -> TP1/DP2, crash safety, pruning."""

import os
from pathlib import Path

import pytest
import torch

from harness import run_distributed
from megatron_toys import toy_model as _toy, toy_training as _train_objects, train_step as _step
from mm.training import checkpointing as ck


def _full_weights(model, tp_group):
    import torch.distributed as dist

    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
        if dim >= 0 and dist.get_world_size(tp_group) > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim)
        out[name] = t.clone()
    return out


def _save_tp2(rank, world, root):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    st = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    model, ddp, opt = _train_objects(2)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    from mm.training.ema_adamw import ema_model_state_dict

    _step(model, ddp, opt, x)
    ema = ema_model_state_dict(opt, model)
    ck.save_checkpoint(root, 1, model, opt, {"iteration": 1, "note": "tp2"}, ema_weights=ema)
    ema_full = _full_weights(_Holder(model, ema), st.tp_group)
    _step(model, ddp, opt, x)  # the uninterrupted continuation
    return _full_weights(model, st.tp_group), ema_full


class _Holder(torch.nn.Module):
    """Parameters of ``model`` replaced by ``tensors`` (same TP attributes), for gathering."""

    def __init__(self, model, tensors):
        super().__init__()
        self.items = []
        for name, p in model.named_parameters():
            q = torch.nn.Parameter(tensors[name].clone())
            for a in ("tensor_model_parallel", "partition_dim"):
                if hasattr(p, a):
                    setattr(q, a, getattr(p, a))
            self.items.append((name, q))

    def named_parameters(self, *args, **kwargs):
        return iter(self.items)


def _load_tp1_dp2(rank, world, root):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig(tensor_model_parallel_size=1))
    model, ddp, opt = _train_objects(1, seed=123)
    it, common = ck.load_checkpoint(root, model, opt)
    assert it == 1 and common["note"] == "tp2"
    assert {float(s["step"]) for s in opt.optimizer.state.values()} == {1.0}
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    _step(model, ddp, opt, x)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load_ema_tp1(rank, world, root):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig())
    _, model = _toy(1, seed=7)
    ck.load_checkpoint(root, model, None, use_ema=True, load_rng=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_save_tp2_resume_tp1_dp2_matches_uninterrupted(tmp_path):
    root = str(tmp_path / "ckpt")
    ref, ema = run_distributed(_save_tp2, 2, args=(root,), timeout=120)[0]
    loaded_ema = run_distributed(_load_ema_tp1, 1, args=(root,), timeout=60)[0]
    for n in ema:
        torch.testing.assert_close(loaded_ema[n], ema[n], rtol=0, atol=0)
    assert ck.latest_iteration(root) == 1
    got = run_distributed(_load_tp1_dp2, 2, args=(root,), timeout=120)[0]
    # same global batch on both layouts (DP ranks see the same x), so one more step must agree
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5)


def _save_then_crash(rank, world, root):
    from megatron.core import dist_checkpointing

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig())
    model, ddp, opt = _train_objects(1)
    for it in (1, 2, 3):
        ck.save_checkpoint(root, it, model, opt, {"iteration": it}, keep_last=2)
    import re

    import torch.distributed as dist

    complete = sorted(p.name for p in Path(root).glob("iter_*") if re.fullmatch(r"iter_\d{7}", p.name))
    assert complete == ["iter_0000002", "iter_0000003"], complete
    dist.barrier()  # nobody starts the crashing save while another rank is still listing
    real_save = dist_checkpointing.save

    def crashing_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError("disk full (simulated crash after the shards were written)")

    dist_checkpointing.save = crashing_save
    try:
        with pytest.raises(OSError, match="disk full"):  # the failure reaches the caller
            ck.save_checkpoint(root, 4, model, opt, {"iteration": 4})
    finally:
        dist_checkpointing.save = real_save
    assert ck.latest_iteration(root) == 3
    it, common = ck.load_checkpoint(root, model, opt)
    return it, common["iteration"], os.path.isdir(os.path.join(root, "iter_0000004.tmp"))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = run_distributed(_save_then_crash, 2, args=(str(tmp_path / "c"),), timeout=120)
    assert out[0] == (3, 3, True)


def test_latest_iteration_errors(tmp_path):
    assert ck.latest_iteration(tmp_path) is None
    (tmp_path / ck.LATEST).write_text("garbage")
    with pytest.raises(ValueError, match="corrupt checkpoint pointer"):
        ck.latest_iteration(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path / "empty", torch.nn.Linear(1, 1), None)
