"""``pretrain_sora.py --dry-run --world-size N``: the whole configuration of an N-device run, checked in one
process before any cluster time is spent.

After the entry point's validation pass (``mm.training.preflight.validate_training`` at world size N: flags,
JSONs, input files, layout vs heads, batch divisibility, PP / CP restrictions), the SUV (at PP > 1 each
stage's chunk, with the trainer's stage cuts) is built on the meta
device once per tensor-parallel rank of the real layout (simulated ranks: a stand-in process group of the
TP size per rank; megatron's linears split by it exactly as on the cluster), per-rank parameter counts are
printed, and the planner's per-rank memory estimate (``mm.tools.plan``) for this layout, micro-batch,
sequence shape and recompute setting, with the known devices it fits on. Nothing is read from the data and
no accelerator is touched: the process runs the cpu backend with a one-process gloo group, no torchrun.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


def add_dry_run_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dry run")
    g.add_argument("--dry-run", action="store_true",
                   help="validate everything for --world-size devices, build the model on the meta device per "
                        "simulated TP rank, print per-rank parameters and the planner's memory estimate, and exit "
                        "(no torchrun, no data, no accelerator)")
    g.add_argument("--world-size", type=int, default=None, help="devices of the simulated run (with --dry-run)")


def world_size_of(args: argparse.Namespace, environment_world: int) -> int:
    """The world size to validate against; usage problems end the process with one ``error:`` line (exit 2)."""
    if args.dry_run and (args.world_size is None or args.world_size < 1):
        print(f"pretrain_sora.py: error: --dry-run needs --world-size N (N >= 1), got {args.world_size}", file=sys.stderr)
        raise SystemExit(2)
    if not args.dry_run and args.world_size is not None:
        print("pretrain_sora.py: error: --world-size is only for --dry-run (torchrun sets the world size)",
              file=sys.stderr)
        raise SystemExit(2)
    return args.world_size if args.dry_run else environment_world


class SimulatedGroup:
    """A process group of ``size`` ranks seen from rank ``rank``: megatron asks it only for size() and rank()
    while building its linears."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@dataclass(frozen=True)
class SimulatedRank:
    """What the SUV constructor reads from ``mm.distributed.init.ParallelState``."""

    tp_size: int
    tp_rank: int
    tp_group: SimulatedGroup
    cp_size: int
    cp_rank: int
    cp_group: SimulatedGroup
    sequence_parallel: bool
    cp_ulysses_size: int | None = None  # the Ulysses part of CP (None: all of it); ring CP splits no heads


def per_tp_rank_params(spec, tp: int, cp: int, sequence_parallel: bool, params_dtype,
                       block_range: tuple[int, int] | None = None, ulysses: int | None = None) -> list[int]:
    """Parameters held by each TP rank (every CP / DP rank with the same TP rank holds the same ones), of the
    whole SUV or of the pipeline chunk over ``block_range``."""
    from mm.models.sparse_ummdit import SparseUMMDiT

    counts = []
    for r in range(tp):
        sim = SimulatedRank(tp, r, SimulatedGroup(tp, r), cp, 0, SimulatedGroup(cp, 0), sequence_parallel, ulysses)
        model = SparseUMMDiT(spec.suv_config(), sim, params_dtype, device="meta", block_range=block_range)
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts


