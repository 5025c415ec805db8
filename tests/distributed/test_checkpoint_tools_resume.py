"""checkpoint_tools: optimizer state (distributed optimizer, EMA, scheduler, sampler, RNG) survives
ours -> upstream-legacy -> ours, and training resumes from the converted checkpoint with the same losses."""

from __future__ import annotations

import pytest

from checkpoint_tools import cli
from harness import run_distributed
from tiny_workspace import make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), num=4, cfg_rate=0.1)


def _train(rank, world, ws, iters, save, load):
    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    run = RunConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-3, use_distributed_optimizer=True, adam_eps=1e-15),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=2, train_iters=iters, seed=1234),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=1),
    )
    t = Trainer(load_model_json(ws["model"]), load_data_config(ws["data"]), run, data_num_workers=0)
    return [r.loss for r in t.train()]


def test_optimizer_state_survives_legacy_round_trip_and_training_resumes(ws, tmp_path):
    ours = tmp_path / "ours"
    uninterrupted = run_distributed(_train, 2, args=(ws, 2, str(ours), None), timeout=240)[0]
    assert cli.open_checkpoint(ours).layout == {"tp": 2, "pp": 1, "dp": 1}
    legacy, back = tmp_path / "legacy", tmp_path / "back"
    r = cli.convert(str(ours / "iter_0000001"), str(legacy), "upstream-legacy", tp=2)
    assert {"param", "exp_avg", "exp_avg_sq", "ema_params", "raw", "ema"} <= set(r["groups"])
    cli.convert(str(legacy), str(back), "ours")
    equal, lines = cli.diff(str(ours / "iter_0000001"), str(back), all_groups=True)
    assert equal, "\n".join(lines)
    flat = cli.convert(str(back), str(tmp_path / "model_ema.safetensors"), "released")
    assert flat["notes"] == ["optimizer state dropped: released holds no optimizer state"]

    resumed = run_distributed(_train, 2, args=(ws, 2, None, str(back)), timeout=240)[0]
    # exact: the same weights, Adam moments, EMA, LR schedule, sampler position and RNG states
    assert len(resumed) == 1 and resumed[0] == uninterrupted[1]
