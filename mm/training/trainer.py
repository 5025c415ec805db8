"""The training loop on megatron-core components (spec §7): our loop, megatron's pieces.

megatron provides the parallel state, DDP (fp32 grad buffers), the (distributed, ZeRO-1) optimizer,
the micro-batch schedule (``get_forward_backward_func``) and the LR scheduler; this module composes
them with the frozen encoders, flow matching, EMA-AdamW, adaptive clipping, recompute, encoder-DP,
atomic checkpoints and logging.

One optimizer step: ``num_microbatches`` forward/backward passes (megatron schedule; grads accumulate
in DDP buffers and are reduced by ``finalize_model_grads``) -> ``prepare_grads`` -> global grad norm ->
adaptive clipping decision (update / clip / skip) -> inner EMA-AdamW step -> LR step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator

import psutil
import torch
import torch.distributed as dist

from mm.builders import build_suv, build_text_encoders, build_vae
from mm.config import ConfigErrors, RunConfig
from mm.config_upstream import ModelSpec
from mm.data.config import DataConfig
from mm.diffusion.flow_matching import dynamic_shift, flow_matching_loss, q_sample, velocity_target
from mm.distributed.encoder_dp import EncoderDPFeatures
from mm.models.conditioning import training_channels
from mm.distributed.init import ParallelState, init_parallel
from mm.distributed import pipeline
from mm.distributed.parallelize import apply_recompute, wrap_ddp_chunks
from mm.ops import current_backend
from mm.training import checkpointing as ckpt
from mm.training.clipping import AdaptiveGradClipper, TooManyBadSteps
from mm.training.ema_adamw import ema_model_state_dict, fuse_inner_optimizers, make_ema_optimizer
from mm.training.frozen import Features, FrozenEncoders
from mm.training.metrics import PEAK_TFLOPS, SUVShape, peak_tflops_for, train_flops
from mm.training.observability import LogConfig, RunLog
from mm.training.spikes import SpikeDetector
from mm.training.watchdog import ProgressWatchdog, StopRequests, signal_name

logger = logging.getLogger("mm.train")


@dataclass
class StepResult:
    iteration: int
    loss: float
    grad_norm: float
    action: str
    lr: float
    step_time: float


def _count_text(counts: dict[str, int]) -> str:
    """``3 (corrupt_video 2, missing_file 1)``, or ``0``."""
    total = sum(counts.values())
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")" if total else "0"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    """Builds everything from (model spec, data config, run config) and trains."""

    def __init__(self, spec: ModelSpec, data_cfg: DataConfig, run: RunConfig, *, log_config: LogConfig | None = None,
                 peak_tflops: float | None = None, data_num_workers: int | None = None,
                 data_index: str | None = None):
        # the feature-cache switches may be set in the model JSON (upstream) or the data JSON: either one counts
        video_cache = spec.load_video_features or data_cfg.load_video_features
        text_cache = spec.load_text_features or data_cfg.load_text_features
        spec = dataclasses.replace(spec, load_video_features=video_cache, load_text_features=text_cache)
        data_cfg = data_cfg.replace(load_video_features=video_cache, load_text_features=text_cache)
        self.spec, self.data_cfg, self.run = spec, data_cfg, run
        t0 = time.time()
        ck = run.checkpoint
        problems = ckpt.resume_problems(ck.load, ck.save, run.optimizer.use_distributed_optimizer,
                                        ck.load_optim and not ck.finetune)
        if problems:  # before anything is built
            raise ConfigErrors(problems)
        self.ps: ParallelState = init_parallel(run.parallel, run.backend.name)
        self.backend = current_backend()
        self.device = self.ps.device  # models, features, generators and collectives of this rank live here
        tr = run.training
        self.param_dtype = torch.bfloat16 if tr.bf16 else torch.float32
        self.num_microbatches = tr.num_microbatches(self.ps.dp_size)
        pp_problems = pipeline.pipeline_problems(spec.suv_config(), run.parallel, self.num_microbatches)
        if pp_problems:
            raise ConfigErrors(pp_problems)
        self.group_size = self.ps.tp_size * self.ps.cp_size
        if run.parallel.encoder_data_parallel and self.num_microbatches % self.group_size:
            raise ValueError(f"encoder data parallelism needs num_microbatches ({self.num_microbatches}) divisible "
                             f"by the TP x CP group size ({self.group_size}) so that rounds end on step boundaries")
        self._seed(tr.seed)

        # frozen pre-stages, each in its own dtype
        vae = None if spec.load_video_features else build_vae(spec, device=self.device)
        t5 = clip = None
        if not spec.load_text_features:
            t5, clip = build_text_encoders(spec, device=self.device)
        # posterior samples: identical on the ranks of a TP/CP group (they encode the same sample); drawn on
        # the VAE's device. Flow-matching noise stays on a CPU generator (as upstream), moved to the device.
        self.vae_generator = torch.Generator(device=self.device).manual_seed(tr.seed + 7919 * self.ps.dp_rank)
        self.encoders = FrozenEncoders(vae, t5, clip, generator=self.vae_generator, device=self.device)

        # the denoiser: TP layout from the parallel state, recompute, DDP, optimizer with EMA
        ckpt_path = spec.predictor_checkpoint if spec.predictor_checkpoint else None
        # PP: this rank's chunks of the U (one, or one per virtual stage; cuts from the cost model or
        # --pipeline-stage-blocks). self.model: the chunk, or the chunks seen as one model (checkpoints, EMA)
        chunk_kwargs, self.pipeline_plan = pipeline.trainer_chunk_kwargs(spec.suv_config(), self.ps, run.parallel,
                                                                         data_cfg, tr.seed)
        self.chunks = [build_suv(spec, self.ps, self.param_dtype, checkpoint=ckpt_path, device=self.device, **kw)
                       for kw in chunk_kwargs]
        pipeline.configure_pipeline(self.chunks, self.ps, len(self.chunks))  # before DDP: embedder bucket tags
        for chunk in self.chunks:
            apply_recompute(chunk, tr.recompute_granularity,
                            tr.selective_recompute_ffn_layers if tr.recompute_granularity == "selective"
                            else tr.recompute_num_layers)
            chunk.train()
        self.model = self.chunks[0] if len(self.chunks) == 1 else pipeline.ChunkGroup(self.chunks)
        self.ddps = wrap_ddp_chunks(self.chunks, use_distributed_optimizer=run.optimizer.use_distributed_optimizer)
        self._drawn: dict = {}  # VPP: a micro-batch's sigma and noise until every chunk has run it
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.clipper = AdaptiveGradClipper(decay=run.optimizer.clip_grad_ema_decay,
                                           max_consecutive_bad=run.optimizer.max_consecutive_bad_steps)
        self.adaptive_clip = run.optimizer.clip_grad > 0
        # --rollback-on-spike: reload the last checkpoint and skip the batch when the loss spikes
        self.spikes = SpikeDetector(tr.rollback_on_spike) if tr.rollback_on_spike else None
        self.rollbacks = 0
        self._skip_batches: dict[int, int] = {}  # iteration -> global batches to drop before it (rolled back)

        # data: sharded over DP ranks, or with encoder-DP over DP x TP x CP (group rank tp + TP * cp, megatron's
        # order; the world rank at PP = 1): every pipeline stage reads the same samples and shares its own features
        from mm.data.loader import build_dataloader

        enc_dp = run.parallel.encoder_data_parallel
        rank, replicas = ((self.ps.dp_rank * self.group_size + self.ps.cp_rank * self.ps.tp_size + self.ps.tp_rank,
                           self.ps.dp_size * self.group_size) if enc_dp else (self.ps.dp_rank, self.ps.dp_size))
        self.loader = build_dataloader(data_cfg, rank=rank, num_replicas=replicas,
                                       global_batch_size=tr.global_batch_size, num_workers=data_num_workers,
                                       index_dir=data_index)
        self.noise_generator = torch.Generator().manual_seed(tr.seed + 104729 * self.ps.dp_rank)
        # I2V (mm.models.conditioning): the per-sample mode draw, like the noise one stream per DP rank so the
        # TP/CP/PP ranks of a sample agree; its own stream keeps the noise of T2V runs unchanged
        self.conditioning = spec.suv_config().conditioning
        self.i2v_generator = torch.Generator().manual_seed(tr.seed + 7919 + 104729 * self.ps.dp_rank)
        self.iteration = 0
        self.samples_seen = 0
        # the run's numbers and their sinks (console line, train_log.jsonl, TensorBoard, W&B, run summary)
        self.obs = RunLog(log_config or LogConfig(), rank=self.ps.rank, world_size=self.ps.world_size,
                          device=self.device, save=ck.save, train_iters=tr.train_iters, log_interval=tr.log_interval,
                          global_batch_size=tr.global_batch_size,
                          config=json.loads(json.dumps({"run": dataclasses.asdict(run),
                                                        "model": dataclasses.asdict(spec),
                                                        "data": dataclasses.asdict(data_cfg)}, default=str)))
        self._busy = self._data_wait = 0.0  # this rank's seconds in forward_step / waiting for data, this step
        if ck.load and ckpt.candidate_iterations(ck.load):
            self._load(ck.load)
        elif ck.load:  # resume_problems allowed it: --load = --save, the first start of a self-resuming run
            logger.info("--load %s (= --save) has no checkpoint yet: starting at iteration 0", ck.load)

        self.peak_tflops = peak_tflops if peak_tflops is not None else self._known_peak_tflops()
        self.history: list[StepResult] = []
        self.watchdog: ProgressWatchdog | None = None  # armed inside train()
        self._bad_before: dict[str, int] = {}  # bad samples counted before a resume
        self.stop_reason: str | None = None  # why train() returned before train_iters (signal, exit flags)
        self._summary(time.time() - t0)

    # ------------------------------------------------------------------------------------ building
    def _seed(self, seed: int) -> None:
        from megatron.core import tensor_parallel

        # identical init on every DP replica; TP shards from megatron's per-TP-rank stream
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.run.optimizer
        cfg = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=0.0,  # clipping is ours (adaptive)
            bf16=self.run.training.bf16, params_dtype=self.param_dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        )
        optimizer = make_ema_optimizer(get_megatron_optimizer(cfg, self.ddps), o.ema_decay)
        self.optimizer_kind = fuse_inner_optimizers(optimizer, self.device)
        return optimizer

    def _known_peak_tflops(self) -> float | None:
        """Peak bf16 TFLOP/s of this device from the table of known accelerators (None: MFU n/a, said once)."""
        if self.backend.device_type == "cpu":
            return None
        name = self.backend.device_name()
        peak = peak_tflops_for(name)
        if peak is None and _is_rank0():
            logger.warning("MFU n/a: %r is not in the peak table (%s); pass --peak-tflops", name,
                           ", ".join(PEAK_TFLOPS))
        return peak

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, tr = self.run.optimizer, self.run.training
        decay = o.lr_decay_iters or tr.train_iters
        return OptimizerParamScheduler(
            self.optimizer, init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_iters, lr_decay_steps=max(decay, o.lr_warmup_iters + 1),
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(decay, 1), wd_incr_style="constant",
            # on resume the command line's schedule wins unless --use-checkpoint-opt_param-scheduler (megatron)
            use_checkpoint_opt_param_scheduler=self.run.checkpoint.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=not self.run.checkpoint.use_checkpoint_opt_param_scheduler,
        )

    # ------------------------------------------------------------------------------------ data
    def _batches(self) -> Iterator[dict]:
        while True:  # epochs: the sampler wraps to the next epoch by itself
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            if not produced:
                raise RuntimeError("the data loader produced no batch: is the dataset empty after filtering? "
                                   "Run python -m mm.data.inspect --data <data.json>")

    def _features(self) -> Iterator[Features]:
        batches = self._batches()
        if self.run.parallel.encoder_data_parallel and self.group_size > 1:
            from megatron.core import parallel_state

            return EncoderDPFeatures(batches, self.encoders,
                                     parallel_state.get_tensor_and_context_parallel_group(), self.group_size)
        return (self.encoders(b) for b in batches)

    # ------------------------------------------------------------------------------------ one step
    def _noise_once(self, feats: Features, z0: torch.Tensor):
        """Sigma and noise of a micro-batch, drawn once however many model chunks of this rank run it (VPP)."""
        drawn = self._drawn
        if id(feats) not in drawn:
            shift = dynamic_shift(z0.shape[-2], z0.shape[-1]) if self.spec.diffusion.use_dynamic_shifting else 1.0
            drawn[id(feats)] = [q_sample(z0, shift=shift, generator=self.noise_generator,
                                         sigma_min=self.spec.diffusion.sigma_eps,
                                         sync_groups=(self.ps.tp_group, self.ps.cp_group)), len(self.chunks)]
            if self.conditioning is not None:  # I2V: [masked cond latents ; mask] channels, drawn with the noise
                drawn[id(feats)].append(training_channels(z0, self.conditioning, self.i2v_generator))
        entry = drawn[id(feats)]
        entry[1] -= 1
        if entry[1] == 0:
            del drawn[id(feats)]
        return entry[0], (entry[2] if len(entry) > 2 else None)

    def forward_step(self, data_iterator, model):
        started = time.time()
        feats: Features = next(data_iterator)
        self._data_wait += time.time() - started
        z0 = feats.latents.float()
        noised, condition = self._noise_once(feats, z0)
        x_in = noised.x if condition is None else torch.cat([noised.x, condition.to(noised.x.dtype)], dim=1)
        dt = self.param_dtype
        # PP: every stage gets the same micro-batch (same sigma and noise: the noise stream is seeded per DP
        # rank); the first stage embeds it, the others take the received boundary tensor, the last one the loss
        pred = pipeline.run_chunk(model, model.module, x_in.to(dt), noised.timesteps, feats.text.to(dt),
                                  feats.text_mask, feats.pooled.to(dt), feats.video_mask)
        target = velocity_target(z0, noised.eps)
        self._micro_samples += z0.shape[0]
        self._latent_shape = tuple(z0.shape[2:])
        self._text_len = feats.text.shape[1]
        self._busy += time.time() - started  # data + frozen encoders + this forward: the rank-local work

        def loss_func(output):
            loss = flow_matching_loss(output, target, feats.video_mask)
            # megatron's schedule scales the returned loss in place (x CP size, / micro-batches): log a copy.
            # The loss is computed on the full (CP-gathered) output on every CP rank, so undo its x CP.
            return loss / self.ps.cp_size, {"loss": loss.detach().clone()}

        return pred, loss_func

    def train_step(self, features: Iterator[Features]) -> StepResult:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t0 = time.time()
        self._micro_samples = 0
        self._busy = self._data_wait = 0.0
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        feed = pipeline.MicroBatchFeed(features, len(self.chunks))  # VPP: every chunk runs every micro-batch
        seq_length = 0  # only the interleaved schedule reads it: its one boundary shape
        if len(self.chunks) > 1:
            feats = feed.peek()
            seq_length = pipeline.schedule_seq_length(self.chunks[0], feats.latents, feats.text.shape[1])
        iterators = [feed.iterator(v) for v in range(len(self.chunks))]
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.ddps, num_microbatches=self.num_microbatches, seq_length=seq_length,
            micro_batch_size=self.run.training.micro_batch_size, forward_only=False,
        )
        self._beat("the optimizer step (grad-norm all-reduce over the model-parallel group, distributed-optimizer "
                   "all-gather over DP)")
        action, grad_norm = self._optimizer_step()
        self.iteration += 1
        self.scheduler.step(increment=1)
        loss = (torch.stack([d["loss"] for d in losses]).mean() if losses
                else torch.tensor(math.nan, device=self.device))
        loss = pipeline.loss_from_last_stage(loss, self.ps)  # PP: only the last stage computed it
        if dist.is_initialized():
            self._beat("the loss all-reduce over DP")
            dist.all_reduce(loss, group=self.ps.dp_group)
            loss /= self.ps.dp_size
        samples = self._micro_samples * self.ps.dp_size // (self.group_size if self.run.parallel.encoder_data_parallel else 1)
        self.samples_seen += samples
        return StepResult(self.iteration, float(loss), grad_norm, action, self.optimizer.param_groups[0]["lr"],
                          time.time() - t0)

    def _optimizer_step(self) -> tuple[str, float]:
        opt = self.optimizer
        found_inf = opt.prepare_grads()
        grad_norm = float(opt.get_grad_norm())
        if found_inf:
            grad_norm = math.inf
        if not self.adaptive_clip:
            action = "update" if math.isfinite(grad_norm) else "skip"
        else:
            decision = self.clipper.decide(grad_norm)
            action = decision.action
            self._last_clip = decision
            if action == "clip":
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                torch._foreach_mul_(grads, decision.coef)
        if action != "skip":
            opt.step_with_ready_grads()
        else:
            logger.warning("iteration %d: grad norm %s is non-finite or extreme; update skipped (%d skipped so far)",
                           self.iteration + 1, grad_norm, self.clipper.num_skipped)
        return action, grad_norm

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> list[StepResult]:
        """Train to ``train_iters``, or until a stop request (signal, ``--exit-*``): then save and return
        with ``stop_reason`` set."""
        tr = self.run.training
        stops = StopRequests() if tr.exit_signal_handler else None
        if stops:
            stops.install()
        self.watchdog = ProgressWatchdog(60.0 * self.run.parallel.distributed_timeout_minutes, self.ps.rank)
        self.stop_reason = None
        first = self.iteration
        try:
            self._train_loop(stops)
            self._end_summary(first)
        except BaseException as e:  # no collective from here: the other ranks may be gone
            self._run_summary("fault", f"{type(e).__name__}: {e}", getattr(self, "_last_bad", self._bad_before))
            raise
        finally:
            self.watchdog.close()
            self.watchdog = None
            if stops:
                stops.restore()
        reason = self.stop_reason
        ended = "finished" if reason is None else "preempted" if reason.startswith("received SIG") else "stopped"
        self._run_summary(ended, reason, self._bad_samples())
        return self.history

    def _run_summary(self, ended: str, reason: str | None, bad: dict[str, int]) -> None:
        """``<save>/run_summary.json`` / ``.md`` (rank 0): how the run went and how it ended."""
        self.obs.summary(iteration=self.iteration, ended=ended, reason=reason, skipped=self.clipper.num_skipped,
                         rollbacks=self.rollbacks, bad=bad, flops_per_step=self._flops_per_step(),
                         peak_tflops=self.peak_tflops)
        if self.obs.tb:
            self.obs.tb.flush()

    def _train_loop(self, stops: StopRequests | None) -> None:
        tr, ck = self.run.training, self.run.checkpoint
        self._feature_iter = self._features()
        if self.spikes is not None and not ckpt.candidate_iterations(ck.save):
            self.save()  # a state to roll back to before the first cadence save
        started = time.time()
        while self.iteration < tr.train_iters:
            self._beat("the training step (data loading, forward/backward, DDP gradient reduce over DP)")
            for _ in range(self._skip_batches.get(self.iteration + 1, 0) * self.num_microbatches):
                next(self._feature_iter)  # the batch that spiked here before a rollback
            try:
                res = self.train_step(self._feature_iter)
            except TooManyBadSteps:
                if ck.save:  # the skipped updates left the last good state: keep it for a resume
                    self.save()
                raise
            if self._spiked(res):
                self._rollback(res)
                continue
            self.history.append(res)
            self.obs.step(res.iteration, res.loss, res.action, res.step_time, self._busy, self._data_wait)
            if self.obs.due(res.iteration):
                self._log(res)
            saved = bool(ck.save and (res.iteration % ck.save_interval == 0 or res.iteration == tr.train_iters))
            if saved:
                self.save()
            self.stop_reason = self._stop_requested(stops, started)
            if self.stop_reason:
                if ck.save and not saved:
                    self.save()
                if _is_rank0():
                    logger.info("stopping at iteration %d: %s; %s", self.iteration, self.stop_reason,
                                f"checkpoint in {ck.save}: rerun the same command with --load {ck.save} to resume"
                                if ck.save else "no --save given: nothing was saved")
                return

    def _spiked(self, res: StepResult) -> bool:
        if self.spikes is None:
            return False
        flag = torch.tensor([float(self.spikes.is_spike(res.loss))], device=self.device)
        if dist.is_initialized():  # every rank takes the same decision
            self._beat("the loss-spike all-reduce over all ranks")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return True
        self.spikes.accept(res.loss)
        return False

    def _rollback(self, res: StepResult) -> None:
        """Reload the last checkpoint and mark the batch of ``res.iteration`` to be dropped on the way back."""
        k, ck = res.iteration, self.run.checkpoint
        self._skip_batches[k] = self._skip_batches.get(k, 0) + 1
        self.rollbacks += 1
        if self._skip_batches[k] > self.run.optimizer.max_consecutive_bad_steps:
            raise TooManyBadSteps(f"iteration {k}: the loss spiked again after {self._skip_batches[k] - 1} rollbacks "
                                  f"(each dropping one more batch); the run diverges: lower the LR or inspect the "
                                  f"data around iteration {k}")
        if _is_rank0():
            logger.warning("iteration %d: loss %.5f > %g x running mean %.5f: rolling back to the last checkpoint "
                           "in %s and skipping this batch (rollback %d)", k, res.loss, self.spikes.factor,
                           self.spikes.mean, ck.save, self.rollbacks)
        self._beat("the rollback checkpoint load")
        self._load(ck.save, rollback=True)
        self._feature_iter = self._features()  # from the restored sampler position

    def _beat(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(phase, self.iteration + 1)

    def _stop_requested(self, stops: StopRequests | None, started: float) -> str | None:
        """Why to stop at this step boundary (the same answer on every rank), or None."""
        tr = self.run.training
        if tr.exit_interval and self.iteration % tr.exit_interval == 0 and self.iteration < tr.train_iters:
            return f"--exit-interval {tr.exit_interval} reached"
        if stops is None and tr.exit_duration_in_mins is None:
            return None
        over = tr.exit_duration_in_mins is not None and time.time() - started > 60.0 * tr.exit_duration_in_mins
        flags = torch.tensor([float(stops.received or 0) if stops else 0.0, float(over)], device=self.device)
        if dist.is_initialized():  # one rank's signal or clock stops every rank at the same step
            self._beat("the stop-request all-reduce over all ranks")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return f"received {signal_name(int(flags[0]))}"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {tr.exit_duration_in_mins:g} reached"
        return None

    def _flops_per_step(self) -> float | None:
        """Model FLOPs of one optimizer step (None before the first micro-batch fixed the shapes)."""
        if not hasattr(self, "_latent_shape"):
            return None
        shape = self.model.suv_config
        return train_flops(SUVShape(tuple(shape.num_layers), tuple(shape.effective_sparse_n()), shape.hidden_size,
                                    shape.timestep_embed_dim, shape.patch_size, shape.patch_size_t),
                           self._latent_shape, self._text_len, self.run.training.global_batch_size)

    def _log(self, res: StepResult) -> None:
        """Collective (bad-sample counts, per-rank memory): every rank calls it at the same iterations."""
        bad = self._bad_samples()
        self._last_bad = bad
        thr = getattr(getattr(self, "_last_clip", None), "threshold", math.nan)
        self.obs.log(res.iteration, action=res.action, bad=bad, bad_text=_count_text(bad), lr=res.lr,
                     grad_norm=res.grad_norm, clip_threshold=thr, skipped_total=self.clipper.num_skipped,
                     consumed=self.samples_seen, rollbacks=self.rollbacks, flops_per_step=self._flops_per_step(),
                     peak_tflops=self.peak_tflops)

    def _bad_samples(self) -> dict[str, int]:
        """Bad samples replaced so far, per reason: each counted once per data shard, over all shards, including
        those met before a resume (a collective over the ranks that read different samples)."""
        from mm.data.errors import REASONS

        mine = getattr(self.loader, "skips_this_run", {})
        assert set(mine) <= set(REASONS), f"unknown bad-sample reasons {set(mine) - set(REASONS)}"
        counts = torch.tensor([float(mine.get(r, 0)) for r in REASONS], device=self.device)
        if dist.is_initialized():  # encoder-DP: every rank of a stage reads its own samples (each pipeline stage
            self._beat("the bad-sample count all-reduce")  # the same ones); else one reader per DP rank
            if self.run.parallel.encoder_data_parallel:
                dist.all_reduce(counts)
                counts /= self.ps.pp_size
            else:
                dist.all_reduce(counts, group=self.ps.dp_group)
        total = dict(self._bad_before)
        for reason, n in zip(REASONS, counts.tolist()):
            if n:
                total[reason] = total.get(reason, 0) + int(n)
        return total

    def _end_summary(self, first_iteration: int) -> None:
        """One end-of-run summary on rank 0: iterations, skipped steps, bad data by reason with examples."""
        bad = self._bad_samples()
        examples = [None] * self.ps.world_size if dist.is_initialized() else None
        mine = dict(getattr(self.loader, "skip_examples", {}))
        if dist.is_initialized():
            dist.all_gather_object(examples, mine)
        else:
            examples = [mine]
        if not _is_rank0():
            return
        seen: dict[str, str] = {}
        for ex in examples:
            for reason, path in ex.items():
                seen.setdefault(reason, path)
        lines = [f"iterations {first_iteration} -> {self.iteration} of {self.run.training.train_iters}"
                 + (f" (stopped: {self.stop_reason})" if self.stop_reason else ""),
                 f"optimizer steps skipped (non-finite or extreme grad norm): {self.clipper.num_skipped}",
                 f"loss-spike rollbacks: {self.rollbacks}" + ("" if self.spikes else " (--rollback-on-spike off)"),
                 f"bad samples replaced: {_count_text(bad)}"]
        lines += [f"  {reason}: e.g. {path}" for reason, path in sorted(seen.items())]
        logger.info("run summary\n  " + "\n  ".join(lines))
        if self.obs.tb:
            self.obs.tb.add_text("run_summary", "\n".join(lines), self.iteration)

    def _summary(self, build_seconds: float) -> None:
        # TP-split parameters exist tp_size times over the group; replicated ones once
        n_total = sum(p.numel() * (self.ps.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
                      for p in self.model.parameters())
        n_local = sum(p.numel() for p in self.model.parameters())
        frozen = sum(sum(p.numel() for p in m.parameters())
                     for m in (self.encoders.vae, self.encoders.t5, self.encoders.clip) if m is not None)
        if not _is_rank0():
            return
        lines = [
            f"backend: {self.backend.name} (dist {self.backend.dist_backend})",
            "kernels: " + ", ".join(f"{k}={v}" for k, v in self.backend.kernel_table().items()),
            f"parallel: world {self.ps.world_size} = TP {self.ps.tp_size} x PP {self.ps.pp_size} x CP "
            f"{self.ps.cp_size} x DP {self.ps.dp_size}; sequence parallel {self.ps.sequence_parallel}; "
            f"encoder-DP {self.run.parallel.encoder_data_parallel}",
            f"batch: micro {self.run.training.micro_batch_size} x DP {self.ps.dp_size} x {self.num_microbatches} "
            f"micro-batches = global {self.run.training.global_batch_size}",
            f"SUV params: {n_total:,} ({n_local:,} on this rank); frozen encoders {frozen:,}; "
            f"dtype {self.param_dtype}",
            f"optimizer: {'distributed ' if self.run.optimizer.use_distributed_optimizer else ''}"
            f"{self.optimizer_kind} "
            f"lr {self.run.optimizer.lr} ({self.run.optimizer.lr_decay_style}), adaptive clipping "
            f"{'on' if self.adaptive_clip else 'off'}, recompute {self.run.training.recompute_granularity}",
            f"memory: RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB; built in {build_seconds:.1f}s; "
            f"starting at iteration {self.iteration}",
        ]
        logger.info("start-up summary\n  " + "\n  ".join(lines))
        if self.pipeline_plan:  # PP: each stage's blocks, received skips and estimated cost
            logger.info(self.pipeline_plan)

    # ------------------------------------------------------------------------------------ checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        return {"noise": self.noise_generator, "vae": self.vae_generator, "i2v": self.i2v_generator}

    def _common_state(self) -> dict:
        from mm.data.loader import merge_sampler_states

        states = [None] * self.ps.world_size if dist.is_initialized() else None
        local = self.loader.state_dict()
        if dist.is_initialized():
            dist.all_gather_object(states, local)
            sampler = merge_sampler_states(states)
        else:
            sampler = local
        return {
            "iteration": self.iteration,
            "samples_seen": self.samples_seen,
            "scheduler": self.scheduler.state_dict(),
            "clipper": self.clipper.state_dict(),
            "sampler": sampler,
            "bad_samples": self._bad_samples(),
            "spikes": self.spikes.state_dict() if self.spikes else None,
            "rollbacks": self.rollbacks,
            "config": json.loads(json.dumps(dataclasses.asdict(self.run), default=str)),
        }

    def save(self) -> None:
        ck = self.run.checkpoint
        ema = ema_model_state_dict(self.optimizer, self.model)
        meta = {"iteration": self.iteration, "use_distributed_optimizer": self.run.optimizer.use_distributed_optimizer,
                "world_size": self.ps.world_size}
        with self.obs.timed("checkpoint_save"):
            ckpt.save_checkpoint(ck.save, self.iteration, self.model, self.optimizer, self._common_state(),
                                 keep_last=ck.keep_last, ema_weights=ema, generators=self._generators(), meta=meta)
        self.obs.checkpoints.append(self.iteration)

    def _load(self, root: str, rollback: bool = False) -> None:
        """Resume from ``root`` as the load flags say; ``rollback`` restores everything (a spike rollback)."""
        ck = self.run.checkpoint
        if rollback:
            ck = dataclasses.replace(ck, load_optim=True, load_rng=True, finetune=False)
        with_optim = ck.load_optim and not ck.finetune
        with self.obs.timed("checkpoint_load"):
            it, common = ckpt.load_checkpoint(root, self.model, self.optimizer if with_optim else None,
                                              load_rng=ck.load_rng and not ck.finetune, generators=self._generators(),
                                              fallback=ck.fallback)
        if not with_optim:
            self._restart_optimizer_from_weights()
        else:  # loaded param groups carry the saving run's kernel choice (fused/foreach): this device's wins
            self.optimizer_kind = fuse_inner_optimizers(self.optimizer, self.device)
        if ck.finetune:
            logger.info("--finetune: weights of %s iteration %d; starting at iteration 0 with a fresh optimizer, "
                        "LR schedule and data order", root, it)
            return
        self.iteration = common["iteration"]
        self.samples_seen = common.get("samples_seen", 0)
        self._resume_schedule(common["scheduler"])
        self.clipper.load_state_dict(common["clipper"])
        self.loader.load_state_dict(common["sampler"])
        self._bad_before = dict(common.get("bad_samples", {}))
        if not rollback:  # a rollback keeps this run's counts and loss window
            self.rollbacks = common.get("rollbacks", 0)
            if self.spikes is not None and common.get("spikes"):
                self.spikes.load_state_dict(common["spikes"])
        logger.info("resumed from %s at iteration %d%s%s", root, it, "" if with_optim else " (fresh optimizer: "
                    "--no-load-optim)", "" if ck.load_rng else " (RNG not restored: --no-load-rng)")

    _SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")

    def _resume_schedule(self, saved: dict) -> None:
        """Restore the step count; the LR schedule is the command line's unless the checkpoint's is asked for."""
        now = self.scheduler.state_dict()
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in self._SCHEDULE_KEYS if k in saved and saved[k] != now[k]]
        self.scheduler.load_state_dict(saved)  # override / use-checkpoint set at construction (megatron flags)
        if changed and _is_rank0():
            if self.run.checkpoint.use_checkpoint_opt_param_scheduler:
                logger.info("resume: keeping the checkpoint's LR schedule (--use-checkpoint-opt_param-scheduler); "
                            "the command line asked for: %s", ", ".join(changed))
            else:
                logger.info("resume: the command line's LR schedule replaces the checkpoint's: %s (pass "
                            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's)", ", ".join(changed))

    def _restart_optimizer_from_weights(self) -> None:
        """A fresh optimizer over loaded weights: fp32 master copies and the EMA restart from them."""
        from mm.training.ema_adamw import EMA_KEY, EMA_STEPS

        self.optimizer.reload_model_params()
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for group in opt.optimizer.param_groups:
                group[EMA_STEPS] = 0
                for p in group["params"]:  # an EMA not created yet starts from the weights at the first step
                    state = opt.optimizer.state.get(p, {})
                    if EMA_KEY in state:
                        state[EMA_KEY].copy_(p.detach())

    def close(self) -> None:
        self.obs.close()
