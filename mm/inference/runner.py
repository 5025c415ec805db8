"""Batch generation over a prompt list: DP sharding, resume, one writer per replica, sidecars, progress.

Spec §9.3 with the deviations the issue asks for: micro-batch ``b`` of the global prompt order runs on
replica ``b % DP``; the noise of prompt ``i`` is seeded with ``seed + i`` (so a sample depends on its prompt,
its index and the settings, not on the number of GPUs); the first rank of each TP group (``tp_rank 0``)
decodes and writes ``<index>_<slug>.mp4`` (``.png`` for one frame) and then ``<index>_<slug>.json``.
A prompt whose media file and sidecar both exist is skipped, so re-running an interrupted job resumes it;
that decision is taken by the writer and broadcast over the replica, so its ranks agree. A replica is TP x CP
ranks, x 2 with CFG parallelism (``mm.distributed.cfg_parallel``); its writer is its first rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from mm.inference.pipeline import OpenSoraPlanPipeline, SamplingConfig
from mm.inference.prompts import negative_text, output_stem, positive_text, shard
from mm.inference.video_io import (GRID_STEM, grid_frames, is_complete, media_path, read_video, sidecar_path,
                                   write_json, write_sample)
from mm.training.observability import write_inference_summary

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1
# sidecar fields that, when they differ from the current request, mean a kept sample is not what it would be now
_REPRODUCTION_KEYS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "guidance_rescale",
                      "schedule", "shift", "num_frames", "height", "width", "fps")


@dataclass
class OutputOptions:
    save_path: str
    fps: int = 24
    batch_size: int = 1
    seed: int = 1234  # prompt i uses seed + i
    progress: bool = True
    grid: bool = True  # video_grid.mp4 (.png for images) of every sample of the run, written by global rank 0

    def __post_init__(self):
        for name in ("fps", "batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"invalid {name}={v!r}: allowed an integer >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"invalid seed={self.seed!r}: allowed an integer >= 0")


@dataclass
class RunSummary:
    """What this rank's replica did (indices are global prompt indices)."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # files written by this rank (writers only)


def _stems(prompts: Sequence[str], out: OutputOptions) -> dict[int, Path]:
    save = Path(out.save_path)
    return {i: save / output_stem(i, prompts[i]) for i in range(len(prompts))}


def grid_path(out: OutputOptions, num_frames: int) -> Path:
    return media_path(Path(out.save_path) / GRID_STEM, num_frames)


def nothing_to_do(prompts: Sequence[str], cfg: SamplingConfig, out: OutputOptions) -> bool:
    """Every sample (media + sidecar) exists, and the grid too unless it is off: the run can stop before
    building anything (a file check only, no process group)."""
    done = all(is_complete(stem, cfg.num_frames) for stem in _stems(prompts, out).values())
    return done and (not out.grid or grid_path(out, cfg.num_frames).is_file())


def write_grid(prompts: Sequence[str], cfg: SamplingConfig, out: OutputOptions) -> Path:
    """The run's grid, composed from the written samples in prompt order (read back from disk, so a resumed
    run's grid holds every sample; the mp4 samples pass through H.264 twice)."""
    samples = [read_video(media_path(stem, cfg.num_frames))[0] for stem in _stems(prompts, out).values()]
    return write_sample(Path(out.save_path) / GRID_STEM, torch.from_numpy(grid_frames(samples)), out.fps)


def _replicas(pipeline: OpenSoraPlanPipeline, parallel):
    """The pipeline's replica layout, or the one of a plain TP x CP replica (collective on first use)."""
    if pipeline.replicas is None:
        from mm.distributed.cfg_parallel import init_replicas

        pipeline.replicas = init_replicas(parallel)
    return pipeline.replicas


