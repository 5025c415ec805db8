"""One device per rank, named by the backend, and the world-group timeout (issue: accelerators).

On CPU the device is ``cpu``; the accelerator naming (``cuda:LOCAL_RANK``) and its checks run against a
Backend object for cuda (constructing it needs no GPU). The device tests under tests/backends run the
real placement on a GPU/NPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mm.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cuda_backend():
    return registry.Backend("cuda", "cuda", "nccl", {}, lambda d: "stub")


def test_rank_device_is_named_from_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _cuda_backend().local_device() == torch.device("cuda", 3)
    assert registry.current_backend().local_device() == torch.device("cpu")  # cpu ignores LOCAL_RANK
    monkeypatch.setenv("LOCAL_RANK", "x1")
    with pytest.raises(ValueError, match="LOCAL_RANK must be a non-negative integer, got 'x1'"):
        _cuda_backend().local_device()


def test_init_device_rejects_more_ranks_than_devices(monkeypatch):
    from mm.distributed import init

    monkeypatch.setattr(init, "current_backend", _cuda_backend)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but only 2 cuda devices are visible"):
        init.init_device()
    chosen = []
    monkeypatch.setattr(torch.accelerator, "set_device_index", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init.init_device() == torch.device("cuda", 1) and chosen == [1]  # made current before anything else


_TIMEOUT_PROBE = """
import torch, torch.distributed as dist
from mm.ops import select_backend
select_backend("cpu")
from mm.config import ParallelConfig
from mm.distributed.init import init_parallel
from megatron.core import parallel_state as mps
ps = init_parallel(ParallelConfig(distributed_timeout_minutes=7))
cpu = torch.device("cpu")
print(ps.device, dist.group.WORLD._get_backend(cpu).options._timeout,
      mps.get_data_parallel_group()._get_backend(cpu).options._timeout)
"""


def test_distributed_timeout_minutes_reaches_world_and_megatron_groups():
    """A fresh process (no torchrun variables): init_parallel's world group and megatron's groups get it."""
    env = {**os.environ, "MM_BACKEND": "cpu", "PYTHONPATH": ROOT}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _TIMEOUT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["cpu", "0:07:00", "0:07:00"], out.stdout


@pytest.mark.parametrize("flag,minutes", [([], 30.0), (["--distributed-timeout-minutes", "7"], 7.0)])
def test_distributed_timeout_flag_reaches_the_run_config(flag, minutes):
    from mm.config import ParallelConfig
    from mm.config_upstream import run_config_from_args
    from pretrain_sora import build_parser

    assert ParallelConfig().distributed_timeout_minutes == 30.0  # megatron's default
    args = build_parser().parse_args(["--mm-model", "m.json", "--mm-data", "d.json", *flag])
    assert run_config_from_args(args, 1).parallel.distributed_timeout_minutes == minutes
