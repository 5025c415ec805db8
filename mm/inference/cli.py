"""``inference_sora.py`` flags -> a validated :class:`InferenceRequest`; ``run`` builds and generates.

Everything a user can get wrong (sizes, frame counts, prompts, weight paths, encoder directories, TP/SP
layout vs. the model and the world size) is checked in :func:`parse_request`, before torch.distributed is
initialised or any model is built; problems raise ``ValueError`` with the offending value and what is
accepted (the entry script turns that into exit code 2). This module imports no megatron, so it can run
before the backend is selected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mm.config import CP_ALGOS, BackendConfig, ParallelConfig
from mm.config_upstream import InferenceSpec, TextEncoderPaths, load_inference_json
from mm.inference.pipeline import SamplingConfig
from mm.inference.i2v import check_checkpoint_channels, check_request, split_prompt_images
from mm.inference.prompts import resolve_prompts
from mm.inference.runner import OutputOptions

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Generate videos with Open-Sora Plan v1.5 (SUV + WFVAE + T5/CLIP), batch mode, under torchrun.

Prompts are split over data-parallel replicas of CFG x TP x CP ranks (CFG = 2 with --cfg-parallel, else 1);
each replica runs the DiT with tensor parallelism (+ sequence parallelism), context parallelism and, with
--cfg-parallel, the two guidance branches on two ranks; the first rank of each replica writes
<index>_<slug>.mp4 (PNG for --num-frames 1) and a JSON sidecar with every setting needed to reproduce the
sample, and global rank 0 writes video_grid.mp4 of all samples at the end. Prompt i is sampled from noise
seeded with --seed + i, so outputs do not depend on the number of GPUs (bitwise across DP sizes; across
TP/CP/CFG layouts within float rounding, see the README). Samples whose media file and sidecar both exist
are skipped: re-running an interrupted command resumes it, and when every output exists it stops before
loading any model.

Settings come from the upstream inference JSON (--mm-model); the flags below override it."""

