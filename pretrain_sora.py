"""Train Open-Sora Plan v1.5 (SUV) on megatron-core.

    torchrun --nproc_per_node N pretrain_sora.py --mm-model model.json --mm-data data.json \\
        --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --global-batch-size 2 \\
        --train-iters 1000 --save CKPT --save-interval 100 [--load CKPT] [--bf16] [--use-distributed-optimizer]

Runs in a plain process too (world 1). ``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from mm.config_upstream import add_megatron_flags

    p = argparse.ArgumentParser(
        description="Train the Open-Sora Plan v1.5 SUV denoiser on megatron-core (flow matching, frozen WFVAE + "
                    "T5 + CLIP). Upstream launch flags keep their upstream meaning; GPT placeholders are accepted "
                    "with a warning and have no effect.")
    p.add_argument("--mm-model", required=True, help="upstream model JSON (ae, text encoders, predictor, diffusion)")
    p.add_argument("--mm-data", required=True, help="upstream data JSON (or a data.txt list)")
    p.add_argument("--tensorboard-dir", default=None, help="TensorBoard directory (default: <save>/tensorboard)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: known accelerators; n/a on CPU)")
    p.add_argument("--data-num-workers", type=int, default=None, help="DataLoader workers (default: data JSON)")
    p.add_argument("--data-index", default=None,
                   help="on-disk sample index directory (default: the cache of this data config, built on first use; "
                        "python -m mm.data.build_index builds one ahead)")
    add_megatron_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # rank 0 reports progress; the others only warnings
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    from mm.ops import select_backend

    select_backend(args.backend)  # before megatron is imported anywhere
    from mm.config_upstream import load_data_config, load_model_json, run_config_from_args, warn_inert_flags
    from mm.training.clipping import TooManyBadSteps
    from mm.training.trainer import Trainer

    warn_inert_flags(args)
    spec = load_model_json(args.mm_model)
    data_cfg = load_data_config(args.mm_data)
    run = run_config_from_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    if spec.enable_encoder_dp and not run.parallel.encoder_data_parallel:
        run = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, encoder_data_parallel=True))
    trainer = Trainer(spec, data_cfg, run, tensorboard_dir=args.tensorboard_dir, peak_tflops=args.peak_tflops,
                      data_num_workers=args.data_num_workers, data_index=args.data_index)
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