def sample_record(index: int, prompt: str, cfg: SamplingConfig, out: OutputOptions,
                  pipeline: OpenSoraPlanPipeline, extra: dict | None = None) -> dict:
    """The JSON sidecar: every parameter needed to reproduce the sample, and the weights' identity."""
    vae_cfg = pipeline.vae.config
    record = {
        "sidecar_version": SIDECAR_VERSION,
        "index": index,
        "prompt": prompt,
        "negative_prompt": cfg.negative_prompt,
        "positive_text": positive_text(prompt, cfg.prompt_template),
        "negative_text": negative_text(cfg.negative_prompt, cfg.default_negative_prompt),
        "seed": out.seed + index,
        "base_seed": out.seed,
        "num_frames": cfg.num_frames,
        "height": cfg.height,
        "width": cfg.width,
        "fps": out.fps,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "guidance_rescale": cfg.guidance_rescale,
        "schedule": cfg.schedule,
        "shift": cfg.shift,
        "use_attention_mask": cfg.use_attention_mask,
        "dit_dtype": str(pipeline.dit.params_dtype).removeprefix("torch."),
        "vae_dtype": str(pipeline.vae.dtype).removeprefix("torch."),
        "vae_spatial_tiling": ({"tile": vae_cfg.spatial_tile_size, "overlap": vae_cfg.spatial_tile_overlap}
                               if pipeline.vae.use_spatial_tiling else False),
        "weights": pipeline.weights,
        "batch_size": out.batch_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    return record


def _warn_if_stale(stem: Path, expected: dict) -> None:
    import json

    try:
        old = json.loads(sidecar_path(stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("kept %s: its sidecar is unreadable", stem)
        return
    diff = [k for k in _REPRODUCTION_KEYS if old.get(k) != expected.get(k)]
    if diff or old.get("weights", {}).get("dit") != expected["weights"].get("dit"):
        logger.warning("kept existing %s although it was made with other settings (%s); delete it to regenerate",
                       stem.name, ", ".join(diff) or "weights")


def generate_videos(pipeline: OpenSoraPlanPipeline, prompts: Sequence[str], cfg: SamplingConfig, out: OutputOptions,
                    parallel=None, extra_metadata: dict | None = None, images=None) -> RunSummary:
    """Generate this replica's share of ``prompts`` into ``out.save_path`` (collective over the TP group)."""
    from tqdm import tqdm

    replicas = _replicas(pipeline, parallel)
    dp_rank, dp_size, writer = replicas.dp_rank, replicas.dp_size, replicas.is_writer
    decode = writer or pipeline.vae.tile_executor is not None  # parallel decode: every rank of the replica
    save = Path(out.save_path)
    if writer:
        save.mkdir(parents=True, exist_ok=True)
    summary = RunSummary()
    stems = _stems(prompts, out)
    plan = None
    if writer:
        plan = []
        for batch in shard(len(prompts), out.batch_size, dp_rank, dp_size):
            done = [i for i in batch if is_complete(stems[i], cfg.num_frames)]
            for i in done:
                _warn_if_stale(stems[i], sample_record(i, prompts[i], cfg, out, pipeline, extra_metadata))
            plan.append(([i for i in batch if i not in done], done))
    plan = replicas.broadcast_from_writer(plan)
    todo = [b for b, _ in plan if b]
    summary.skipped = [i for _, done in plan for i in done]
    if summary.skipped and writer:
        logger.info("replica %d: %d sample(s) already complete, skipped", dp_rank, len(summary.skipped))

    bar = tqdm(total=len(todo) * cfg.num_inference_steps, unit="step", desc=f"replica {dp_rank + 1}/{dp_size}",
               position=dp_rank, disable=not (writer and out.progress), dynamic_ncols=True, mininterval=1.0)
    num_todo = sum(map(len, todo))
    bar.set_postfix_str(f"samples 0/{num_todo}")
    started = time.time()
    denoise_s = 0.0  # up to the last denoising step of each batch (text encoding included, decoding not)

    def on_step(step, total):
        nonlocal denoise_s
        bar.update(1)
        if step == total:  # callback(i + 1, num_steps) after each step
            denoise_s += time.time() - batch_started

    for batch in todo:
        batch_started = time.time()
        result = pipeline([prompts[i] for i in batch], cfg, [out.seed + i for i in batch], decode=decode,
                          callback=on_step, images=[images[i] for i in batch] if images is not None else None)
        if writer:
            for j, i in enumerate(batch):
                media = write_sample(stems[i], result.videos[j], out.fps)
                record = sample_record(i, prompts[i], cfg, out, pipeline, extra_metadata)
                record["file"] = media.name
                if images is not None:  # I2V: the conditioning images' paths and hashes
                    record.update(images[i].sidecar())
                write_json(sidecar_path(stems[i]), record)  # last: its presence marks the sample complete
                assert media == media_path(stems[i], cfg.num_frames)
                summary.written += [str(media), str(sidecar_path(stems[i]))]
        summary.generated += batch
        bar.set_postfix_str(f"samples {len(summary.generated)}/{num_todo}")
    bar.close()
    seconds = time.time() - started
    if out.grid:
        if parallel is not None and parallel.world_size > 1:
            dist.barrier()  # every replica's samples are on disk (world group)
        if parallel is None or parallel.rank == 0:
            summary.written.append(str(write_grid(prompts, cfg, out)))
    if writer:
        logger.info("replica %d/%d: generated %d, skipped %d, outputs in %s", dp_rank + 1, dp_size,
                    len(summary.generated), len(summary.skipped), os.fspath(save))
    write_inference_summary(os.fspath(save), prompts=len(prompts), generated=summary.generated,
                            skipped=summary.skipped, writer=writer, seconds=seconds, denoise_seconds=denoise_s,
                            steps=cfg.num_inference_steps, batches=len(todo), device=pipeline.device)
    return summary


__all__ = ["OutputOptions", "RunSummary", "generate_videos", "sample_record"]