EPILOG = """\
examples:
  torchrun --nproc_per_node 8 inference_sora.py --mm-model examples/opensoraplan1.5/inference_t2v_model1_5.json \\
      --upstream-dit MindSpeed/model_ema.pt --upstream-vae MindSpeed/wfvae_888_dim32.ckpt \\
      --t5 pretrained/t5-v1_1-xl --clip pretrained/CLIP-ViT-bigG-14-laion2B-39B-b160k \\
      --prompt-file prompts.txt --tensor-model-parallel-size 4 --sequence-parallel --save-path samples/
  torchrun --nproc_per_node 2 inference_sora.py --mm-model examples/tiny/inference.json \\
      --load outputs/demo/checkpoints --upstream-vae outputs/demo/wfvae.ckpt --tensor-model-parallel-size 2

exit codes: 0 done, 2 bad arguments or inputs (message on stderr, nothing built)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference_sora.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mm-model", required=True, metavar="JSON",
                   help="upstream inference JSON (inference_t2v_model1_5.json style): model blocks, size, sampler")

    g = p.add_argument_group("prompts")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--prompt", metavar="TEXT", help="one prompt (overrides the JSON's \"prompt\")")
    x.add_argument("--prompt-file", metavar="PATH",
                   help="text file, one prompt per line; blank lines and lines starting with # are ignored")
    g.add_argument("--image", metavar="PATH", help="image-to-video: condition every prompt on this first frame "
                   "(an I2V predictor; a prompt file line 'prompt<TAB>image[<TAB>last_image]' sets it per prompt)")
    g.add_argument("--last-image", metavar="PATH", help="with --image: transition from --image to this last frame")
    g.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="appended to the built-in v1.5 negative prompt (default: nothing appended)")

    g = p.add_argument_group("sample size and sampler (default: the JSON's values)")
    g.add_argument("--num-frames", type=int, metavar="T", help="frames per video, 8n+1 (1 writes a PNG image)")
    g.add_argument("--height", type=int, metavar="H", help="height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, metavar="W", help="width in pixels, a multiple of 16")
    g.add_argument("--num-inference-steps", type=int, metavar="N", help="Euler steps of the flow ODE")
    g.add_argument("--guidance-scale", type=float, metavar="G", help="classifier-free guidance scale (1 = no CFG)")
    g.add_argument("--guidance-rescale", type=float, metavar="PHI", help="guidance rescale in [0, 1]")
    g.add_argument("--shift", type=float, metavar="S",
                   help="static sigma shift (selects the static-shift schedule, overriding the JSON's dynamic or "
                        "linear-quadratic choice)")
    g.add_argument("--seed", type=int, default=1234, help="base seed: prompt i uses noise seeded with seed + i "
                                                          "(default 1234)")

    g = p.add_argument_group("output")
    g.add_argument("--save-path", metavar="DIR", help="output directory (default: the JSON's save_path)")
    g.add_argument("--fps", type=int, help="frame rate of the written mp4 (default: the JSON's fps // frame_interval)")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="prompts per DiT forward on each replica (default: the JSON's micro_batch_size)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-grid", action="store_true",
                   help="do not write video_grid.mp4 (video_grid.png for images) of all samples")

    g = p.add_argument_group("weights (one DiT source: --load or --upstream-dit or predictor.from_pretrained)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--load", metavar="DIR",
                   help="our training checkpoint directory (latest complete iteration; any TP size)")
    x.add_argument("--upstream-dit", metavar="FILE",
                   help="released merged DiT state dict (model_ema.pt / .safetensors); overrides "
                        "predictor.from_pretrained")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="with --load: the EMA weights (default) or, with --no-use-ema, the raw weights")
    g.add_argument("--upstream-vae", metavar="FILE",
                   help="released WFVAE checkpoint (wfvae_888_dim32.ckpt, any released layout); overrides "
                        "ae.from_pretrained")
    g.add_argument("--t5", metavar="DIR", help="local T5 directory (model + tokenizer); overrides the JSON")
    g.add_argument("--clip", metavar="DIR", help="local CLIP directory (model + tokenizer); overrides the JSON")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="DiT and text-encoder dtype (default: the JSON's weight_dtype); sampling math is fp32 anyway")

    g = p.add_argument_group("parallelism and device")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="TP",
                   help="DiT tensor-parallel size; divides the world size and the number of heads (default 1)")
    g.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallel over the TP group")
    g.add_argument("--context-parallel-size", type=int, default=1, metavar="CP",
                   help="DiT context-parallel size: the video and text tokens split over CP ranks (default 1)")
    g.add_argument("--context-parallel-algo", choices=CP_ALGOS, default="ulysses_cp_algo",
                   help="ulysses_cp_algo (heads all-to-all; TP x CP divides the heads), megatron_cp_algo (ring "
                        "attention), hybrid_cp_algo (Ulysses x ring, --ulysses-degree-in-cp), skiparse_cp_algo "
                        "(whole skiparse sub-sequences per rank; no --sequence-parallel) (default ulysses_cp_algo)")
    g.add_argument("--ulysses-degree-in-cp", type=int, default=None, metavar="U",
                   help="hybrid_cp_algo: the Ulysses part of CP (a divisor of CP; the ring is CP / U)")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="run the unconditional and conditional branches on two ranks (one velocity exchange "
                        "per step); needs --guidance-scale > 1 and a world size divisible by 2 x TP x CP")
    g.add_argument("--backend", choices=["auto", "cpu", "cuda", "npu"], default=None,
                   help="kernel/device backend (default $MM_BACKEND or auto)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0, metavar="MIN",
                   help="collective timeout; covers the writer decoding while its TP peers wait (default 30)")

    g = p.add_argument_group("VAE decode")
    g.add_argument("--spatial-tiling", action="store_true",
                   help="decode in overlapping spatial tiles (less memory at high resolution; approximate at seams)")
    g.add_argument("--spatial-tile-size", type=int, default=256, metavar="PX", help="tile size in pixels (default 256)")
    g.add_argument("--spatial-tile-overlap", type=int, default=64, metavar="PX",
                   help="tile overlap in pixels (default 64)")
    g.add_argument("--parallel-vae-decode", action="store_true",
                   help="with --spatial-tiling: spread the tiles over the ranks of the replica (output equal to the "
                        "one-rank tiled decode); per rank the decoder's tiled part holds ceil(tiles / ranks) "
                        "tiles' activations instead of all, plus one temporal chunk's RGB tile outputs (gathered) and "
                        "frames")
    return p


@dataclass
class InferenceRequest:
    """A validated inference job."""

    spec: InferenceSpec  # with the CLI overrides applied (sizes, weight paths, encoder dirs, VAE tiling)
    prompts: list[str]
    sampling: SamplingConfig
    output: OutputOptions
    parallel: ParallelConfig
    backend: str
    load: str | None
    use_ema: bool
    dtype: str
    argv: list[str]
    cfg_parallel: bool = False
    parallel_vae_decode: bool = False

    images: list | None = None  # one mm.inference.i2v.ImageCondition per prompt, None: text only

    def metadata(self) -> dict:
        """Extra sidecar fields: the JSON and the command line."""
        return {"config": self.spec.source, "argv": self.argv}


def parse_request(argv: list[str] | None = None, world_size: int | None = None) -> InferenceRequest:
    """Parse and validate; ValueError names the problem (argparse's own usage errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size

    try:
        spec = load_inference_json(args.mm_model)
    except FileNotFoundError as err:
        raise ValueError(f"--mm-model: {err}") from None
    spec = _apply_overrides(spec, args)
    _check_weights(spec, args)
    prompts = resolve_prompts(args.prompt, args.prompt_file, spec.prompt)
    prompt_file = args.prompt_file or (spec.prompt if args.prompt is None and spec.prompt
                                       and os.path.isfile(spec.prompt) else None)
    prompts, images = split_prompt_images(prompts, args.image, args.last_image,  # image paths: from the file's folder
                                          os.path.dirname(prompt_file) if prompt_file else None)

    sampling = SamplingConfig.from_spec(
        spec, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale, shift=args.shift, negative_prompt=args.negative_prompt,
        schedule="static_shift" if args.shift is not None else None,
    )
    output = OutputOptions(
        save_path=args.save_path or spec.save_path,
        fps=args.fps if args.fps is not None else max(1, spec.fps // spec.frame_interval),
        batch_size=args.batch_size if args.batch_size is not None else spec.micro_batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        grid=not args.no_grid,
    )
    tp = args.tensor_model_parallel_size
    try:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=args.sequence_parallel and tp > 1,
                                  context_parallel_size=args.context_parallel_size,
                                  context_parallel_algo=args.context_parallel_algo,
                                  ulysses_degree_in_cp=args.ulysses_degree_in_cp,
                                  distributed_timeout_minutes=args.distributed_timeout_minutes)
    except ValueError as err:
        raise ValueError(f"parallel layout: {err}") from None
    _check_model(spec, sampling, parallel, world_size)
    check_request(images, spec.suv_config().conditioning, sampling.num_frames)
    check_checkpoint_channels(spec.predictor_checkpoint if args.load is None else None, spec.suv_config())
    images = images if any(c.first is not None for c in images) else None
    _check_inference_layout(args, sampling, parallel, world_size)
    backend = BackendConfig(args.backend or os.environ.get("MM_BACKEND", "auto")).name
    return InferenceRequest(images=images, spec=spec, prompts=prompts, sampling=sampling, output=output, parallel=parallel,
                            backend=backend, load=args.load, use_ema=args.use_ema, dtype=spec.weight_dtype, argv=argv,
                            cfg_parallel=args.cfg_parallel, parallel_vae_decode=args.parallel_vae_decode)


def _apply_overrides(spec: InferenceSpec, args) -> InferenceSpec:
    text = spec.text
    if args.t5:
        text = dataclasses.replace(text, t5=args.t5, t5_tokenizer=args.t5)
    if args.clip:
        text = dataclasses.replace(text, clip=args.clip, clip_tokenizer=args.clip)
    # temporal tiling is exact (and bounds memory): always on for decoding; spatial tiling on request
    ae = {**spec.ae, "use_tiling": True, "use_spatial_tiling": bool(args.spatial_tiling),
          "spatial_tile_size": args.spatial_tile_size, "spatial_tile_overlap": args.spatial_tile_overlap}
    sizes = {k: v for k, v in (("num_frames", args.num_frames), ("height", args.height), ("width", args.width))
             if v is not None}
    return dataclasses.replace(  # re-validates sizes and dtypes (InferenceSpec.__post_init__)
        spec, text=text, ae=ae, weight_dtype=args.dtype or spec.weight_dtype,
        ae_checkpoint=args.upstream_vae or spec.ae_checkpoint,
        predictor_checkpoint=None if args.load else (args.upstream_dit or spec.predictor_checkpoint),
        **sizes,
    )


def _check_weights(spec: InferenceSpec, args) -> None:
    if args.load:
        from mm.training.checkpointing import latest_iteration

        if not os.path.isdir(args.load):
            raise ValueError(f"--load: checkpoint directory {args.load!r} does not exist")
        if latest_iteration(args.load) is None:
            raise ValueError(f"--load: no complete checkpoint (iter_NNNNNNN/) under {args.load!r}")
    elif not spec.predictor_checkpoint:
        raise ValueError("no DiT weights: pass --load (training checkpoint) or --upstream-dit (released "
                         "model_ema.pt), or set predictor.from_pretrained in the JSON")
    elif not os.path.isfile(spec.predictor_checkpoint):
        raise ValueError(f"DiT checkpoint {spec.predictor_checkpoint!r} (--upstream-dit / predictor.from_pretrained) "
                         "does not exist")
    if not spec.ae_checkpoint:
        raise ValueError("no WFVAE weights: pass --upstream-vae (wfvae_888_dim32.ckpt) or set ae.from_pretrained "
                         "in the JSON")
    if not os.path.isfile(spec.ae_checkpoint):
        raise ValueError(f"WFVAE checkpoint {spec.ae_checkpoint!r} (--upstream-vae / ae.from_pretrained) does not "
                         "exist")
    _check_text_dirs(spec.text)


def _check_text_dirs(text: TextEncoderPaths) -> None:
    for name, flag, model_dir, tok_dir in (("T5", "--t5", text.t5, text.t5_tokenizer),
                                           ("CLIP", "--clip", text.clip, text.clip_tokenizer)):
        if not model_dir:
            raise ValueError(f"no {name} directory: pass {flag} or set it in the JSON")
        if not os.path.isdir(model_dir):
            raise ValueError(f"{name} directory {model_dir!r} ({flag}) does not exist")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{name} directory {model_dir!r} ({flag}) has no config.json: not a Hugging Face "
                             "model directory")
        if tok_dir and not os.path.isdir(tok_dir):
            raise ValueError(f"{name} tokenizer directory {tok_dir!r} does not exist")


