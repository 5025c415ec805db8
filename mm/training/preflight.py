"""One validation pass for ``pretrain_sora.py``, before torch.distributed or any model is built.

Every problem of the command line and the model / data JSONs is collected (``mm.config.Problems``):
bad values and ranges, unknown JSON keys, world size vs TP x PP x CP, batch divisibility, TP x CP vs
the attention heads, missing files (all listed), ``--load`` without a checkpoint, an optimizer-kind
switch on resume. The entry point prints one ``error:`` line per problem on rank 0 and exits 2.
Imports no megatron, so it runs before the backend is selected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from mm.config import Problems, RunConfig
from mm.config_upstream import ModelSpec, load_data_config, load_model_json, run_config_from_args
from mm.data.config import DataConfig


def _missing_model_files(spec: ModelSpec, video_cached: bool, text_cached: bool) -> list[str]:
    out = []
    if not video_cached and spec.ae_checkpoint and not os.path.exists(spec.ae_checkpoint):
        out.append(f"--mm-model: WFVAE checkpoint (ae.from_pretrained) not found: {spec.ae_checkpoint}")
    if not text_cached:
        for what, path in (("T5 directory (text_encoder.from_pretrained)", spec.text.t5),
                           ("CLIP directory (text_encoder_2.from_pretrained)", spec.text.clip)):
            if not path:
                out.append(f"--mm-model: no {what}: the model JSON must name it unless text features are cached")
            elif not os.path.isdir(path):
                out.append(f"--mm-model: {what} not found: {path}")
    if spec.predictor_checkpoint and not os.path.exists(spec.predictor_checkpoint):
        out.append(f"--mm-model: SUV checkpoint (predictor.from_pretrained) not found: {spec.predictor_checkpoint}")
    return out


def _missing_data_files(cfg: DataConfig) -> list[str]:
    from mm.data.annotations import read_data_txt

    if not os.path.isfile(cfg.data_path):
        return [f"--mm-data: data list (data_path) not found: {cfg.data_path}"]
    out = []
    if cfg.data_path.endswith(".txt"):
        try:
            sources = read_data_txt(cfg.data_path)
        except ValueError as e:
            return [f"--mm-data: {e}"]
        for src in sources:
            if not os.path.isfile(src.annotation):
                out.append(f"--mm-data: annotation file not found: {src.annotation} (listed in {cfg.data_path})")
            if src.root and not os.path.isdir(src.root):
                out.append(f"--mm-data: data folder not found: {src.root} (listed in {cfg.data_path})")
    if (cfg.load_video_features or cfg.load_text_features) and cfg.feature_dir and not os.path.isdir(cfg.feature_dir):
        out.append(f"--mm-data: feature_dir not found: {cfg.feature_dir} (run python -m mm.data.extract_features)")
    return out


def _ring_kernel_problems(par, suv, backend_name: str) -> list[str]:
    """Ring attention needs the backend's ``attention_block`` kernel (out, lse); say so before anything runs."""
    from mm.ops.registry import BackendUnavailableError, backend_module, resolve_backend_name

    cp, u = par.context_parallel_size, par.ulysses_size
    ring = cp // u > 1
    if par.context_parallel_algo == "skiparse_cp_algo" and suv is not None:  # its dense blocks: ring if no Ulysses
        ring = cp > 1 and suv.num_heads % (par.tensor_model_parallel_size * cp) != 0
    if not ring:
        return []
    try:
        name = resolve_backend_name(backend_name)
    except (BackendUnavailableError, ValueError):  # reported when the backend is selected
        return []
    if "attention_block" in backend_module(name).kernels():
        return []
    return [f"--context-parallel-algo {par.context_parallel_algo} at --context-parallel-size {cp} runs ring "
            f"attention, whose block kernel (attention_block) the {name} backend does not have: use "
            "--context-parallel-algo ulysses_cp_algo (TP x CP must divide the heads) or the cpu backend"]


