"""Upstream Open-Sora Plan v1.5 JSON files and megatron-style launch flags -> our typed configs.

Everything goes through explicit key tables: a key we do not know is an error naming it (upstream
silently ignored typos, spec §12); a key we accept but do not use is listed with the reason.
Relative input paths inside a JSON file (weights, tokenizers, data lists, prompt files) are resolved
against the directory of that file; output paths (``save_path``) stay relative to the working directory.

* model JSON (``model_opensoraplan1_5.json``): ``ae``, ``text_encoder``, ``text_encoder_2``,
  ``predictor``, ``diffusion`` + a few top-level switches -> ``ModelSpec``.
* inference JSON (``inference_t2v_model1_5.json``): the same blocks + ``pipeline_config`` and output
  settings -> ``InferenceSpec``.
* data JSON: parsed by ``mm.data.config.DataConfig`` (read through ``load_data_config``).
* megatron flags (``pretrain_sora.py``): ``build_megatron_parser`` / ``run_config_from_args``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.config import (
    CP_ALGOS,
    BackendConfig,
    CheckpointConfig,
    OptimizerConfig,
    ParallelConfig,
    Problems,
    RunConfig,
    TrainingConfig,
    check,
    check_choice,
    check_positive,
)

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")

# top-level keys of the model / inference JSON: key -> what we do with it
MODEL_KEYS = {
    "ae": "WFVAE config block",
    "text_encoder": "T5 encoder block (from_pretrained = local HF directory)",
    "text_encoder_2": "CLIP text encoder block (from_pretrained = local HF directory)",
    "tokenizer": "T5 tokenizer block (defaults to the T5 directory)",
    "tokenizer_2": "CLIP tokenizer block (defaults to the CLIP directory)",
    "predictor": "SUV denoiser block",
    "diffusion": "flow-matching scheduler block",
    "weight_dtype": "dtype of the DiT and text encoders",
    "load_video_features": "train from cached VAE latents (mm.data.extract_features)",
    "load_text_features": "train from cached T5/CLIP features",
    "enable_encoder_dp": "encoder data parallelism: each TP x CP rank encodes a different sample (spec §7.3)",
    "frames": "ignored: informational (the data JSON decides the frame count)",
    "allow_tf32": "ignored: we keep TF32 off for reproducible numerics",
    "allow_internal_format": "ignored: NPU-only switch",
}
INFERENCE_KEYS = {
    **MODEL_KEYS,
    "pipeline_config": "input_size [T, H, W], use_attention_mask, version, model_type",
    "micro_batch_size": "prompts per forward",
    "frame_interval": "output fps = fps // frame_interval",
    "model_max_length": "T5 token length",
    "save_path": "output directory",
    "fps": "output video fps",
    "prompt": "prompt file (one per line) or a literal prompt",
    "device": "ignored: the backend switch (--backend / MM_BACKEND) decides the device",
    "prompt_template": "positive text around each prompt (default v1.5's 'high quality, {prompt}')",
    "default_negative_prompt": "the unconditional text before the user's negative prompt (default v1.5's)",
}
TEXT_ENCODER_KEYS = {"hub_backend", "model_id", "from_pretrained", "low_cpu_mem_usage", "autotokenizer_name",
                     "dtype", "model_max_length"}
DIFFUSION_KEYS = {
    "model_id", "num_inference_steps", "guidance_scale", "guidance_rescale", "shift", "use_dynamic_shifting",
    "use_linear_quadratic_schedule", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "sigma_eps",
    "num_train_steps", "device",
}


def _unknown(block: str, given, known) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        raise ValueError(f"unknown key(s) {bad} in {block}; accepted keys: {sorted(known)}")


def read_json(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def resolve_path(value: str | None, base_dir: Path | None) -> str | None:
    """Resolve a JSON path value relative to the JSON's directory (absolute paths unchanged)."""
    if value is None or value == "" or base_dir is None or os.path.isabs(value):
        return value
    return str((base_dir / value).resolve())


