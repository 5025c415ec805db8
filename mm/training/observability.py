"""What a training run reports and where it goes: one function decides the scalars, four sinks show them.

``RunLog.scalars`` is the only place that decides what is logged (loss, LR, grad norm, clip threshold and
actions, skipped steps, bad samples by reason, rollbacks, samples/s, TFLOP/s, MFU, the step time split,
memory of every rank). The sinks are:

* the console: megatron's iteration line (``training_log`` in megatron/training/training.py), its field
  names and order first, ours after them, so upstream's FPS extraction
  ``grep "elapsed time per iteration" LOG | awk -F ':' '{print$5}' | awk -F '|' '{print$1}'`` still reads the
  step time in ms (the line's log prefix has exactly the two colons of megatron's timestamp, see mm/logs.py);
  values averaged over ``--log-interval`` steps as megatron does;
* ``<save>/train_log.jsonl`` (one record per console line);
* TensorBoard (``--tensorboard-dir``, every ``--tensorboard-log-interval`` steps);
* Weights & Biases (``--wandb-project``; an optional package imported only then; ``WANDB_MODE=offline`` and
  ``--wandb-save-dir`` are honoured), the same scalars as TensorBoard plus the resolved config.

Per-rank numbers are gathered (one all-gather of a few floats over the world group) at each log step: peak
allocated/reserved device memory and RSS, and the rank-local busy time (data loading + frozen encoders +
denoiser forward, measured inside ``forward_step``; the synchronous step time itself is the same on every
rank). The slow-rank report names the rank whose busy time over the interval is furthest above the median.
At the end ``<save>/run_summary.json`` and ``run_summary.md`` say how the run went and how it ended.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mm.ops.memory import peak_memory
from mm.training.metrics import mfu

logger = logging.getLogger("mm.train")

MEMORY_KEYS = ("peak_allocated_gib", "peak_reserved_gib", "rss_gib")
ACTIONS = ("update", "clip", "skip")


@dataclass(frozen=True)
class LogConfig:
    """Where the scalars go besides the console: TensorBoard and (optionally) W&B."""

    tensorboard_dir: str | None = None  # default <save>/tensorboard
    tensorboard_log_interval: int = 1
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None  # default <save> (W&B adds its wandb/ folder)

    def problems(self) -> list[str]:
        out = []
        if self.tensorboard_log_interval < 1:
            out.append(f"--tensorboard-log-interval {self.tensorboard_log_interval}: must be >= 1")
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            out.append(f"--wandb-project {self.wandb_project}: the wandb package is not installed "
                       "(pip install wandb; offline clusters: WANDB_MODE=offline)")
        if (self.wandb_exp_name or self.wandb_save_dir) and self.wandb_project is None:
            out.append("--wandb-exp-name / --wandb-save-dir need --wandb-project")
        return out


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging (TensorBoard, Weights & Biases)")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard directory (default: <save>/tensorboard)")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, help="steps between TensorBoard/W&B points")
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases (needs the wandb package; "
                                                         "WANDB_MODE=offline writes the run to disk only)")
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    g.add_argument("--wandb-save-dir", default=None, help="W&B run directory (default: --save)")


def log_config_from_args(args: argparse.Namespace) -> LogConfig:
    return LogConfig(args.tensorboard_dir, args.tensorboard_log_interval, args.wandb_project, args.wandb_exp_name,
                     args.wandb_save_dir)


@dataclass
class Window:
    """Steps since a sink last wrote: megatron's averaging over the logging interval."""

    steps: int = 0
    loss: float = 0.0
    nan_losses: int = 0
    step_s: float = 0.0
    busy_s: float = 0.0
    data_wait_s: float = 0.0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))

    def add(self, loss: float, action: str, step_s: float, busy_s: float, data_wait_s: float) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.loss += loss
        else:
            self.nan_losses += 1
        self.step_s += step_s
        self.busy_s += busy_s
        self.data_wait_s += data_wait_s
        self.actions[action] += 1