def resolve_virtual_stage_flag(args: argparse.Namespace, num_blocks: int) -> tuple[argparse.Namespace, list[str]]:
    """megatron's ``--num-layers-per-virtual-pipeline-stage N`` as ``--virtual-pipeline-model-parallel-size``
    (blocks per PP rank / N; 1 chunk per rank: no VPP): (args with it resolved, problems)."""
    n = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if n is None:
        return args, []
    pp, flag = args.pipeline_model_parallel_size, f"--num-layers-per-virtual-pipeline-stage {n}"
    if args.virtual_pipeline_model_parallel_size is not None:
        return args, [f"{flag} and --virtual-pipeline-model-parallel-size "
                      f"{args.virtual_pipeline_model_parallel_size} both set the interleaved pipeline: give one"]
    if n < 1 or pp < 2:
        return args, [f"{flag}: needs N >= 1 and --pipeline-model-parallel-size > 1 (it is {pp})"]
    per_rank = num_blocks // pp
    if num_blocks % pp or per_rank % n:
        return args, [f"{flag}: the SUV's {num_blocks} blocks over --pipeline-model-parallel-size {pp} are "
                      f"{num_blocks / pp:g} per PP rank, not a multiple of {n}"]
    vpp = per_rank // n
    return argparse.Namespace(**{**vars(args), "virtual_pipeline_model_parallel_size": vpp if vpp > 1 else None}), []


def validate_training(args: argparse.Namespace, world_size: int) -> tuple[ModelSpec, DataConfig, RunConfig]:
    """(model spec, data config, run config) of a valid command line; ``ConfigErrors`` listing every problem."""
    from mm.training.checkpointing import candidate_iterations, resume_problems

    problems = Problems()
    spec = data_cfg = run = suv = None
    with problems.check("--mm-model: "):
        spec = load_model_json(args.mm_model)
    if spec is not None:
        with problems.check("--mm-model: "):
            suv = spec.suv_config()
    if suv is not None:
        args, vpp_problems = resolve_virtual_stage_flag(args, suv.num_blocks)
        for msg in vpp_problems:
            problems.add(msg)
    with problems.check("--mm-data: "):
        data_cfg = load_data_config(args.mm_data)
    with problems.check():
        run = run_config_from_args(args, world_size)
    if getattr(args, "data_num_workers", None) is not None and args.data_num_workers < 0:
        problems.add(f"--data-num-workers {args.data_num_workers}: must be >= 0")
    if spec is not None:
        video_cached = spec.load_video_features or bool(data_cfg and data_cfg.load_video_features)
        text_cached = spec.load_text_features or bool(data_cfg and data_cfg.load_text_features)
        for msg in _missing_model_files(spec, video_cached, text_cached):
            problems.add(msg)
    if data_cfg is not None:
        for msg in _missing_data_files(data_cfg):
            problems.add(msg)
    if run is not None:
        if spec is not None and spec.enable_encoder_dp and not run.parallel.encoder_data_parallel:
            run = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, encoder_data_parallel=True))
        par, tr = run.parallel, run.training
        if suv is not None:
            from mm.distributed.pipeline import pipeline_problems

            mp = par.model_parallel_size
            dp = world_size // mp if world_size % mp == 0 else None
            micro = tr.num_microbatches(dp) if dp and tr.global_batch_size % (tr.micro_batch_size * dp) == 0 else None
            for msg in pipeline_problems(suv, par, micro):
                problems.add(msg)
        group = par.tensor_model_parallel_size * par.context_parallel_size
        heads_split = par.tensor_model_parallel_size * par.ulysses_size  # ring CP does not split heads
        if suv is not None and suv.num_heads % heads_split:
            what = ("--context-parallel-size" if par.context_parallel_algo == "ulysses_cp_algo"
                    else "--ulysses-degree-in-cp")
            problems.add(f"--tensor-model-parallel-size {par.tensor_model_parallel_size} x {what} "
                         f"{par.ulysses_size} = {heads_split} does not divide the model's {suv.num_heads} "
                         "attention heads (predictor.num_heads); ring context parallelism "
                         "(--context-parallel-algo megatron_cp_algo) splits no heads")
        for msg in _ring_kernel_problems(par, suv, run.backend.name):
            problems.add(msg)
        if par.encoder_data_parallel and world_size % par.model_parallel_size == 0:
            mb = tr.global_batch_size // max(1, tr.micro_batch_size * (world_size // par.model_parallel_size))
            if mb % group:
                problems.add(f"encoder data parallelism needs the micro-batches per step ({mb}) divisible by "
                             f"TP x CP = {group}: raise --global-batch-size")
        if tr.rollback_on_spike is not None and not run.checkpoint.save:
            problems.add("--rollback-on-spike needs --save: it reloads the last checkpoint written there")
    for msg in resume_problems(args.load, args.save, args.use_distributed_optimizer,
                               not args.no_load_optim and not args.finetune):
        problems.add(msg)
    if args.finetune and args.save and candidate_iterations(args.save):
        problems.add(f"--finetune restarts at iteration 0 but --save {args.save} already holds checkpoints (their "
                     "higher iteration numbers would be resumed and would prune the new ones): use a new --save")
    problems.raise_if_any()
    return spec, data_cfg, run
