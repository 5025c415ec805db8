"""Tensor-parallel building blocks for the SUV denoiser, on megatron-core (spec §3.2).

* :class:`TPContext` carries the TP group/size/rank and the sequence-parallel flag into model
  constructors (no ``parallel_state`` look-ups inside the math). ``TPContext.single()`` runs megatron's
  linears at TP = 1 **without any process group** (a :class:`SingleRankGroup` stand-in), so a model can be
  used in a plain process, and in the pytest parent that later forks gloo ranks.
* ``column_parallel`` / ``row_parallel`` build megatron ``ColumnParallelLinear`` / ``RowParallelLinear``
  (also at TP = 1, so checkpoints reshard) from one ``TransformerConfig``.
* Collectives over the TP group, each a megatron autograd mapping, skipped entirely at TP = 1:
  ``gather_last_dim`` (adaLN output: backward reduce-scatter under SP, split otherwise),
  ``copy_to_tp`` (identity, backward all-reduce), ``scatter_sequence`` / ``gather_sequence`` (SP).
* Gradient reduction of replicated parameters that see sequence-sharded activations: they carry
  ``param.sequence_parallel = True`` (megatron's convention), and either megatron's
  ``finalize_model_grads`` (with ``config.sequence_parallel``) or :func:`allreduce_sequence_parallel_grads`
  sums their grads over TP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist


class SingleRankGroup:
    """Stand-in for a TP process group of size 1 (megatron only asks it for ``size()``/``rank()``)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "SingleRankGroup()"


@dataclass(frozen=True)
class TPContext:
    group: object
    size: int
    rank: int
    sequence_parallel: bool  # effective: only True when size > 1

    @classmethod
    def single(cls) -> "TPContext":
        return cls(SingleRankGroup(), 1, 0, False)

    @classmethod
    def from_parallel_state(cls, parallel) -> "TPContext":
        """From ``mm.distributed.init.ParallelState`` (or ``None`` = one process, no groups needed)."""
        if parallel is None:
            return cls.single()
        return cls(parallel.tp_group, parallel.tp_size, parallel.tp_rank,
                   bool(parallel.sequence_parallel) and parallel.tp_size > 1)


def build_megatron_config(
    *,
    hidden_size: int,
    num_heads: int,
    num_layers: int,
    tp: TPContext,
    params_dtype: torch.dtype,
    perform_initialization: bool = True,
    init_std: float = 0.02,
):
    """The ``TransformerConfig`` the megatron linears are built from (and that megatron DDP /
    ``finalize_model_grads`` may be given): CPU-initialised master weights (identical for any TP at the
    same seed), N(0, init_std) init, no fused kernels."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=4 * hidden_size,
        tensor_model_parallel_size=tp.size,
        sequence_parallel=tp.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=init_std),
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )


def column_parallel(in_features: int, out_features: int, *, bias: bool, tp: TPContext, config):
    """Output rows split contiguously over TP; output stays sharded (``gather_output=False``). Under SP
    the input's sequence is all-gathered inside the GEMM."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    linear = ColumnParallelLinear(in_features, out_features, config=config, init_method=config.init_method,
                                  bias=bias, gather_output=False, tp_group=tp.group,
                                  disable_grad_reduce=tp.size == 1)  # at TP = 1 the input-grad all-reduce is a no-op
    linear.tp_group = tp.group  # megatron drops a non-None group when torch.distributed is not initialised
    return linear


@functools.lru_cache(maxsize=None)
def _single_process_row_class():
    """Built on first use: megatron is imported only after the backend has been selected."""
    from megatron.core.tensor_parallel import RowParallelLinear

    class SingleProcessRowParallelLinear(RowParallelLinear):
        """megatron ``RowParallelLinear`` that also runs when no torch.distributed process group exists
        (TP = 1 by construction): megatron's TP all-reduce asserts on a real group even where it would be
        a no-op. Once a process group exists it is megatron's forward unchanged."""

        def forward(self, input_):
            if dist.is_initialized():
                return super().forward(input_)
            out = torch.matmul(input_, self.weight.t())
            return (out + self.bias if self.bias is not None else out), None

    return SingleProcessRowParallelLinear


def row_parallel(in_features: int, out_features: int, *, bias: bool, tp: TPContext, config):
    """Input columns split over TP; output all-reduced (reduce-scattered along the sequence under SP).
    Its bias is replicated and megatron tags it ``sequence_parallel`` under SP."""
    if isinstance(tp.group, SingleRankGroup):
        cls = _single_process_row_class()
    else:
        from megatron.core.tensor_parallel import RowParallelLinear as cls
    linear = cls(in_features, out_features, config=config, init_method=config.init_method,
                 bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp.group)
    linear.tp_group = tp.group  # see column_parallel
    return linear


# ------------------------------------------------------------------------------ collectives over TP
def gather_last_dim(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """All-gather the TP shards of a column-parallel output along the last dim (adaLN modulation).

    Backward: with SP every rank's sequence shard contributes a different gradient, so it is a
    reduce-scatter over the TP group; without SP the downstream is replicated and it is a split.
    """
    if tp.size == 1:
        return x
    from megatron.core.tensor_parallel import mappings

    if tp.sequence_parallel:
        return mappings.all_gather_last_dim_from_tensor_parallel_region(x, group=tp.group)
    return mappings.gather_from_tensor_model_parallel_region(x, group=tp.group)


def copy_to_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Identity forward; backward all-reduces the gradient over the TP group (inputs/params replicated
    across TP and consumed by rank-specific shards, e.g. SiLU(c) before the adaLN GEMMs, QK-norm weights
    applied to each rank's own heads)."""
    if tp.size == 1:
        return x
    from megatron.core.tensor_parallel import mappings

    return mappings.copy_to_tensor_model_parallel_region(x, group=tp.group)


def scatter_sequence(x_SBE: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """SP entry: keep this rank's contiguous sequence chunk (backward all-gathers)."""
    if not tp.sequence_parallel:
        return x_SBE
    from megatron.core.tensor_parallel import mappings

    return mappings.scatter_to_sequence_parallel_region(x_SBE, group=tp.group)


def gather_sequence(x_SBE: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """SP exit before replicated compute: all-gather the sequence (backward: split, the downstream is
    replicated on every TP rank)."""
    if not tp.sequence_parallel:
        return x_SBE
    from megatron.core.tensor_parallel import mappings

    return mappings.gather_from_sequence_parallel_region(x_SBE, tensor_parallel_output_grad=False, group=tp.group)


# ------------------------------------------------------------------------------ SP gradient reduction
def mark_sequence_parallel(module: torch.nn.Module, tp: TPContext) -> None:
    """Tag every parameter of ``module`` (replicated, fed sequence-sharded activations) for the TP
    gradient all-reduce. A no-op without SP (the activations are then replicated and grads agree)."""
    for p in module.parameters():
        setattr(p, "sequence_parallel", tp.sequence_parallel)


def allreduce_sequence_parallel_grads(model: torch.nn.Module, tp_group) -> None:
    """Sum ``.grad`` of every parameter tagged ``sequence_parallel=True`` over ``tp_group`` (one coalesced
    all-reduce). For runs without megatron DDP; with DDP use ``finalize_model_grads`` (it does the same
    when ``config.sequence_parallel`` is set) and do not call this as well."""
    if tp_group is None or tp_group.size() == 1:
        return
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=tp_group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
