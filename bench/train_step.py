"""Where the time of a training step goes: a mid-size SUV trained by the real ``Trainer`` (spec §7.1-7.2).

A synthetic dataset (``mm.data.synthetic``: H.264 clips, tiny T5/CLIP, tiny WFVAE) is written to a temp
directory, and a mid-size SUV (default hidden 512 = 8 heads x 64, ``[2, 2, 2, 2, 2, 2, 2]`` blocks with
the released sparsity pattern) is trained for ``--steps`` steps after one warm-up step in two modes:

* ``encoders``: every step decodes the clips and runs the frozen WFVAE, T5 and CLIP;
* ``cache``: the features come from a cache written once by ``mm.data.extract_features``.

The step is timed by wrapping the Trainer's parts from outside (nothing in ``mm`` knows about it):
data (the loader's ``next``), VAE (``encode``), text encoders (T5 + CLIP ``encode``), DiT forward
(hooks on the SUV), backward (megatron's forward-backward call minus everything above inside it: the
backward pass, the loss and the noising), optimizer (the megatron optimizer step without the EMA),
EMA (the EMA update composed onto the inner optimizer), other (zero-grad, LR schedule, loss
reduction) and logging. Prints each phase as a fraction of the step wall time, steps/s and samples/s;
the last line is one JSON object ``{"bench": "train_step", "video_tokens": N, "modes": {"encoders":
{"samples_per_s": .., "step_s": .., "fractions": {phase: ..}}, "cache": {...}}}``, also written to
``--out`` when given.

``--profile N`` also runs the timed steps under ``torch.profiler`` (CPU, input shapes recorded) and prints,
per mode, the N ops with the most self CPU time per step (with their input shapes), which is where a phase's
time goes inside; the JSON gains ``"top_ops"`` per mode. The profiler's overhead inflates the phase times.

    python bench/train_step.py [--frames 49] [--size 256] [--steps 3] [--batch 1] [--profile N] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from _summary import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("data", "vae", "text", "forward", "backward", "optimizer", "ema", "other", "logging")


class PhaseTimer:
    """Wall seconds per phase for the current step; ``steps`` holds one dict per finished step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = collections.defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0

        return timed

    def finish_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current.clear()


class _TimedIterable:
    """The loader, with the time of every ``next`` counted as data."""

    def __init__(self, loader, timer: PhaseTimer) -> None:
        self.loader, self.timer = loader, timer

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.timer.current["data"] += time.perf_counter() - t0
            yield batch


def _instrument(trainer, timer: PhaseTimer) -> contextlib.ExitStack:
    """Wrap the trainer's parts; the returned stack undoes the class-level patches."""
    import megatron.core.pipeline_parallel as pp

    stack = contextlib.ExitStack()
    trainer.loader = _TimedIterable(trainer.loader, timer)
    enc = trainer.encoders
    if enc.vae is not None:
        enc.vae.encode = timer.wrap("vae", enc.vae.encode)
    for text_encoder in (enc.t5, enc.clip):
        if text_encoder is not None:
            text_encoder.encode = timer.wrap("text", text_encoder.encode)

    starts: list[float] = []
    hooks = [
        trainer.model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())),
        trainer.model.register_forward_hook(
            lambda *_: timer.current.__setitem__("forward", timer.current["forward"] + time.perf_counter() - starts.pop())
        ),
    ]
    stack.callback(lambda: [h.remove() for h in hooks])

    # megatron's forward-backward call: backward = its time minus the phases measured inside it
    original_get = pp.get_forward_backward_func

    def get_timed():
        fwd_bwd = original_get()

        def timed(*args, **kwargs):
            inside = {k: timer.current[k] for k in ("data", "vae", "text", "forward")}
            t0 = time.perf_counter()
            out = fwd_bwd(*args, **kwargs)
            spent = time.perf_counter() - t0
            timer.current["backward"] += spent - sum(timer.current[k] - v for k, v in inside.items())
            timer.current["fwd_bwd"] += spent
            return out

        return timed

    pp.get_forward_backward_func = get_timed
    stack.callback(setattr, pp, "get_forward_backward_func", original_get)

    # the EMA is composed onto the inner optimizer class: EMA = its step minus the inner class's step
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        composed = type(opt.optimizer)
        inner_cls = composed.__mro__[2]  # (Ema<Inner>, EmaStep, Inner, ...)
        if "step" in vars(inner_cls) and not getattr(inner_cls.step, "_bench_timed", False):
            original_step = inner_cls.step
            inner_step = timer.wrap("inner_step", original_step)
            inner_step._bench_timed = True
            inner_cls.step = inner_step
            stack.callback(setattr, inner_cls, "step", original_step)
        opt.optimizer.step = timer.wrap("ema_step", opt.optimizer.step)

    trainer._optimizer_step = timer.wrap("optimizer_step", trainer._optimizer_step)
    trainer._log = timer.wrap("logging", trainer._log)
    trainer.train_step = timer.wrap("train_step", trainer.train_step)
    return stack


