"""Config dataclasses (``mm.config``): a bad value raises ``ValueError`` naming the field and the value
(and what is allowed); derived sizes (data-parallel size, microbatches) explain their errors."""

from __future__ import annotations

import re

import pytest

from mm.config import (
    BackendConfig,
    CheckpointConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    replace,
)


def _bad(field: str, value) -> str:
    """The start of the error for ``field=value``: field and repr(value), escaped for ``match``."""
    return re.escape(f"invalid config value {field}={value!r}: allowed ")


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.parallel.model_parallel_size == 1 and cfg.backend.name == "auto"


# ---------------------------------------------------------------------------------------------- parallel
@pytest.mark.parametrize("field,value,allowed", [
    ("tensor_model_parallel_size", 0, "an integer >= 1"),
    ("pipeline_model_parallel_size", -2, "an integer >= 1"),
    ("context_parallel_size", 2.0, "an integer >= 1"),
    ("virtual_pipeline_model_parallel_size", 0, "None or an integer >= 1"),
    ("sequence_parallel", "yes", "True or False"),
    ("distributed_timeout_minutes", 0, "> 0"),
])
def test_parallel_config_rejects(field, value, allowed):
    with pytest.raises(ValueError, match=_bad(field, value) + re.escape(allowed)):
        ParallelConfig(**{field: value})


def test_parallel_config_cross_field_rules():
    with pytest.raises(ValueError, match=_bad("virtual_pipeline_model_parallel_size", 2) + "None unless"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)  # VPP needs PP > 1
    ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    ParallelConfig(encoder_data_parallel=True)


@pytest.mark.parametrize("tp,pp,cp,world,dp", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 1), (2, 2, 1, 8, 2), (1, 1, 2, 8, 4),
                                                (2, 2, 2, 8, 1)])
def test_data_parallel_size_is_world_over_model_parallel(tp, pp, cp, world, dp):
    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    assert cfg.model_parallel_size == tp * pp * cp
    assert cfg.data_parallel_size(world) == dp


def test_data_parallel_size_error_names_world_and_layout():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=re.escape("world size 8 is not divisible by TP*PP*CP = 2*3*1 = 6")):
        cfg.data_parallel_size(8)


# ---------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("field,value,allowed", [
    ("lr", -1e-4, ">= 0"),
    ("lr_decay_style", "step", "one of ('constant', 'linear', 'cosine')"),
    ("lr_warmup_iters", -1, "an integer >= 0"),
    ("weight_decay", -0.1, ">= 0"),
    ("adam_beta1", 1.0, "[0, 1)"),
    ("adam_beta2", -0.5, "[0, 1)"),
    ("clip_grad_ema_decay", 1.5, "[0, 1)"),
    ("ema_decay", 1.0, "[0, 1)"),
    ("adam_eps", 0.0, "> 0"),
    ("clip_grad", -1.0, ">= 0"),
    ("max_consecutive_bad_steps", 0, "an integer > 0"),
    ("lr", True, ">= 0"),  # a bool is not a number here
])
def test_optimizer_config_rejects(field, value, allowed):
    kwargs = {field: value}
    if field == "lr" and value is not True:
        kwargs["min_lr"] = 0.0
    with pytest.raises(ValueError, match=_bad(field, value) + re.escape(allowed)):
        OptimizerConfig(**kwargs)


def test_optimizer_min_lr_not_above_lr():
    with pytest.raises(ValueError, match=_bad("min_lr", 0.1) + re.escape("<= lr (0.01)")):
        OptimizerConfig(lr=0.01, min_lr=0.1)
    OptimizerConfig(lr=0.01, min_lr=0.01)
    OptimizerConfig(lr=0.0, min_lr=0.0)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("field,value,allowed", [
    ("micro_batch_size", 0, "an integer > 0"),
    ("global_batch_size", -4, "an integer > 0"),
    ("train_iters", 0, "an integer > 0"),
    ("log_interval", 0, "an integer > 0"),
    ("recompute_granularity", "block", "None, 'full' or 'selective'"),
    ("recompute_num_layers", -1, "an integer >= 0"),
    ("selective_recompute_ffn_layers", -1, "an integer >= 0"),
])
def test_training_config_rejects(field, value, allowed):
    with pytest.raises(ValueError, match=_bad(field, value) + re.escape(allowed)):
        TrainingConfig(**{field: value})


@pytest.mark.parametrize("mbs,gbs,dp,n", [(1, 1, 1, 1), (2, 16, 2, 4), (1, 8, 8, 1), (3, 12, 2, 2)])
def test_num_microbatches(mbs, gbs, dp, n):
    assert TrainingConfig(micro_batch_size=mbs, global_batch_size=gbs).num_microbatches(dp) == n


def test_num_microbatches_error_names_the_sizes():
    cfg = TrainingConfig(micro_batch_size=2, global_batch_size=10)
    with pytest.raises(ValueError, match=re.escape(
            "global_batch_size 10 is not divisible by micro_batch_size 2 x data-parallel size 2")):
        cfg.num_microbatches(2)
    with pytest.raises(ValueError, match="global_batch_size 10"):  # gbs smaller than one step
        TrainingConfig(micro_batch_size=4, global_batch_size=10).num_microbatches(4)


# ---------------------------------------------------------------------------------------------- checkpoint, backend
@pytest.mark.parametrize("field,value", [("save_interval", 0), ("keep_last", -1)])
def test_checkpoint_config_rejects(field, value):
    with pytest.raises(ValueError, match=_bad(field, value) + re.escape("an integer > 0")):
        CheckpointConfig(**{field: value})


def test_backend_config_rejects_unknown():
    with pytest.raises(ValueError, match=_bad("backend", "tpu") + re.escape("one of ('auto', 'cpu', 'cuda', 'npu')")):
        BackendConfig("tpu")


def test_replace_revalidates():
    cfg = TrainingConfig(micro_batch_size=2, global_batch_size=8)
    assert replace(cfg, global_batch_size=16).global_batch_size == 16
    with pytest.raises(ValueError, match=_bad("micro_batch_size", 0)):
        replace(cfg, micro_batch_size=0)


@pytest.mark.parametrize("cls,field", [(TrainingConfig, "micro_batch_size"), (CheckpointConfig, "save_interval")])
def test_integer_counts_reject_floats(cls, field):
    with pytest.raises(ValueError, match=_bad(field, 1.5)):
        cls(**{field: 1.5})
