"""Helpers of the fault-injection tests: tiny-preset trainers built in a forked gloo rank."""

from __future__ import annotations

import dataclasses
import logging


def run_config(iters=4, save=None, load=None, save_interval=1000, gbs=2, distopt=True, lr=1e-3, min_lr=None,
               decay_style="constant", **checkpoint):
    from mm.config import CheckpointConfig, OptimizerConfig, RunConfig, TrainingConfig

    return RunConfig(
        optimizer=OptimizerConfig(lr=lr, min_lr=lr if min_lr is None else min_lr, lr_decay_style=decay_style,
                                  use_distributed_optimizer=distopt),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=gbs, train_iters=iters, seed=1234),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=save_interval, **checkpoint),
    )


def trainer(ws, run):
    """A Trainer on the workspace (megatron's groups of an earlier trainer in this process are torn down)."""
    from megatron.core import parallel_state as ps

    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    return Trainer(load_model_json(ws["model"]), load_data_config(ws["data"]), run, data_num_workers=0)


def replace_training(run, **changes):
    return dataclasses.replace(run, training=dataclasses.replace(run.training, **changes))


class KeepLogs(logging.Handler):
    """Collects the messages of the named loggers (at ``level`` and above) in ``lines``."""

    def __init__(self, *names: str, level: int = logging.INFO):
        super().__init__(level)
        self.lines: list[str] = []
        for name in names:
            logging.getLogger(name).addHandler(self)
            logging.getLogger(name).setLevel(min(level, logging.getLogger(name).getEffectiveLevel()))

    def emit(self, record):
        self.lines.append(record.getMessage())