def _fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class RunLog:
    """The run's numbers (per step, per interval, per rank, whole run) and its sinks (rank 0 writes)."""

    def __init__(self, cfg: LogConfig, *, rank: int, world_size: int, device: torch.device, save: str | None,
                 train_iters: int, log_interval: int, global_batch_size: int, config: dict):
        self.cfg, self.rank, self.world, self.device, self.save = cfg, rank, world_size, device, save
        self.train_iters, self.log_interval, self.gbs = train_iters, log_interval, global_batch_size
        self.console, self.dashboard = Window(), Window()
        self.seconds = {"training": 0.0, "checkpoint_save": 0.0, "checkpoint_load": 0.0, "data_wait": 0.0}
        self.step_times: list[float] = []
        self.checkpoints: list[int] = []
        self.ranks: list[dict] | None = None  # the last gathered per-rank numbers
        self.last: dict[str, float] = {}
        self.first_iteration: int | None = None
        self.started = time.time()
        self.tb = self.wandb = None
        if rank != 0:
            return
        tb_dir = cfg.tensorboard_dir or (os.path.join(save, "tensorboard") if save else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tb_dir)
        if cfg.wandb_project:
            import wandb  # optional: LogConfig.problems() reported its absence before anything was built

            wandb_dir = cfg.wandb_save_dir or save or os.getcwd()
            os.makedirs(wandb_dir, exist_ok=True)
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=wandb_dir,
                                    config=config)

    @contextlib.contextmanager
    def timed(self, what: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[what] += time.time() - t0

    # ------------------------------------------------------------------------------------ per step
    def step(self, iteration: int, loss: float, action: str, step_s: float, busy_s: float,
             data_wait_s: float) -> None:
        if self.first_iteration is None:
            self.first_iteration = iteration - 1
        self.step_times.append(step_s)
        self.seconds["training"] += step_s
        self.seconds["data_wait"] += data_wait_s
        for w in (self.console, self.dashboard):
            w.add(loss, action, step_s, busy_s, data_wait_s)

    def due(self, iteration: int) -> bool:
        """Whether a sink writes at this iteration (the same answer on every rank: ``log`` is collective)."""
        return (iteration % self.log_interval == 0 or iteration % self.cfg.tensorboard_log_interval == 0
                or iteration == self.train_iters)

    def gather_ranks(self, busy_s_per_step: float) -> list[dict]:
        """Every rank's memory and busy time (all-gather over the world group; every rank calls it)."""
        mine = peak_memory(self.device)
        local = torch.tensor([busy_s_per_step] + [mine[k] for k in MEMORY_KEYS], dtype=torch.float64,
                             device=self.device)
        rows = [local]
        if dist.is_initialized():
            rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, local)
        self.ranks = [dict(zip(("busy_s",) + MEMORY_KEYS, r.tolist())) for r in rows]
        return self.ranks

    # ------------------------------------------------------------------------------------ the one decision
    def scalars(self, w: Window, ranks: list[dict], *, lr: float, grad_norm: float, clip_threshold: float,
                skipped_total: int, consumed: int, bad: dict[str, int], rollbacks: int, flops_per_step: float,
                peak_tflops: float | None) -> dict[str, float]:
        """Everything a sink may show for the steps of ``w``: the one place that decides what is logged."""
        step_s = w.step_s / w.steps
        tflops = flops_per_step / step_s / self.world / 1e12
        utilisation = mfu(flops_per_step, step_s, self.world, peak_tflops)
        out = {
            "train/loss": w.loss / (w.steps - w.nan_losses) if w.steps > w.nan_losses else math.nan,
            "train/lr": lr, "train/grad_norm": grad_norm, "train/clip_threshold": clip_threshold,
            "train/skipped_steps": float(skipped_total), "train/rollbacks": float(rollbacks),
            "train/consumed_samples": float(consumed), "train/step_time_s": step_s,
            "train/data_wait_s": w.data_wait_s / w.steps, "train/samples_per_s": self.gbs / step_s,
            "train/tflops_per_device": tflops,
            "train/mfu": utilisation if utilisation is not None else math.nan,
        }
        out.update({f"train/steps_{a}": float(n) for a, n in w.actions.items()})
        out["data/bad_samples"] = float(sum(bad.values()))
        out.update({f"data/bad_samples/{r}": float(n) for r, n in sorted(bad.items())})
        busy = [r["busy_s"] for r in ranks]
        median = statistics.median(busy)
        slow = max(range(len(busy)), key=lambda i: busy[i] - median)
        out.update({"ranks/busy_s_median": median, "ranks/slow_rank": float(slow),
                    "ranks/slow_rank_excess": busy[slow] / median - 1 if median > 0 else 0.0})
        for k in MEMORY_KEYS:
            vals = [r[k] for r in ranks]
            if all(math.isfinite(v) for v in vals):
                out[f"memory/{k}_min"], out[f"memory/{k}_max"] = min(vals), max(vals)
                out.update({f"memory/rank{i}/{k}": v for i, v in enumerate(vals)})
        out.update({f"ranks/rank{i}/busy_s": b for i, b in enumerate(busy)})
        return out

    def line(self, iteration: int, s: dict[str, float], w: Window, bad_text: str) -> str:
        """megatron's iteration line (its fields, names and order), then ours."""
        mem = [f"{k.removesuffix('_gib').replace('_', ' ')} {s[f'memory/{k}_min']:.2f}/{s[f'memory/{k}_max']:.2f}"
               for k in MEMORY_KEYS if f"memory/{k}_min" in s]
        mfu = f"{100 * s['train/mfu']:.1f}%" if math.isfinite(s["train/mfu"]) else "n/a"
        return (f"iteration {iteration:8d}/{self.train_iters:8d} |"
                f" consumed samples: {int(s['train/consumed_samples']):12d} |"
                f" elapsed time per iteration (ms): {1000 * s['train/step_time_s']:.1f} |"
                f" learning rate: {s['train/lr']:.6E} |"
                f" global batch size: {self.gbs:5d} |"
                f" lm loss: {s['train/loss']:.6E} |"
                f" grad norm: {s['train/grad_norm']:.3f} |"
                f" number of skipped iterations: {w.actions['skip']:3d} |"
                f" TFLOP/s/device: {s['train/tflops_per_device']:.3g} | MFU: {mfu} |"
                f" samples/s: {s['train/samples_per_s']:.2f} |"
                f" ETA: {_fmt_duration((self.train_iters - iteration) * s['train/step_time_s'])} |"
                f" clip threshold: {s['train/clip_threshold']:.4f} |"
                f" steps update/clip/skip: {w.actions['update']}/{w.actions['clip']}/{w.actions['skip']} |"
                f" skipped total: {int(s['train/skipped_steps'])} | rollbacks: {int(s['train/rollbacks'])} |"
                f" bad samples: {bad_text} |"
                f" data wait (ms): {1000 * s['train/data_wait_s']:.1f} |"
                f" memory GiB min/max over ranks: {', '.join(mem)} |"
                f" slowest rank: {int(s['ranks/slow_rank'])} (+{100 * s['ranks/slow_rank_excess']:.0f}% busy vs"
                f" median {1000 * s['ranks/busy_s_median']:.1f} ms) |")

    def log(self, iteration: int, *, action: str, bad: dict[str, int], bad_text: str, **numbers) -> None:
        """At a ``due`` iteration, on every rank: gather the ranks, decide the scalars, write the due sinks."""
        console_due = iteration % self.log_interval == 0 or iteration == self.train_iters
        dash_due = iteration % self.cfg.tensorboard_log_interval == 0 or iteration == self.train_iters
        w_for_ranks = self.console if console_due else self.dashboard
        ranks = self.gather_ranks(w_for_ranks.busy_s / max(w_for_ranks.steps, 1))
        if console_due:
            s = self.scalars(self.console, ranks, bad=bad, **numbers)
            self.last = s
            if self.rank == 0:
                logger.info(self.line(iteration, s, self.console, bad_text), extra={"parseable": True})
                if self.save:
                    os.makedirs(self.save, exist_ok=True)
                    record = {"iteration": iteration, "action": action, "bad_samples": bad}
                    record.update({k.removeprefix("train/"): v for k, v in s.items() if not k.startswith("data/")})
                    record["step_time"] = s["train/step_time_s"]
                    record["skipped"] = int(s["train/skipped_steps"])
                    record["rollbacks"] = int(s["train/rollbacks"])
                    with open(os.path.join(self.save, "train_log.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")  # NaN as before: a NaN loss is kept visible
            self.console = Window()
        if dash_due:
            s = self.scalars(self.dashboard, ranks, bad=bad, **numbers)
            finite = {k: v for k, v in s.items() if math.isfinite(v)}
            if self.tb is not None:
                for k, v in finite.items():
                    self.tb.add_scalar(k, v, iteration)
            if self.wandb is not None:
                self.wandb.log(finite, step=iteration)
            self.dashboard = Window()

    # ------------------------------------------------------------------------------------ the end
    def summary(self, *, iteration: int, ended: str, reason: str | None, skipped: int, rollbacks: int,
                bad: dict[str, int], flops_per_step: float | None, peak_tflops: float | None) -> dict:
        """The end-of-run report (rank 0 writes ``<save>/run_summary.json`` and ``.md``); no collective, so a
        fault can still write it (per-rank memory: the last gathered numbers)."""
        times = sorted(self.step_times)

        def pct(q: float) -> float | None:
            return times[min(len(times) - 1, int(q * len(times)))] if times else None

        mean = sum(times) / len(times) if times else None
        tflops = flops_per_step / mean / self.world / 1e12 if mean and flops_per_step else None
        wall = time.time() - self.started
        report = {
            "ended": ended, "reason": reason,
            "iterations": {"first": self.first_iteration, "last": iteration, "of": self.train_iters,
                           "this_run": len(times)},
            "wall_time_s": {"total": wall, **self.seconds,
                            "evaluation": None,  # the trainer has no evaluation loop (--eval-interval is inert)
                            "other": wall - sum(self.seconds.values()) + self.seconds["data_wait"]},
            "step_time_s": {"mean": mean, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                            "max": times[-1] if times else None},
            "samples_per_s": self.gbs / mean if mean else None,
            "tflops_per_device": tflops,
            "mfu": mfu(flops_per_step, mean, self.world, peak_tflops) if mean and flops_per_step else None,
            "skipped_steps": skipped, "rollbacks": rollbacks, "bad_samples": bad,
            "peak_memory_gib_per_rank": [{k: (v if math.isfinite(v) else None) for k, v in r.items()
                                          if k in MEMORY_KEYS} for r in (self.ranks or [])],
            "checkpoints_written": self.checkpoints,
        }
        # "other" = wall time outside steps, saves and loads (start-up, logging); data waits are inside steps
        if self.rank == 0 and self.save:
            os.makedirs(self.save, exist_ok=True)
            with open(os.path.join(self.save, "run_summary.json"), "w") as f:
                json.dump(report, f, indent=2)
            with open(os.path.join(self.save, "run_summary.md"), "w") as f:
                f.write(_markdown(report))
        return report

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _markdown(r: dict) -> str:
    it, t, st = r["iterations"], r["wall_time_s"], r["step_time_s"]
    lines = [
        "# Run summary", "",
        f"- ended: **{r['ended']}**" + (f" ({r['reason']})" if r["reason"] else ""),
        f"- iterations: {it['first']} -> {it['last']} of {it['of']} ({it['this_run']} in this run)",
        f"- wall time: {_num(t['total'], '.1f')} s = training {_num(t['training'], '.1f')} s (of which data "
        f"waits {_num(t['data_wait'], '.1f')} s) + checkpoint save {_num(t['checkpoint_save'], '.1f')} s + "
        f"load {_num(t['checkpoint_load'], '.1f')} s + other {_num(t['other'], '.1f')} s; evaluation: none "
        "(no evaluation loop)",
        f"- step time (s): mean {_num(st['mean'])}, p50 {_num(st['p50'])}, p90 {_num(st['p90'])}, "
        f"p99 {_num(st['p99'])}, max {_num(st['max'])}",
        f"- throughput: {_num(r['samples_per_s'], '.2f')} samples/s, {_num(r['tflops_per_device'], '.3g')} "
        f"TFLOP/s/device, MFU " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"),
        f"- skipped steps: {r['skipped_steps']}; loss-spike rollbacks: {r['rollbacks']}",
        "- bad samples: " + (", ".join(f"{k} {v}" for k, v in sorted(r["bad_samples"].items())) or "none"),
        f"- checkpoints written: {', '.join(map(str, r['checkpoints_written'])) or 'none'}", "",
    ]
    return "\n".join(lines + _memory_table(r["peak_memory_gib_per_rank"])) + "\n"


def _memory_table(per_rank: list[dict]) -> list[str]:
    return ["| rank | peak allocated GiB | peak reserved GiB | RSS GiB |", "| --- | --- | --- | --- |"] + [
        f"| {i} | {_num(m['peak_allocated_gib'], '.2f')} | {_num(m['peak_reserved_gib'], '.2f')} | "
        f"{_num(m['rss_gib'], '.2f')} |" for i, m in enumerate(per_rank)]


def write_inference_summary(save: str, *, prompts: int, generated: list[int], skipped: list[int], writer: bool,
                            seconds: float, denoise_seconds: float, steps: int, batches: int,
                            device: torch.device) -> dict | None:
    """``<save>/logs/inference_summary.json`` / ``.md`` of a batch inference run, written by global rank 0 (a
    subfolder: the sample folder holds only media and their sidecars). Collective over the world group: every
    rank's counts, timings and peak memory are gathered. ``seconds``: this rank's generation loop (text
    encoding, denoising, decoding, writing); ``denoise_seconds``: up to the last denoising step of each batch."""
    mine = {"writer": writer, "generated": len(generated), "skipped": len(skipped), "seconds": seconds,
            "denoise_seconds": denoise_seconds, "steps": steps * batches, **peak_memory(device)}
    rows = [mine]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
        if dist.get_rank() != 0:
            return None
    replicas = [r for r in rows if r["writer"]]  # one writer per replica: its counts are the replica's
    working = [r for r in replicas if r["generated"]]
    report = {
        "prompts": prompts, "generated": sum(r["generated"] for r in replicas),
        "skipped_already_complete": sum(r["skipped"] for r in replicas), "replicas": len(replicas),
        "seconds_per_sample": (statistics.mean(r["seconds"] / r["generated"] for r in working) if working else None),
        "seconds_per_denoising_step": (statistics.mean(r["denoise_seconds"] / r["steps"] for r in working)
                                       if working else None),
        "generation_wall_s": max(r["seconds"] for r in rows),
        "peak_memory_gib_per_rank": [{k: (r[k] if math.isfinite(r[k]) else None) for k in MEMORY_KEYS}
                                     for r in rows],
    }
    folder = os.path.join(save, "logs")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "inference_summary.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# Inference summary", "",
             f"- prompts: {prompts}; generated {report['generated']}, skipped (already complete) "
             f"{report['skipped_already_complete']}, over {report['replicas']} replica(s)",
             f"- seconds per sample: {_num(report['seconds_per_sample'])} (text encoding, denoising, decoding, "
             f"writing); per denoising step: {_num(report['seconds_per_denoising_step'])}",
             f"- generation wall time: {report['generation_wall_s']:.1f} s", ""]
    lines += _memory_table(report["peak_memory_gib_per_rank"])
    with open(os.path.join(folder, "inference_summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report