def _read_config_json(directory: str) -> dict:
    try:
        return json.loads(Path(directory, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {directory}/config.json: {err}") from None


def _check_model(spec: InferenceSpec, sampling: SamplingConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Shapes that must agree between the parts, and the parallel layout (no model is built)."""
    suv = spec.suv_config()
    vae = spec.vae_config()
    if not suv.in_channels == suv.out_channels == vae.latent_dim:
        raise ValueError(f"predictor in/out_channels ({suv.in_channels}/{suv.out_channels}) must equal the WFVAE "
                         f"latent_dim ({vae.latent_dim})")
    t5_cfg, clip_cfg = _read_config_json(spec.text.t5), _read_config_json(spec.text.clip)
    t5_dim = t5_cfg.get("d_model")
    if t5_dim is not None and t5_dim != suv.caption_channels:
        raise ValueError(f"T5 d_model {t5_dim} ({spec.text.t5}) != predictor caption_channels {suv.caption_channels}")
    clip_dim = clip_cfg.get("projection_dim")
    if clip_dim is not None and clip_dim != suv.pooled_projection_dim:
        raise ValueError(f"CLIP projection_dim {clip_dim} ({spec.text.clip}) != predictor pooled_projection_dim "
                         f"{suv.pooled_projection_dim}")
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    suv.validate_tp(tp)
    heads_split = tp * parallel.ulysses_size  # ring CP splits no heads
    if suv.num_heads % heads_split:
        raise ValueError(f"--tensor-model-parallel-size {tp} x Ulysses degree {parallel.ulysses_size} "
                         f"({parallel.context_parallel_algo}) = {heads_split} does not divide the model's "
                         f"{suv.num_heads} attention heads; ring context parallelism (--context-parallel-algo "
                         "megatron_cp_algo) splits no heads")
    if world_size % (tp * cp):
        raise ValueError(f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} does not divide the world "
                         f"size {world_size} (torchrun --nproc_per_node x nodes)")
    t, h, w = sampling.latent_grid()
    p = suv.patch_size
    if (parallel.sequence_parallel or cp > 1) and (h % p or w % p):
        raise ValueError(f"latent size {h}x{w} must be divisible by the patch size {p}")
    if parallel.sequence_parallel and cp == 1:
        video_tokens, text_tokens = t * (h // p) * (w // p), spec.text.t5_max_length
        if video_tokens % tp or text_tokens % tp:
            raise ValueError(f"--sequence-parallel needs the video tokens ({video_tokens} for {sampling.num_frames}x"
                             f"{sampling.height}x{sampling.width}) and the text tokens ({text_tokens}) divisible by "
                             f"the TP size {tp}")


def _check_inference_layout(args, sampling: SamplingConfig, parallel: ParallelConfig, world_size: int) -> None:
    """CFG parallelism and parallel VAE decode against the sampler settings and the world size."""
    replica = parallel.tensor_model_parallel_size * parallel.context_parallel_size * (2 if args.cfg_parallel else 1)
    if args.cfg_parallel:
        if not sampling.use_cfg:
            raise ValueError(f"--cfg-parallel needs classifier-free guidance, but the guidance scale is "
                             f"{sampling.guidance_scale} (1 = no CFG, one branch only); drop --cfg-parallel or pass "
                             "--guidance-scale > 1")
        if world_size % replica:
            raise ValueError(f"--cfg-parallel: a replica is 2 x TP {parallel.tensor_model_parallel_size} x CP "
                             f"{parallel.context_parallel_size} = {replica} ranks, which does not divide the world "
                             f"size {world_size}")
    if args.parallel_vae_decode:
        if not args.spatial_tiling:
            raise ValueError("--parallel-vae-decode spreads spatial tiles over ranks: it needs --spatial-tiling")
        if replica == 1:
            raise ValueError("--parallel-vae-decode needs a replica of 2 or more ranks (TP, CP or --cfg-parallel); "
                             "with one rank per replica every rank already decodes its own samples")


def setup_logging() -> None:
    """INFO on global rank 0, warnings elsewhere; every line names its rank (the format of every entry point)."""
    from mm.logs import setup_logging as setup

    setup()


def nothing_to_do(request: InferenceRequest) -> bool:
    """Every requested output exists already (checked before anything is built or loaded)."""
    from mm.inference.runner import nothing_to_do as done

    return done(request.prompts, request.sampling, request.output)


def run(request: InferenceRequest, parallel=None):
    """Build the pipeline on this rank and generate its replica's share (collective over all ranks)."""
    from mm.distributed.cfg_parallel import init_replicas
    from mm.distributed.parallel_decode import apply_parallel_decode
    from mm.inference.pipeline import OpenSoraPlanPipeline
    from mm.inference.runner import generate_videos

    replicas = init_replicas(parallel, request.cfg_parallel)
    pipeline = OpenSoraPlanPipeline.from_spec(request.spec, parallel=parallel, load=request.load,
                                              use_ema=request.use_ema, dtype=request.dtype, replicas=replicas)
    if request.parallel_vae_decode:
        apply_parallel_decode(pipeline.vae, replicas)
    return generate_videos(pipeline, request.prompts, request.sampling, request.output, parallel,
                           extra_metadata=request.metadata(), images=request.images)


__all__ = ["InferenceRequest", "build_parser", "nothing_to_do", "parse_request", "run", "setup_logging"]
