import pytest
import torch
import torch.distributed as dist

from harness import DistributedTestError, run_distributed


def _allreduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank1(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank


def _hang_rank0(rank, world):
    if rank == 0:
        import time

        time.sleep(30)


def test_results_from_every_rank():
    assert run_distributed(_allreduce, 2) == [3.0, 3.0]


def test_exception_is_propagated_with_traceback():
    with pytest.raises(DistributedTestError, match="boom on rank 1"):
        run_distributed(_fail_on_rank1, 2)


def test_hang_times_out():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_hang_rank0, 2, timeout=2)