def _phase_split(raw: dict[str, float]) -> dict[str, float]:
    """The disjoint phases of one step from the raw (nested) timings."""
    ema = raw.get("ema_step", 0.0) - raw.get("inner_step", 0.0)
    return {
        "data": raw.get("data", 0.0),
        "vae": raw.get("vae", 0.0),
        "text": raw.get("text", 0.0),
        "forward": raw.get("forward", 0.0),
        "backward": raw.get("backward", 0.0),
        "optimizer": raw.get("optimizer_step", 0.0) - ema,
        "ema": ema,
        "other": raw.get("train_step", 0.0) - raw.get("fwd_bwd", 0.0) - raw.get("optimizer_step", 0.0),
        "logging": raw.get("logging", 0.0),
    }


def _workspace(tmp: str, args: argparse.Namespace) -> dict[str, str]:
    from mm.data.synthetic import write_dataset, write_tiny_encoders
    from mm.presets import write_tiny_configs

    data = os.path.join(tmp, "data")
    write_dataset(data, num=args.clips, frames=args.frames, height=args.size, width=args.size, seed=0)
    write_tiny_encoders(data)
    paths = {}
    for mode, features in (("encoders", None), ("cache", os.path.join(tmp, "features"))):
        written = write_tiny_configs(os.path.join(tmp, mode), data, frames=args.frames, size=args.size, features=features)
        model = json.loads(written["model"].read_text())
        model["predictor"].update(
            num_layers=[2] * 7, sparse_n=[1, 2, 4, 8, 4, 2, 1], num_heads=args.heads, head_dim=args.head_dim,
            timestep_embed_dim=256,
        )  # fmt: skip
        written["model"].write_text(json.dumps(model, indent=1))
        paths[mode] = {k: str(v) for k, v in written.items()}
    return paths


def _extract_features(paths: dict[str, str], features: str) -> None:
    cmd = [sys.executable, "-m", "mm.data.extract_features", "--data", paths["data"], "--out", features,
           "--vae-config", paths["model"], "--text-dtype", "fp32", "--backend", "cpu"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)


