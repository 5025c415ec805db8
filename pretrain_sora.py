"""Train Open-Sora Plan v1.5 (SUV) on megatron-core.

    torchrun --nproc_per_node N pretrain_sora.py --mm-model model.json --mm-data data.json \\
        --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --global-batch-size 2 \\
        --train-iters 1000 --save CKPT --save-interval 100 [--load CKPT] [--bf16] [--use-distributed-optimizer]

Runs in a plain process too (world 1). ``--help`` lists every flag. Exit codes: 0 done, or stopped on
request (SIGTERM/SIGUSR1, ``--exit-interval``, ``--exit-duration-in-mins``) after saving; 2 bad arguments
(nothing built); 3 too many consecutive bad steps (last good state saved); 4 a rank made no progress for
``--distributed-timeout-minutes``; 5 the torchrun agent died.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


class _RankZeroParser(argparse.ArgumentParser):
    """argparse whose usage errors (exit 2) are printed by rank 0 only, not once per torchrun worker."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from mm.config_upstream import add_megatron_flags

    p = _RankZeroParser(
        description="Train the Open-Sora Plan v1.5 SUV denoiser on megatron-core (flow matching, frozen WFVAE + "
                    "T5 + CLIP). Upstream launch flags keep their upstream meaning; GPT placeholders are accepted "
                    "with a warning and have no effect.")
    p.add_argument("--mm-model", required=True, help="upstream model JSON (ae, text encoders, predictor, diffusion)")
    p.add_argument("--mm-data", required=True, help="upstream data JSON (or a data.txt list)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: known accelerators; n/a on CPU)")
    p.add_argument("--data-num-workers", type=int, default=None, help="DataLoader workers (default: data JSON)")
    p.add_argument("--data-index", default=None,
                   help="on-disk sample index directory (default: the cache of this data config, built on first use; "
                        "python -m mm.data.build_index builds one ahead)")
    add_megatron_flags(p)
    from mm.training.observability import add_log_flags

    add_log_flags(p)
    from mm.tools.dry_run import add_dry_run_flags

    add_dry_run_flags(p)
    return p


def _errors(problems: list[str], rank: int) -> None:
    if rank == 0:  # the other ranks found the same problems
        for p in problems:
            print(f"pretrain_sora.py: error: {p}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mm.logs import setup_logging

    rank = setup_logging()  # rank 0 reports progress; the others only warnings
    from mm.training.watchdog import watch_parent

    watch_parent(rank)  # first: under torchrun, exit when the agent dies instead of training on as an orphan
    from mm.config import ConfigErrors
    from mm.config_upstream import warn_inert_flags
    from mm.training.preflight import validate_training

    if rank == 0:
        warn_inert_flags(args)
    from mm.training.observability import log_config_from_args

    log_config = log_config_from_args(args)
    try:  # every problem at once, before anything is built
        from mm.tools.dry_run import world_size_of

        spec, data_cfg, run = validate_training(args, world_size_of(args, int(os.environ.get("WORLD_SIZE", "1"))))
    except ConfigErrors as e:
        _errors(e.problems + log_config.problems(), rank)
        return 2
    if log_config.problems():
        _errors(log_config.problems(), rank)
        return 2
    if args.dry_run:  # the layout on simulated ranks, per-rank parameters and memory; no data, no devices
        from mm.tools.dry_run import dry_run

        return dry_run(spec, data_cfg, run, args.world_size)
    from mm.ops import BackendUnavailableError, select_backend

    try:
        select_backend(run.backend.name)  # before megatron is imported anywhere
    except BackendUnavailableError as e:
        _errors([str(e)], rank)
        return 2
    from mm.training.checkpointing import CheckpointError
    from mm.training.clipping import TooManyBadSteps
    from mm.training.trainer import Trainer

    try:
        trainer = Trainer(spec, data_cfg, run, log_config=log_config, peak_tflops=args.peak_tflops,
                          data_num_workers=args.data_num_workers, data_index=args.data_index)
    except CheckpointError as e:  # no checkpoint under --load verifies (each bad file named)
        _errors([str(e)], rank)
        from mm.distributed.init import destroy_parallel

        destroy_parallel()
        return 2
    try:
        trainer.train()
    except TooManyBadSteps as e:
        logging.getLogger("mm.train").error("%s", e)
        return 3
    finally:
        trainer.close()
        from mm.distributed.init import destroy_parallel

        destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
