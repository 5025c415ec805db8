"""A tiny, real training/inference workspace in a temp dir: synthetic mp4 clips + tiny T5/CLIP, and
copies of the examples/tiny JSONs pointing at them (optionally smaller clips for speed)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(tmp: str | os.PathLike, *, num: int = 4, frames: int = 9, size: int = 32, cfg_rate: float = 0.1,
                   text_len: int = 16) -> dict[str, str]:
    from mm.data.synthetic import write_dataset, write_tiny_encoders
    from mm.presets import write_tiny_configs

    tmp = Path(tmp)
    data = tmp / "data"
    write_dataset(str(data), num=num, frames=frames, height=size, width=size, seed=0)
    write_tiny_encoders(str(data))
    paths = write_tiny_configs(tmp, data, frames=frames, size=size, text_len=text_len, cfg_rate=cfg_rate)
    return {k: str(v) for k, v in paths.items()} | {"root": str(tmp), "data_dir": str(data)}


def tiny_trainer(ws: dict[str, str], *, tp: int = 1, sp: bool = False, gbs: int = 1, iters: int = 4, lr: float = 1e-3,
                 bf16: bool = False, distopt: bool = True, save: str | None = None, load: str | None = None,
                 save_interval: int = 2, parallel: dict | None = None, recompute: str | None = None):
    """A ``Trainer`` on a ``make_workspace`` workspace (seed 1234, micro-batch 1, no loader workers);
    ``parallel``: ``ParallelConfig`` fields instead of ``tp`` / ``sp``; ``recompute``: a granularity
    ('full' recomputes one block per stage)."""
    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    run = RunConfig(
        parallel=ParallelConfig(**(parallel or {"tensor_model_parallel_size": tp, "sequence_parallel": sp})),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr, use_distributed_optimizer=distopt),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=gbs, train_iters=iters, seed=1234, bf16=bf16,
                                recompute_granularity=recompute, recompute_num_layers=1 if recompute == "full" else 0),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=save_interval),
    )
    return Trainer(load_model_json(ws["model"]), load_data_config(ws["data"]), run, data_num_workers=0)
