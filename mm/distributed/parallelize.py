"""Techniques applied to a built SUV from outside the model (ARCHITECTURE.md principle 2).

TP and SP are chosen at construction (which linear classes, which groups); what is composed here:

* ``apply_recompute``: activation checkpointing (spec §7.6). ``selective`` wraps the FFN half of each
  block (adaLN #2 + both FFNs + gated residuals) of the first ``num_layers`` blocks; ``full`` wraps
  whole blocks. Non-reentrant ``torch.utils.checkpoint``; the SUV has no dropout, so replays are exact.
* ``wrap_ddp``: megatron DDP (fp32 grad buffers, optional distributed-optimizer layout) and the
  hooks megatron's schedules read from the model config; ``wrap_ddp_chunks`` for a rank's pipeline chunks.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def iter_blocks(model):
    """The SUV blocks in global order (layer_idx - 1 of spec §2.8)."""
    for stage in model.transformer_blocks:
        yield from stage


def apply_recompute(model, granularity: str | None, num_layers: int) -> int:
    """Wrap the first ``num_layers`` blocks; returns how many were wrapped."""
    if granularity is None or num_layers <= 0:
        return 0
    if granularity not in ("selective", "full"):
        raise ValueError(f"recompute granularity must be 'selective' or 'full', got {granularity!r}")
    wrapped = 0
    for i, block in enumerate(iter_blocks(model)):
        if i >= num_layers:
            break
        if granularity == "selective":
            block.ffn_part = _checkpointed(block.ffn_part)
        else:
            block.forward = _checkpointed(block.forward)
        wrapped += 1
    logger.info("activation recompute: %s for %d blocks", granularity, wrapped)
    return wrapped


def _single_stage_input(tensors) -> None:
    """The one-stage SUV takes no activation from a previous pipeline stage."""
    assert all(t is None for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])), tensors


def wrap_ddp(model, *, use_distributed_optimizer: bool):
    """megatron DDP around the SUV; sets the schedule hooks on ``model.config``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.enums import ModelType

    model.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look up
    if getattr(model, "set_input_tensor", None) is None:  # pipeline chunks have theirs (mm.distributed.pipeline)
        model.set_input_tensor = _single_stage_input
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer),
        model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def wrap_ddp_chunks(chunks, *, use_distributed_optimizer: bool) -> list:
    """One megatron DDP per pipeline chunk (``mm.distributed.pipeline``); with interleaving the schedule
    reads one ``no_sync`` per chunk from the first chunk's config."""
    ddps = [wrap_ddp(chunk, use_distributed_optimizer=use_distributed_optimizer) for chunk in chunks]
    if len(ddps) > 1:
        for chunk in chunks:
            chunk.config.no_sync_func = [d.no_sync for d in ddps]
    return ddps
