"""Typed configuration: one dataclass per concern, validated in ``__post_init__``.

Bad values raise ``ValueError`` naming the field, the value and the accepted range. Model-part configs
live next to their models (``mm.models.wfvae.WFVAEConfig``, ``mm.models.sparse_ummdit.SUVConfig``,
``mm.data.config.DataConfig``); upstream JSON and megatron-style flags are read by
``mm.config_upstream``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError`` for a bad config value: ``name=value`` (allowed: ...)."""
    if not cond:
        raise ValueError(f"invalid config value {name}={value!r}: allowed {allowed}")


def check_choice(name: str, value: Any, choices) -> None:
    check(value in choices, name, value, f"one of {tuple(choices)}")


def check_positive(name: str, value: Any, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    check(ok, name, value, ">= 0" if zero_ok else "> 0")


def check_count(name: str, value: Any, *, zero_ok: bool = False) -> None:
    """An integer count (steps, sizes, intervals): floats and bools are rejected."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    check(ok, name, value, "an integer >= 0" if zero_ok else "an integer > 0")


class ConfigErrors(ValueError):
    """Several configuration problems found in one validation pass (one message per problem)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Problems:
    """Collects configuration problems so that one pass reports all of them, not just the first.

    ``with problems.check(): ...`` records the ``ValueError``/``FileNotFoundError`` a block raises
    (a ``ConfigErrors`` contributes each of its problems) and lets validation go on.
    """

    def __init__(self):
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, prefix: str = ""):
        return _Collect(self, prefix)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigErrors(self.items)


def collect(*checks) -> None:
    """Run every check (zero-argument callables that raise ``ValueError``); ``ConfigErrors`` lists all failures."""
    problems = Problems()
    for c in checks:
        with problems.check():
            c()
    problems.raise_if_any()


class _Collect:
    def __init__(self, problems: Problems, prefix: str):
        self.problems, self.prefix = problems, prefix

    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb):
        if err is None or not issubclass(typ, (ValueError, FileNotFoundError)):
            return False
        for msg in (err.problems if isinstance(err, ConfigErrors) else [str(err)]):
            self.problems.add(self.prefix + msg)
        return True


@dataclass
class BackendConfig:
    name: str = "auto"  # cpu | cuda | npu | auto (cuda, else npu, else cpu)

    def __post_init__(self):
        check_choice("backend", self.name, ("auto", "cpu", "cuda", "npu"))


# context-parallel algorithms (MindSpeed's --context-parallel-algo names): Ulysses, ring, Ulysses x ring; and
# ours: whole skiparse sub-sequences per rank (mm.distributed.skiparse_cp)
CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo", "skiparse_cp_algo")