@dataclass
class DiffusionConfig:
    """Flow-matching training (spec §6.1) and sampler (§6.2) settings."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigma_eps: float = 0.0
    use_dynamic_shifting: bool = True  # training: resolution-dependent shift
    num_inference_steps: int = 50
    guidance_scale: float = 8.0
    guidance_rescale: float = 0.7
    shift: float = 7.0  # inference: static shift
    use_linear_quadratic_schedule: bool = False

    def __post_init__(self):
        check_choice("diffusion.weighting_scheme", self.weighting_scheme, ("logit_normal", "mode", "uniform"))
        check_positive("diffusion.logit_std", self.logit_std)
        check_positive("diffusion.num_inference_steps", self.num_inference_steps)
        check(self.guidance_scale >= 1.0, "diffusion.guidance_scale", self.guidance_scale, ">= 1.0 (1 = no CFG)")
        check(0.0 <= self.guidance_rescale <= 1.0, "diffusion.guidance_rescale", self.guidance_rescale, "[0, 1]")
        check_positive("diffusion.shift", self.shift)
        check(0.0 <= self.sigma_eps < 1.0, "diffusion.sigma_eps", self.sigma_eps, "[0, 1)")

    @classmethod
    def from_upstream(cls, block: dict | None) -> "DiffusionConfig":
        block = dict(block or {})
        _unknown("diffusion", block, DIFFUSION_KEYS)
        model_id = block.pop("model_id", "OpenSoraPlan")
        check(model_id == "OpenSoraPlan", "diffusion.model_id", model_id, "'OpenSoraPlan' (the v1.5 flow-matching scheduler)")
        for k in ("num_train_steps", "device"):
            block.pop(k, None)
        return cls(**block)


@dataclass
class TextEncoderPaths:
    t5: str | None = None
    clip: str | None = None
    t5_tokenizer: str | None = None
    clip_tokenizer: str | None = None
    t5_max_length: int = 512


@dataclass
class ModelSpec:
    """The model JSON, parsed. ``ae`` and ``predictor`` stay upstream dicts (their configs parse them)."""

    ae: dict
    predictor: dict
    text: TextEncoderPaths
    diffusion: DiffusionConfig
    weight_dtype: str = "bf16"
    ae_dtype: str = "fp32"
    load_video_features: bool = False
    load_text_features: bool = False
    enable_encoder_dp: bool = False
    ae_checkpoint: str | None = None
    predictor_checkpoint: str | None = None
    source: str | None = None

    def __post_init__(self):
        check_choice("weight_dtype", self.weight_dtype, DTYPES)
        check_choice("ae.dtype", self.ae_dtype, DTYPES)

    def vae_config(self):
        from mm.models.wfvae import WFVAEConfig

        return WFVAEConfig.from_upstream_dict(self.ae)

    def suv_config(self):
        from mm.models.suv_config import SUVConfig

        return SUVConfig.from_upstream(self.predictor)


@dataclass
class InferenceSpec(ModelSpec):
    num_frames: int = 121
    height: int = 576
    width: int = 1024
    use_attention_mask: bool = True
    micro_batch_size: int = 1
    frame_interval: int = 1
    fps: int = 24
    save_path: str = "./samples"
    prompt: str | None = None
    prompt_template: str | None = None  # None: the v1.5 template (mm.inference.prompts)
    default_negative_prompt: str | None = None  # None: the v1.5 negative prompt

    def __post_init__(self):
        super().__post_init__()
        check(self.num_frames >= 1 and (self.num_frames - 1) % 8 == 0, "num_frames", self.num_frames,
              "8n+1 (1, 9, 17, ..., 121)")
        check(self.height > 0 and self.height % 16 == 0, "height", self.height, "a positive multiple of 16")
        check(self.width > 0 and self.width % 16 == 0, "width", self.width, "a positive multiple of 16")
        check_positive("micro_batch_size", self.micro_batch_size)
        check_positive("frame_interval", self.frame_interval)
        check_positive("fps", self.fps)


def _text_paths(cfg: dict, base: Path | None, max_length: int) -> TextEncoderPaths:
    blocks = {k: dict(cfg.get(k) or {}) for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    for k, b in blocks.items():
        _unknown(k, b, TEXT_ENCODER_KEYS)
    for k, expect in (("text_encoder", "T5"), ("text_encoder_2", "CLIPWithProjection")):
        mid = blocks[k].get("model_id", expect)
        check(mid == expect, f"{k}.model_id", mid, repr(expect))
    t5 = resolve_path(blocks["text_encoder"].get("from_pretrained"), base)
    clip = resolve_path(blocks["text_encoder_2"].get("from_pretrained"), base)
    return TextEncoderPaths(
        t5=t5,
        clip=clip,
        t5_tokenizer=resolve_path(blocks["tokenizer"].get("from_pretrained"), base) or t5,
        clip_tokenizer=resolve_path(blocks["tokenizer_2"].get("from_pretrained"), base) or clip,
        t5_max_length=max_length,
    )


def _model_fields(cfg: dict, base: Path | None) -> dict:
    for k in ("ae", "predictor"):
        if k not in cfg:
            raise ValueError(f"model JSON has no {k!r} block (keys present: {sorted(cfg)})")
    ae = dict(cfg["ae"])
    pred = dict(cfg["predictor"])
    return dict(
        ae=ae,
        predictor=pred,
        text=_text_paths(cfg, base, int(cfg.get("model_max_length", 512))),
        diffusion=DiffusionConfig.from_upstream(cfg.get("diffusion")),
        weight_dtype=cfg.get("weight_dtype", "bf16"),
        ae_dtype=ae.get("dtype", "fp32"),
        load_video_features=bool(cfg.get("load_video_features", False)),
        load_text_features=bool(cfg.get("load_text_features", False)),
        enable_encoder_dp=bool(cfg.get("enable_encoder_dp", False)),
        ae_checkpoint=resolve_path(ae.get("from_pretrained"), base),
        predictor_checkpoint=resolve_path(pred.get("from_pretrained"), base),
    )


def load_model_json(path_or_dict: str | os.PathLike | dict) -> ModelSpec:
    """Parse an upstream model JSON (training flavour)."""
    cfg, base, src = _load(path_or_dict)
    _unknown("model JSON", cfg, MODEL_KEYS)
    return ModelSpec(**_model_fields(cfg, base), source=src)


def load_inference_json(path_or_dict: str | os.PathLike | dict) -> InferenceSpec:
    """Parse an upstream inference JSON (``inference_t2v_model1_5.json`` style)."""
    cfg, base, src = _load(path_or_dict)
    _unknown("inference JSON", cfg, INFERENCE_KEYS)
    pc = dict(cfg.get("pipeline_config") or {})
    _unknown("pipeline_config", pc, {"use_attention_mask", "input_size", "version", "model_type"})
    check(pc.get("version", "v1.5") == "v1.5", "pipeline_config.version", pc.get("version"), "'v1.5'")
    check(pc.get("model_type", "t2v") == "t2v", "pipeline_config.model_type", pc.get("model_type"), "'t2v'")
    size = pc.get("input_size", [121, 576, 1024])
    check(isinstance(size, list) and len(size) == 3, "pipeline_config.input_size", size, "[frames, height, width]")
    prompt = cfg.get("prompt")
    if prompt is not None and base is not None and not os.path.isabs(prompt) and (base / prompt).exists():
        prompt = str((base / prompt).resolve())
    return InferenceSpec(
        **_model_fields(cfg, base),
        source=src,
        num_frames=int(size[0]),
        height=int(size[1]),
        width=int(size[2]),
        use_attention_mask=bool(pc.get("use_attention_mask", True)),
        micro_batch_size=int(cfg.get("micro_batch_size", 1)),
        frame_interval=int(cfg.get("frame_interval", 1)),
        fps=int(cfg.get("fps", 24)),
        save_path=cfg.get("save_path", "./samples"),  # an output: relative to the working directory
        prompt=prompt,
        prompt_template=cfg.get("prompt_template"),
        default_negative_prompt=cfg.get("default_negative_prompt"),
    )


def load_data_config(path: str | os.PathLike):
    """Parse an upstream data JSON (or a bare data.txt) into ``mm.data.config.DataConfig``."""
    from mm.data.config import load_data_config as load

    return load(path)


def _load(path_or_dict) -> tuple[dict, Path | None, str | None]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), None, None
    p = Path(path_or_dict)
    return read_json(p), p.resolve().parent, str(p)


# ------------------------------------------------------------------------------------ megatron flags
# GPT-style placeholders the upstream launch scripts pass; accepted, warned about once, no effect (§7.8, §12.16)
INERT_FLAGS = {
    "--num-layers": 1, "--hidden-size": 1, "--num-attention-heads": 1, "--seq-length": 1,
    "--max-position-embeddings": 1, "--attention-dropout": 1, "--hidden-dropout": 1, "--tokenizer-type": 1,
    "--vocab-size": 1, "--position-embedding-type": 1, "--rotary-base": 1, "--normalization": 1,
    "--optimizer-selection": 1, "--distributed-backend": 1, "--eval-interval": 1, "--eval-iters": 1,
    "--recompute-method": 1, "--mm-tool": 1,
    "--swiglu": 0, "--qk-layernorm": 0, "--use-fused-rmsnorm": 0, "--no-masked-softmax-fusion": 0,
    "--fp32-residual-connection": 0, "--attention-softmax-in-fp32": 0, "--accumulate-allreduce-grads-in-fp32": 0,
    "--no-gradient-accumulation-fusion": 0, "--use-ema": 0, "--model_custom_precision": 0,
    "--data-parallel-random-init": 0, "--no-save-optim": 0, "--no-save-rng": 0,
}


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """The upstream launch flags that matter, with their upstream meaning."""
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (divides the heads)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="interleaved pipeline: model chunks per PP rank (megatron's flag)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                   help="interleaved pipeline as megatron's flag: N SUV blocks per virtual stage, i.e. "
                        "--virtual-pipeline-model-parallel-size = blocks per PP rank / N (instead of that flag)")
    g.add_argument("--pipeline-stage-blocks", default=None, metavar="N,N,...",
                   help="SUV blocks per pipeline chunk in stage order (PP x VPP counts summing to the blocks); "
                        "default: balanced by a skiparse-aware cost model at the data's sequence length")
    g.add_argument("--context-parallel-size", type=int, default=1, help="context-parallel (CP) size")
    g.add_argument("--context-parallel-algo", default="ulysses_cp_algo", choices=list(CP_ALGOS),
                   help="ulysses_cp_algo: heads split by all-to-all (TP x CP divides the heads); megatron_cp_algo: "
                        "ring attention (any head count); hybrid_cp_algo: Ulysses inside x ring across; "
                        "skiparse_cp_algo: whole skiparse sub-sequences per rank where CP divides k (no attention "
                        "communication there), Ulysses or ring elsewhere")
    g.add_argument("--ulysses-degree-in-cp", type=int, default=None, metavar="N",
                   help="hybrid_cp_algo: the Ulysses degree (consecutive ranks, e.g. within a node); the ring "
                        "runs over CP / N")
    g.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallel over the TP group")
    g.add_argument("--encoder-dp", action="store_true",
                   help="encoder data parallelism: each TP x CP rank encodes a different sample and the group "
                        "shares the features (also: enable_encoder_dp in the model JSON)")
    g.add_argument("--backend", default=None, choices=["auto", "cpu", "cuda", "npu"],
                   help="kernel/device backend (default $MM_BACKEND or auto)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0, metavar="MIN",
                   help="timeout of every collective (world and megatron groups); raise it when checkpoint "
                        "writes of a big model take longer (default 30, as megatron)")
    g = parser.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per DP rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step (default micro-batch x DP); must divide by micro x DP")
    g.add_argument("--train-iters", type=int, default=1000, help="optimizer steps to run")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: --lr)")
    g.add_argument("--lr-decay-style", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at step 0 of the warm-up")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay length (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-15)
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay cap (warm-up (1+u)/(10+u))")
    g.add_argument("--clip-grad", type=float, default=1.0, help="> 0 enables adaptive clipping (value as first cap)")
    g.add_argument("--clip_grad_ema_decay", "--clip-grad-ema-decay", dest="clip_grad_ema_decay", type=float,
                   default=0.99, help="EMA decay of the grad-norm statistics of adaptive clipping")
    g.add_argument("--max-bad-steps", type=int, default=3,
                   help="stop after this many consecutive skipped (NaN/Inf/extreme) steps")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO-1 sharded optimizer over DP")
    g.add_argument("--bf16", action="store_true", help="bf16 DiT params with fp32 master weights")
    g.add_argument("--seed", type=int, default=1234)
    g = parser.add_argument_group("recompute")
    g.add_argument("--selective_recom", "--selective-recom", dest="selective_recom", action="store_true",
                   help="recompute the FFN half of the first --recom_ffn_layers blocks")
    g.add_argument("--recom_ffn_layers", "--recom-ffn-layers", dest="recom_ffn_layers", type=int, default=32)
    g.add_argument("--recompute-granularity", default=None, choices=["full"],
                   help="'full' recomputes whole blocks (the first --recompute-num-layers)")
    g.add_argument("--recompute-num-layers", type=int, default=0)
    g = parser.add_argument_group("checkpoint and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from the latest complete checkpoint here")
    g.add_argument("--save-interval", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept in --save")
    g.add_argument("--log-interval", type=int, default=1)
    g = parser.add_argument_group("resume, preemption and failures")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume the weights, iteration and data order but start a fresh optimizer (and EMA from "
                        "the loaded weights)")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states of the checkpoint")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only and start at iteration 0 (fresh optimizer, schedule, data order)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume keep the checkpoint's LR schedule (default: the command line's --lr, --min-lr, "
                        "--lr-decay-style, --lr-decay-iters/--train-iters and warm-up win; the log lists changes)")
    g.add_argument("--no-fallback", action="store_true",
                   help="a damaged latest checkpoint is an error (default: load the newest one that verifies)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after an iteration divisible by this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 at the first step boundary after this many minutes")
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=True,
                   help="on SIGTERM or SIGUSR1 (SLURM --signal) save at the next step boundary and exit 0 "
                        "(default on)")
    g.add_argument("--rollback-on-spike", type=float, default=None, metavar="FACTOR",
                   help="when the loss exceeds FACTOR x its running mean, reload the last checkpoint and skip the "
                        "offending batch (needs --save)")
    g = parser.add_argument_group("accepted for upstream compatibility, no effect")
    for flag, nargs in INERT_FLAGS.items():
        if nargs:
            g.add_argument(flag, default=None, help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, action="store_true", default=None, help=argparse.SUPPRESS)


def warn_inert_flags(args: argparse.Namespace) -> list[str]:
    used = [f for f in INERT_FLAGS if getattr(args, f.lstrip("-").replace("-", "_"), None) not in (None, False)]
    if used:
        logger.warning("accepted but inert (GPT placeholders of the upstream scripts, no effect here): %s", " ".join(used))
    return used


def _stage_blocks_flag(text: str | None) -> list[int] | None:
    """``--pipeline-stage-blocks 6,10,10,6`` -> ``[6, 10, 10, 6]`` (ValueError naming the value otherwise)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--pipeline-stage-blocks {text!r}: expected comma-separated block counts, e.g. 6,10,10,6")