def dry_run(spec, data_cfg, run, world_size: int) -> int:
    import torch

    from mm.distributed import pipeline
    from mm.distributed.init import init_process_group
    from mm.ops import select_backend
    from mm.tools import plan

    select_backend("cpu")  # nothing runs: meta tensors and a one-process gloo group (megatron reads group sizes)
    init_process_group()
    par, tr = run.parallel, run.training
    tp, cp, pp = par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size
    dp = par.data_parallel_size(world_size)
    dtype = torch.bfloat16 if tr.bf16 else torch.float32
    sp = par.sequence_parallel and tp > 1
    facts = plan.model_facts(spec)
    stage_plan = None
    if pp == 1:
        counts = per_tp_rank_params(spec, tp, cp, sp, dtype, ulysses=par.ulysses_size)
        assert sum(counts) - (tp - 1) * facts.replicated_params == facts.total_params, (counts, facts)
    else:  # the trainer's stage cuts (cost model or --pipeline-stage-blocks) and each stage's chunk
        thw, text_len = pipeline.data_latent_shape(data_cfg)
        chunks = pp * (par.virtual_pipeline_model_parallel_size or 1)
        blocks = pipeline.resolve_stage_blocks(spec.suv_config(), chunks, par.pipeline_stage_blocks, thw, text_len)
        stage_plan = pipeline.stage_plan_text(spec.suv_config(), blocks, pp, thw, text_len)
        stage_counts = [per_tp_rank_params(spec, tp, cp, sp, dtype, r, par.ulysses_size)
                        for r in pipeline.block_ranges(blocks)]
    layout, work = plan.Layout.of_run(run, world_size), plan.Workload.of_run(data_cfg, run)
    rc, layers = layout.recompute, layout.recompute_layers
    any_device = plan.DEVICES["h100"]  # the memory estimate does not depend on the device
    est = plan.estimate(facts, layout, work, any_device, world_size)
    mem, peak = est.memory, plan.peak_bytes(est.memory)
    lines = [
        f"dry run: world {world_size} = TP {tp} x PP {pp} x CP {cp} x DP {dp}; sequence parallel {sp}; "
        f"micro-batch {tr.micro_batch_size} x DP {dp} x {tr.num_microbatches(dp)} micro-batches = global batch "
        f"{tr.global_batch_size}; recompute {rc}" + (f" ({layers} blocks)" if rc != "none" else ""),
        f"SUV: {facts.total_params:,} parameters ({facts.tp_split_params:,} split over TP, "
        f"{facts.replicated_params:,} replicated); dtype {dtype}",
    ]
    if pp == 1:
        lines.append("per-rank parameters (rank = tp_rank + TP x (cp_rank + CP x dp_rank)):")
        for r, n in enumerate(counts):
            lines.append(f"  TP rank {r} ({world_size // tp} ranks: {r}, {r + tp}, ...): {n:,}")
    else:
        lines.append(stage_plan)
        lines.append("per-rank parameters (rank = tp_rank + TP x (cp_rank + CP x (dp_rank + DP x pp_rank))):")
        for stage, counts in enumerate(stage_counts):
            lines.append(f"  stage {stage} (PP rank {stage % pp}): " + ", ".join(f"TP rank {r} {n:,}" for r, n in enumerate(counts)))
    lines.append(f"per-rank memory estimate (mm.tools.plan) for {data_cfg.num_frames}x{data_cfg.max_height}x"
                 f"{data_cfg.max_width} clips, {work.video_tokens(facts)} video + {work.text_len} text tokens"
                 + (" (the fullest pipeline stage of the planner's cost-model cut, one chunk per rank)" if pp > 1
                    else "") + ":")
    lines.append("  " + ", ".join(f"{k} {v / plan.GB:.2f} GB" for k, v in mem.items()) + f"; peak {peak / plan.GB:.2f} GB")
    if est.stage_peaks:
        lines.append("  peak per stage: " + ", ".join(f"{b / plan.GB:.2f} GB" for b in est.stage_peaks))
    fits = [f"{d.name} {'fits' if peak <= d.memory_gb * (1 - plan.HEADROOM) * plan.GB else 'does NOT fit'}"
            for d in plan.DEVICES.values()]
    lines.append("  " + "; ".join(fits))
    for note in facts.frozen_notes:
        lines.append(f"  note: {note}")
    lines.append("configuration valid; no data read, no device touched")
    print("\n".join(lines))
    from mm.distributed.init import destroy_parallel

    destroy_parallel()
    return 0
