"""torch.distributed + megatron ``parallel_state`` from a typed ``ParallelConfig``.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK) and in a plain
single process (world 1, no environment variables needed: a private TCP store on a free port).

One device per rank, named by the backend (``cuda:LOCAL_RANK``, ``npu:LOCAL_RANK`` or ``cpu``) and made
current *before* the process group and megatron build anything: megatron allocates its DDP buffers and
communication tensors on the current device, and NCCL/HCCL only accept tensors on it. The world group's
timeout is ``ParallelConfig.distributed_timeout_minutes`` (``--distributed-timeout-minutes``, default 30
as in megatron), so a slow checkpoint write on a big model does not kill the job.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mm.config import ParallelConfig
from mm.ops import current_backend, select_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks and groups of this process, handed to model constructors (no look-ups inside math)."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: object
    pp_size: int
    pp_rank: int
    cp_size: int
    cp_rank: int
    cp_group: object
    dp_size: int
    dp_rank: int
    dp_group: object
    dp_cp_group: object
    sequence_parallel: bool
    device: torch.device  # this rank's device: every model, batch and collective tensor lives here
    # context-parallel algorithm: the Ulysses part of CP (cp_size: Ulysses, 1: ring) and, for the hybrid,
    # megatron's hierarchical CP groups (inner = Ulysses over consecutive CP ranks, outer = ring)
    cp_algo: str = "ulysses_cp_algo"
    cp_ulysses_size: int | None = None
    cp_inner_group: object = None
    cp_outer_group: object = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_device() -> torch.device:
    """Name this rank's device from the backend and make it the current one; returns it."""
    backend = current_backend()
    device = backend.local_device()
    if device.type != "cpu":
        count = torch.accelerator.device_count()
        if device.index >= count:
            raise ValueError(f"LOCAL_RANK={device.index} but only {count} {device.type} devices are visible; "
                             f"launch at most {count} processes per node")
        torch.accelerator.set_device_index(device.index)
    return device


def init_process_group(timeout_s: float = 120.0) -> None:
    """Initialise the default process group once (no-op if already initialised), after ``init_device``."""
    if dist.is_initialized():
        return
    backend = current_backend()
    init_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend.dist_backend, rank=rank, world_size=world, timeout=timeout)
    else:
        if world != 1:
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are unset; launch with torchrun")
        store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timeout)
        dist.init_process_group(backend.dist_backend, store=store, rank=0, world_size=1, timeout=timeout)


def init_parallel(cfg: ParallelConfig, backend: str | None = None, timeout_s: float | None = None) -> ParallelState:
    """Select the backend (if not yet), set this rank's device, init the process group (timeout
    ``timeout_s``, default ``cfg.distributed_timeout_minutes``) and megatron's model-parallel groups."""
    select_backend(backend)
    device = init_device()
    init_process_group(60.0 * cfg.distributed_timeout_minutes if timeout_s is None else timeout_s)
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    dp = cfg.data_parallel_size(world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    u = cfg.ulysses_size
    hybrid = [u, cfg.context_parallel_size // u] if 1 < u < cfg.context_parallel_size else None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        hierarchical_context_parallel_sizes=hybrid,
        distributed_timeout_minutes=max(1, int(round(cfg.distributed_timeout_minutes))),
    )
    inner = outer = None
    if hybrid:
        inner, outer = ps.get_hierarchical_context_parallel_groups()
    state = ParallelState(
        world_size=world,
        rank=dist.get_rank(),
        tp_size=cfg.tensor_model_parallel_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_size=cfg.pipeline_model_parallel_size,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_size=cfg.context_parallel_size,
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group(),
        dp_size=dp,
        dp_rank=ps.get_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        sequence_parallel=cfg.sequence_parallel,
        device=device,
        cp_algo=cfg.context_parallel_algo,
        cp_ulysses_size=u,
        cp_inner_group=inner,
        cp_outer_group=outer,
    )
    logger.info(
        "parallel layout: world %d = TP %d x PP %d x CP %d (%s, Ulysses %d x ring %d) x DP %d (SP %s) on %s",
        world, state.tp_size, state.pp_size, state.cp_size, cfg.context_parallel_algo, u,
        cfg.context_parallel_size // u, dp, cfg.sequence_parallel, device,
    )
    return state


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