@dataclass
class ParallelConfig:
    """Model-parallel layout. ``data_parallel_size`` is derived from the world size at init."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    encoder_data_parallel: bool = False
    distributed_timeout_minutes: float = 30.0  # world-group timeout (megatron default)
    # blocks per pipeline chunk in virtual-stage order (PP x VPP entries); None: the skiparse cost model's cut
    pipeline_stage_blocks: list[int] | None = None
    context_parallel_algo: str = "ulysses_cp_algo"  # CP_ALGOS (MindSpeed's names)
    ulysses_degree_in_cp: int | None = None  # hybrid_cp_algo: the Ulysses part of CP (the ring is CP / it)

    def __post_init__(self):
        for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            v = getattr(self, f)
            check(isinstance(v, int) and v >= 1, f, v, "an integer >= 1")
        v = self.virtual_pipeline_model_parallel_size
        check(v is None or (isinstance(v, int) and v >= 1), "virtual_pipeline_model_parallel_size", v,
              "None or an integer >= 1")
        check(v is None or self.pipeline_model_parallel_size > 1, "virtual_pipeline_model_parallel_size", v,
              "None unless pipeline_model_parallel_size > 1")
        check(isinstance(self.sequence_parallel, bool), "sequence_parallel", self.sequence_parallel, "True or False")
        check_positive("distributed_timeout_minutes", self.distributed_timeout_minutes)
        check_choice("context_parallel_algo", self.context_parallel_algo, CP_ALGOS)
        cp, u = self.context_parallel_size, self.ulysses_degree_in_cp
        divisors = [d for d in range(1, cp + 1) if cp % d == 0]
        if self.context_parallel_algo == "hybrid_cp_algo":
            check(isinstance(u, int) and u in divisors, "ulysses_degree_in_cp", u,
                  f"a divisor of context_parallel_size {cp} for hybrid_cp_algo: one of {divisors}")
        else:
            check(u is None, "ulysses_degree_in_cp", u, "unset unless context_parallel_algo is hybrid_cp_algo")
        b = self.pipeline_stage_blocks
        chunks = self.pipeline_model_parallel_size * (v or 1)
        check(b is None or (isinstance(b, (list, tuple)) and len(b) == chunks
                            and all(isinstance(n, int) and n >= 1 for n in b)), "pipeline_stage_blocks", b,
              f"None or {chunks} block counts >= 1 (one per pipeline chunk: PP x VPP)")

    @property
    def ulysses_size(self) -> int:
        """The Ulysses part of CP (heads split by all-to-all); the ring part is CP / this. skiparse_cp_algo: 1
        (the model runs its dense blocks with Ulysses instead when TP x CP divides the heads)."""
        algo, cp = self.context_parallel_algo, self.context_parallel_size
        return {"ulysses_cp_algo": cp, "megatron_cp_algo": 1}.get(algo, self.ulysses_degree_in_cp or 1)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {self.tensor_model_parallel_size}*"
                f"{self.pipeline_model_parallel_size}*{self.context_parallel_size} = {mp}"
            )
        return world_size // mp


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    min_lr: float = 1e-5
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-15
    clip_grad: float = 1.0
    clip_grad_ema_decay: float = 0.99
    ema_decay: float = 0.9999
    max_consecutive_bad_steps: int = 3
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        collect(
            lambda: check_positive("lr", self.lr, zero_ok=True),
            lambda: check_positive("min_lr", self.min_lr, zero_ok=True),
            lambda: check(self.min_lr <= self.lr, "min_lr", self.min_lr, f"<= lr ({self.lr})"),
            lambda: check_choice("lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine")),
            lambda: check_count("lr_warmup_iters", self.lr_warmup_iters, zero_ok=True),
            lambda: check_positive("weight_decay", self.weight_decay, zero_ok=True),
            *(lambda f=f: check(0.0 <= getattr(self, f) < 1.0, f, getattr(self, f), "[0, 1)")
              for f in ("adam_beta1", "adam_beta2", "clip_grad_ema_decay", "ema_decay")),
            lambda: check_positive("adam_eps", self.adam_eps),
            lambda: check_positive("clip_grad", self.clip_grad, zero_ok=True),
            lambda: check_count("max_consecutive_bad_steps", self.max_consecutive_bad_steps),
        )


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 1000
    seed: int = 1234
    bf16: bool = False
    log_interval: int = 1
    recompute_granularity: str | None = None  # None | "full" | "selective"
    recompute_num_layers: int = 0
    selective_recompute_ffn_layers: int = 0
    # stopping early (megatron's flags): save and exit 0 at a step boundary
    exit_interval: int | None = None  # after an iteration divisible by this
    exit_duration_in_mins: float | None = None  # once the run has lasted this long
    exit_signal_handler: bool = True  # on SIGTERM / SIGUSR1 (SLURM --signal)
    # reload the last checkpoint and skip the batch when loss > factor x its running mean
    rollback_on_spike: float | None = None

    def __post_init__(self):
        r = self.rollback_on_spike
        collect(
            lambda: check_count("micro_batch_size", self.micro_batch_size),
            lambda: check_count("global_batch_size", self.global_batch_size),
            lambda: check_count("train_iters", self.train_iters),
            lambda: check_count("log_interval", self.log_interval),
            lambda: self.exit_interval is None or check_count("exit_interval", self.exit_interval),
            lambda: self.exit_duration_in_mins is None or check_positive("exit_duration_in_mins",
                                                                         self.exit_duration_in_mins),
            lambda: check(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool) and r > 1.0),
                          "rollback_on_spike", r, "None or a factor > 1 (loss / its running mean)"),
            lambda: check(self.recompute_granularity in (None, "full", "selective"), "recompute_granularity",
                          self.recompute_granularity, "None, 'full' or 'selective'"),
            lambda: check_count("recompute_num_layers", self.recompute_num_layers, zero_ok=True),
            lambda: check_count("selective_recompute_ffn_layers", self.selective_recompute_ffn_layers, zero_ok=True),
        )

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int = 1000
    keep_last: int = 3
    # what a resume restores (megatron's flag names); finetune = weights only, from iteration 0
    load_optim: bool = True
    load_rng: bool = True
    finetune: bool = False
    use_checkpoint_opt_param_scheduler: bool = False  # False: the command line's LR schedule wins
    fallback: bool = True  # a damaged latest checkpoint: load the newest one that verifies

    def __post_init__(self):
        check_count("save_interval", self.save_interval)
        check_count("keep_last", self.keep_last)


def replace(cfg, **changes):
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(cfg, **changes)


@dataclass
class RunConfig:
    """Root of a training/inference run: the parts that are not model shapes."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