def run_config_from_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    """Megatron-style flags -> ``RunConfig``. Every bad value, and the world size / batch divisibility,
    is reported in one pass: ``ConfigErrors`` with one message per problem."""
    problems = Problems()
    parts: dict = {}

    def part(name, build):
        with problems.check():
            parts[name] = build()

    part("backend", lambda: BackendConfig(args.backend or os.environ.get("MM_BACKEND", "auto")))
    part("parallel", lambda: ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            pipeline_stage_blocks=_stage_blocks_flag(args.pipeline_stage_blocks),
            context_parallel_size=args.context_parallel_size,
            context_parallel_algo=getattr(args, "context_parallel_algo", "ulysses_cp_algo"),
            ulysses_degree_in_cp=getattr(args, "ulysses_degree_in_cp", None),
            sequence_parallel=args.sequence_parallel,
            encoder_data_parallel=bool(getattr(args, "encoder_dp", False)),
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        ))
    dp = None
    if "parallel" in parts:
        with problems.check():
            dp = parts["parallel"].data_parallel_size(world_size)
    # the default global batch is micro x DP (a bad --micro-batch-size is reported once, not again here)
    gbs = args.global_batch_size if args.global_batch_size is not None else max(args.micro_batch_size, 1) * (dp or 1)
    recompute = "full" if args.recompute_granularity == "full" else ("selective" if args.selective_recom else None)
    part("optimizer", lambda: OptimizerConfig(
        lr=args.lr, min_lr=args.lr if args.min_lr is None else args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=args.lr_warmup_iters, lr_warmup_init=args.lr_warmup_init,
        lr_decay_iters=args.lr_decay_iters, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        clip_grad_ema_decay=args.clip_grad_ema_decay, ema_decay=args.ema_decay,
        max_consecutive_bad_steps=args.max_bad_steps, use_distributed_optimizer=args.use_distributed_optimizer,
    ))
    part("training", lambda: TrainingConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=gbs, train_iters=args.train_iters,
        seed=args.seed, bf16=args.bf16, log_interval=args.log_interval, recompute_granularity=recompute,
        recompute_num_layers=args.recompute_num_layers,
        selective_recompute_ffn_layers=args.recom_ffn_layers if args.selective_recom else 0,
        exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins,
        exit_signal_handler=args.exit_signal_handler, rollback_on_spike=args.rollback_on_spike,
    ))
    part("checkpoint", lambda: CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval, keep_last=args.keep_last,
        load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, finetune=args.finetune,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler, fallback=not args.no_fallback,
    ))
    if dp is not None and "training" in parts:
        with problems.check():
            parts["training"].num_microbatches(dp)
    o = parts.get("optimizer")
    if o is not None and o.lr_decay_iters is not None and o.lr_decay_iters < 1:
        problems.add(f"invalid config value lr_decay_iters={o.lr_decay_iters!r}: allowed None or an integer > 0")
    problems.raise_if_any()
    return RunConfig(**parts)


__all__ = [
    "DiffusionConfig", "ModelSpec", "InferenceSpec", "TextEncoderPaths", "load_model_json", "load_inference_json",
    "load_data_config", "add_megatron_flags", "warn_inert_flags", "run_config_from_args", "INERT_FLAGS",
]