class _StepProfiler:
    """``torch.profiler`` over the timed steps only: started when the warm-up step logs, stopped when the last
    timed step logs (so neither the warm-up's kernel builds nor the end-of-run summary are counted)."""

    def __init__(self, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.steps, self.logged = steps, 0
        self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    def wrap(self, log):
        def profiled_log(*args, **kwargs):
            out = log(*args, **kwargs)
            self.logged += 1
            if self.logged == 1:
                self.prof.start()
            elif self.logged == 1 + self.steps:
                self.prof.stop()
            return out

        return profiled_log

    def top_ops(self, n: int) -> list[dict]:
        """The ``n`` (op, input shapes) pairs with the most self CPU time, per timed step."""
        ops = sorted(self.prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        return [{"op": e.key, "shapes": str(e.input_shapes), "calls_per_step": e.count // self.steps,
                 "self_s_per_step": round(e.self_cpu_time_total / 1e6 / self.steps, 4),
                 "fraction": round(e.self_cpu_time_total / total, 4)} for e in ops[:n]]


def _run_mode(paths: dict[str, str], args: argparse.Namespace) -> dict:
    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    run = RunConfig(
        parallel=ParallelConfig(),
        # no adaptive clipping: its warm-up may skip the first updates, and the optimizer step is timed
        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-4, use_distributed_optimizer=True, clip_grad=0.0),
        training=TrainingConfig(
            micro_batch_size=args.batch, global_batch_size=args.batch, train_iters=1 + args.steps, seed=0, log_interval=1
        ),
        checkpoint=CheckpointConfig(),
    )
    trainer = Trainer(load_model_json(paths["model"]), load_data_config(paths["data"]), run, data_num_workers=0)
    timer = PhaseTimer()
    stack = _instrument(trainer, timer)
    finished_steps: list[float] = []
    log = trainer._log

    def log_and_finish(*a, **k):  # the step ends with its log line (log_interval 1)
        out = log(*a, **k)
        timer.current["step_wall"] = time.perf_counter() - finished_steps[-1] if finished_steps else 0.0
        timer.finish_step()
        finished_steps.append(time.perf_counter())
        return out

    trainer._log = log_and_finish
    profiler = _StepProfiler(args.steps) if args.profile else None
    if profiler is not None:
        trainer._log = profiler.wrap(log_and_finish)
    finished_steps.append(time.perf_counter())
    with stack:
        trainer.train()
    tokens = trainer._latent_shape
    trainer.close()
    measured = timer.steps[1:]  # the first step builds kernels and caches
    split = [_phase_split(s) for s in measured]
    step_s = sum(s["step_wall"] for s in measured) / len(measured)
    mean = {p: sum(s[p] for s in split) / len(split) for p in PHASES}
    total = sum(mean.values())
    result = {
        "samples_per_s": round(args.batch / step_s, 4),
        "step_s": round(step_s, 3),
        "fractions": {p: round(mean[p] / total, 4) for p in PHASES},
        "seconds": {p: round(mean[p], 4) for p in PHASES},
        "latent_shape": list(tokens),
    }
    if profiler is not None:
        result["top_ops"] = profiler.top_ops(args.profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=49, help="clip frames (8n+1)")
    parser.add_argument("--size", type=int, default=256, help="clip height = width (multiple of 64 for sparse_n 8)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="micro = global batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the timed steps and print the N ops with the most self CPU time")
    parser.add_argument("--out", help="also write the JSON summary to this file")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from mm.ops import select_backend

    select_backend("cpu")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        os.environ.setdefault("MM_DATA_INDEX_CACHE", os.path.join(tmp, "index"))
        paths = _workspace(tmp, args)
        _extract_features(paths["cache"], os.path.join(tmp, "features"))
        for mode in ("encoders", "cache"):
            results[mode] = _run_mode(paths[mode], args)
    t, h, w = results["cache"]["latent_shape"]
    video_tokens = t * (h // 2) * (w // 2)  # patch 1x2x2
    print(f"mid-size SUV (hidden {args.heads * args.head_dim}, {args.heads} heads, [2]*7 blocks), batch {args.batch}, "
          f"{args.frames}x{args.size}x{args.size} clips -> {video_tokens} video tokens, {args.threads} threads, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    header = f"{'phase':>10} | " + " | ".join(f"{m:>16}" for m in results)
    print(header)
    print("-" * len(header))
    for p in PHASES:
        cells = [f"{results[m]['fractions'][p]:6.1%} {results[m]['seconds'][p]:7.3f}s" for m in results]
        print(f"{p:>10} | " + " | ".join(f"{c:>16}" for c in cells))
    print(f"{'step':>10} | " + " | ".join(f"{results[m]['step_s']:15.3f}s" for m in results))
    print(f"{'samples/s':>10} | " + " | ".join(f"{results[m]['samples_per_s']:16.4f}" for m in results))
    for mode in (m for m in results if "top_ops" in results[m]):
        print(f"\n{mode}: top {args.profile} ops by self CPU time per step (profiled steps)")
        for op in results[mode]["top_ops"]:
            print(f"{op['self_s_per_step']:9.4f}s {op['fraction']:6.1%} {op['calls_per_step']:6d}x  {op['op'][:48]:48} "
                  f"{op['shapes'][:100]}")
    summary = {
        "bench": "train_step",
        "video_tokens": video_tokens,
        "modes": {m: {k: r[k] for k in ("samples_per_s", "step_s", "fractions", "top_ops") if k in r}
                  for m, r in results.items()},
    }
    emit(summary, args.out)


if __name__ == "__main__":
    main()
