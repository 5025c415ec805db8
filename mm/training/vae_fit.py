"""Fit (or adapt) a WFVAE on a data config: pixel reconstruction + KL, AdamW (spec §4; used by ``make demo``).

``python -m mm.training.vae_fit --mm-model model.json --mm-data data.json --steps 300 --out DIR
[--lr --batch-size --kl-weight --seed --init CKPT ...]``

Upstream trains WF-VAE with L1 + LPIPS + KL (and a GAN later); this is the small, real path without the
perceptual and adversarial terms: enough to fit the tiny preset's VAE on the synthetic clips before the DiT
is trained, or to adapt the released VAE (``--init wfvae_888_dim32.ckpt``) to a new domain. Per step, on a
batch of clips ``x`` in [-1, 1]::

    mean, logvar = vae.encode_posterior(x)              # raw posterior (spec §4.6), logvar clamped
    x_hat = vae.decode_latents(mean + exp(logvar / 2) * eps)   # a posterior sample, as upstream trains
    recon = mean|x_hat - x| + mean (x_hat - x)^2        # L1 (sharp edges) + MSE (what PSNR measures)
    kl    = mean 0.5 * (mean^2 + exp(logvar) - 1 - logvar)      # KL(q || N(0, I)) per latent element
    loss  = recon + kl_weight * kl

Both terms are per-element means, so ``kl_weight`` is independent of the clip size (upstream sums both
over elements, which with its 1e-6 and 48 pixel values per latent value is ~2e-8 here: negligible).
Temporal and spatial tiling are off while fitting (one pass over the whole clip); the tiled paths
reproduce it exactly (spatial tiling within its overlap bound), so the weights serve tiled inference.
The model is fitted in fp32 whatever ``ae.dtype`` says; the fixed Haar kernels stay frozen.

A freshly fitted VAE's latents are not normalised by the released constants, so the per-channel latent
statistics are recomputed afterwards from the posterior means over the data (spec §4.6 semantics,
``z_norm = (z - shift) * scale``): ``shift_c = mean_c`` and ``scale_c = 1 / std_c`` (population std
over every clip, latent frame and position), i.e. the normalised latents have zero mean and unit std
per channel on the fitting data.

Outputs under ``--out``:

* ``wfvae.ckpt``: ``{"state_dict": {"gen_model": state_dict}}`` (a released layout, fp32), loadable with
  ``WFVAE.from_upstream(ae, checkpoint=path)`` (strict keys);
* ``latent_stats.json``: ``{"scale": [...], "shift": [...]}`` (``latent_dim`` values each);
* ``fit_log.json``: the settings, the per-step history (loss, recon, l1, mse, kl, psnr, lr, grad_norm,
  seconds), the final posterior-mean PSNR over the data and the timing;
* ``model.json``: the input model JSON with ``ae.from_pretrained`` pointing at ``wfvae.ckpt`` and
  ``ae.scale`` / ``ae.shift`` set to the new statistics (other relative ``from_pretrained`` paths are
  rebased so they still name the same files). This is how a model JSON picks the fit up: the ``ae``
  block's ``"from_pretrained"`` (the weights) and ``"scale"`` / ``"shift"`` (the latent normalisation);
  pass it to ``pretrain_sora.py --mm-model`` / the inference JSON in place of the original.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mm.data.config import DataConfig, load_data_config
from mm.data.loader import build_dataloader
from mm.models.wavelet import HaarWaveletTransform3D
from mm.models.wfvae import WFVAE, WFVAEConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "wfvae.ckpt"
STATS_FILE = "latent_stats.json"
LOG_FILE = "fit_log.json"
MODEL_JSON_FILE = "model.json"
MIN_LATENT_STD = 1e-4  # floor for a (near-)constant latent channel: its scale stays finite


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings. The defaults fit the tiny preset (17x64x64, 16 clips) in a few CPU minutes."""

    steps: int = 300
    batch_size: int = 2  # on CPU two clips cost less than one (torch takes its oneDNN conv3d path at B >= 2)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio after the warm-up
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    kl_weight: float = 1e-4
    seed: int = 0
    log_every: int = 25
    stats_clips: int = 256  # clips used for the latent statistics (one pass, each clip once)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "stats_clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        _check_float("lr", self.lr, lambda v: v > 0, "> 0")
        _check_float("min_lr_ratio", self.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_float("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0")
        _check_float("grad_clip", self.grad_clip, lambda v: v > 0, "> 0")
        _check_float("kl_weight", self.kl_weight, lambda v: v >= 0, ">= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas!r}")


def _check_float(name: str, value: Any, ok: Any, accepted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")


@dataclass
class FitResult:
    vae: WFVAE  # the fitted model (trainable copy, in eval mode; its own scale/shift are the input config's)
    history: list[dict[str, float]]  # one entry per step
    shift: list[float]
    scale: list[float]
    psnr: float  # posterior-mean reconstruction over the statistics clips, output clamped to [-1, 1]
    seconds: float  # fitting time (optimisation steps only)


# ------------------------------------------------------------------------------------------ model


def trainable_wfvae(
    config: Mapping[str, Any] | WFVAEConfig, checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
    seed: int = 0, device: str | torch.device = "cpu",
) -> WFVAE:
    """A trainable fp32 WFVAE with tiling off: ``WFVAE.from_upstream`` (random init from ``seed`` when no
    ``checkpoint``, built on the cpu, then moved to ``device``), then every parameter except the fixed Haar
    kernels requires grad, in train mode.

    ``config`` is an upstream "ae" dict (or a whole model JSON dict) or a ``WFVAEConfig``.
    """
    if not isinstance(config, WFVAEConfig):
        config = WFVAEConfig.from_upstream_dict(config["ae"] if "ae" in config else config)
    config = dataclasses.replace(config, dtype="fp32", use_tiling=False, use_spatial_tiling=False)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        vae = WFVAE.from_upstream(config, checkpoint).to(device)
    vae.requires_grad_(True)
    for module in vae.modules():
        if isinstance(module, HaarWaveletTransform3D):
            module.requires_grad_(False)  # fixed transform (spec §4.3), a parameter only for the key layout
    return vae.train()


def fit_losses(
    vae: WFVAE, video: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The training objective on one batch (module docstring): ``loss`` (differentiable) and its parts."""
    video = video.to(device=vae.device, dtype=vae.dtype)
    mean, logvar = vae.encode_posterior(video)  # [B, latent, t, h, w] each, un-normalised
    recon_video = vae.decode_latents(vae.sample_posterior(mean, logvar, generator))  # [B, 3, T, H, W]
    diff = recon_video - video
    l1 = diff.abs().mean()
    mse = diff.square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    recon = l1 + mse
    return {"loss": recon + kl_weight * kl, "recon": recon, "l1": l1, "mse": mse, "kl": kl}


def psnr(mse: float) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def _lr_factor(step: int, fit: FitConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at the last step."""
    if step < fit.warmup_steps:
        return (step + 1) / fit.warmup_steps
    span = max(fit.steps - fit.warmup_steps - 1, 1)
    progress = min((step - fit.warmup_steps) / span, 1.0)
    return fit.min_lr_ratio + (1.0 - fit.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_wfvae(vae: WFVAE, batches: Iterator[torch.Tensor], fit: FitConfig) -> list[dict[str, float]]:
    """``fit.steps`` AdamW steps on videos from ``batches``; logs every ``fit.log_every`` steps (window means)
    and returns the per-step history. A non-finite loss or gradient norm raises ``FloatingPointError``."""
    params = [p for p in vae.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit_wfvae needs a trainable WFVAE (see trainable_wfvae); no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=fit.lr, betas=fit.betas, weight_decay=fit.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, fit))
    generator = torch.Generator(device=vae.device).manual_seed(fit.seed)  # posterior samples
    vae.train()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, fit.steps + 1):
        video = next(batches, None)
        if video is None:
            raise ValueError(f"fit_wfvae: the batches ran out after {step - 1} of {fit.steps} steps")
        terms = fit_losses(vae, video, fit.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, fit.grad_clip))
        values = {k: float(v.detach()) for k, v in terms.items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"VAE fit diverged at step {step}: loss {values['loss']}, "
                                     f"grad norm {grad_norm}; lower --lr (now {fit.lr})")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        record = {"step": step, **values}
        record.update(psnr=psnr(record["mse"]), lr=lr, grad_norm=grad_norm, seconds=time.perf_counter() - start)
        history.append(record)
        if step % fit.log_every == 0 or step == fit.steps:
            window = history[-((step - 1) % fit.log_every + 1):]
            avg = {k: sum(r[k] for r in window) / len(window) for k in ("loss", "recon", "kl", "psnr")}
            logger.info("vae fit step %d/%d  loss %.4f  recon %.4f  kl %.3f  psnr %.2f dB  lr %.2e  %.1fs",
                        step, fit.steps, avg["loss"], avg["recon"], avg["kl"], avg["psnr"], lr, record["seconds"])
    vae.eval()
    return history


@torch.no_grad()
def latent_statistics(
    vae: WFVAE, videos: Iterable[torch.Tensor], max_clips: int | None = None
) -> tuple[list[float], list[float], dict[str, float]]:
    """Per-channel ``(shift, scale)`` of the raw posterior means over ``videos`` (spec §4.6: ``shift`` =
    mean, ``scale`` = 1 / population std), and ``{"psnr", "num_clips", "num_latents"}`` of the
    posterior-mean reconstruction (clamped to [-1, 1]) over the same clips."""
    was_training = vae.training
    vae.eval()
    channels = vae.config.latent_dim
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    clips, squared_error, pixels = 0, 0.0, 0
    for video in videos:
        if max_clips is not None and clips >= max_clips:
            break
        video = video[: None if max_clips is None else max_clips - clips].to(device=vae.device, dtype=vae.dtype)
        mean, _ = vae.encode_posterior(video)  # [B, latent, t, h, w]
        flat = mean.transpose(0, 1).reshape(channels, -1).double().cpu()  # [latent, B*t*h*w]
        total += flat.sum(dim=1)
        total_sq += flat.square().sum(dim=1)
        count += flat.shape[1]
        recon = vae.decode_latents(mean).clamp(-1, 1)
        squared_error += float((recon.double() - video.double()).square().sum())
        pixels += video.numel()
        clips += video.shape[0]
    vae.train(was_training)
    if count == 0:
        raise ValueError("latent_statistics got no videos: the data config yielded no clips")
    mu = total / count
    std = (total_sq / count - mu.square()).clamp_min(0).sqrt()
    if bool((std < MIN_LATENT_STD).any()):
        logger.warning("latent channels %s are (nearly) constant over the data; their std is floored at %g",
                       (std < MIN_LATENT_STD).nonzero().flatten().tolist(), MIN_LATENT_STD)
    std = std.clamp_min(MIN_LATENT_STD)
    report = {"psnr": psnr(squared_error / pixels), "num_clips": clips, "num_latents": count}
    return mu.tolist(), (1.0 / std).tolist(), report


# ------------------------------------------------------------------------------------------ data


def fit_data_config(data: DataConfig, batch_size: int, seed: int) -> DataConfig:
    """The data config as the VAE fit reads it: pixels only (no tokenizers, no feature cache), our batch."""
    return data.replace(batch_size=batch_size, gradient_accumulation_size=1, seed=seed, use_text_processer=False,
                        load_video_features=False, load_text_features=False, initial_global_step_for_sampler=0)


def video_batches(data: DataConfig, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[torch.Tensor]:
    """Videos ``[B, 3, T, H, W]`` in [-1, 1] from the data pipeline, epoch after epoch (forever by default)."""
    loader = build_dataloader(fit_data_config(data, batch_size, seed))
    epoch = 0
    while epochs is None or epoch < epochs:
        yielded = 0
        for batch in loader:
            yielded += 1
            yield batch["video"]
        if yielded == 0:
            raise ValueError(f"the data config {data.data_path!r} yielded no batches")
        epoch += 1


# ------------------------------------------------------------------------------------------ files


def save_fit(out_dir: str | os.PathLike, vae: WFVAE, shift: list[float], scale: list[float]) -> dict[str, str]:
    """Write ``wfvae.ckpt`` (``{"state_dict": {"gen_model": ...}}``, fp32) and ``latent_stats.json``."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in vae.state_dict().items()}
    paths = {"checkpoint": os.path.join(out_dir, CHECKPOINT_FILE), "latent_stats": os.path.join(out_dir, STATS_FILE)}
    torch.save({"state_dict": {"gen_model": state}}, paths["checkpoint"])
    _write_json(paths["latent_stats"], {"scale": list(scale), "shift": list(shift)})
    return paths


def fitted_model_json(model_json: str | os.PathLike, out_dir: str | os.PathLike, shift: list[float],
                      scale: list[float]) -> dict[str, Any]:
    """The model JSON to write in ``out_dir``: ``ae.from_pretrained`` = the fitted checkpoint, ``ae.scale`` /
    ``ae.shift`` = the new statistics, every other relative ``from_pretrained`` rebased onto ``out_dir``."""
    with open(model_json, encoding="utf-8") as f:
        doc = json.load(f)
    src = os.path.dirname(os.path.abspath(model_json))
    dst = os.path.abspath(out_dir)
    for block in doc.values():
        path = block.get("from_pretrained") if isinstance(block, dict) else None
        if isinstance(path, str) and path and not os.path.isabs(path):
            block["from_pretrained"] = os.path.relpath(os.path.join(src, path), dst)
    doc["ae"] = {**doc["ae"], "from_pretrained": CHECKPOINT_FILE, "scale": list(scale), "shift": list(shift)}
    return doc


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def run_fit(model_json: str | os.PathLike, data: str | os.PathLike | DataConfig, out_dir: str | os.PathLike,
            fit: FitConfig = FitConfig(), init: str | os.PathLike | None = None,
            device: str | torch.device = "cpu") -> FitResult:
    """Fit the WFVAE of ``model_json``'s ae block on ``data`` and write the outputs (module docstring).

    ``init`` (a checkpoint in any released layout) overrides ``ae.from_pretrained``; with neither the VAE
    starts from a random init seeded by ``fit.seed``.
    """
    from mm.config_upstream import load_model_json

    spec = load_model_json(model_json)
    checkpoint = os.fspath(init) if init is not None else spec.ae_checkpoint
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f"WFVAE init checkpoint {checkpoint!r} (--init / ae.from_pretrained) does not exist")
    data_cfg = data if isinstance(data, DataConfig) else load_data_config(data)
    vae = trainable_wfvae(spec.vae_config(), checkpoint, seed=fit.seed, device=device)
    trainable = sum(p.numel() for p in vae.parameters() if p.requires_grad)
    logger.info("vae fit: %s init, %d trainable parameters, %d steps of batch %d on %s (%d frames, %dx%d)",
                checkpoint or "random", trainable, fit.steps, fit.batch_size, data_cfg.data_path,
                data_cfg.num_frames, data_cfg.max_height, data_cfg.max_width)

    start = time.perf_counter()
    history = fit_wfvae(vae, video_batches(data_cfg, fit.batch_size, fit.seed), fit)
    seconds = time.perf_counter() - start
    # each clip once (batch 1: no padding of the last batch), in a fixed order
    shift, scale, report = latent_statistics(vae, video_batches(data_cfg, 1, fit.seed, epochs=1), fit.stats_clips)
    logger.info("vae fit done in %.1fs: posterior-mean PSNR %.2f dB over %d clips; latent mean |shift| %.3f, "
                "mean scale %.3f", seconds, report["psnr"], report["num_clips"],
                sum(abs(v) for v in shift) / len(shift), sum(scale) / len(scale))

    paths = save_fit(out_dir, vae, shift, scale)
    paths["model_json"] = os.path.join(out_dir, MODEL_JSON_FILE)
    _write_json(paths["model_json"], fitted_model_json(model_json, out_dir, shift, scale))
    paths["log"] = os.path.join(out_dir, LOG_FILE)
    _write_json(paths["log"], {
        "model_json": os.path.abspath(model_json), "data": data_cfg.data_path, "init": checkpoint,
        "fit": dataclasses.asdict(fit), "trainable_parameters": trainable, "fit_seconds": seconds,
        "final": report, "history": history,
    })
    logger.info("wrote %s", ", ".join(paths.values()))
    return FitResult(vae=vae, history=history, shift=shift, scale=scale, psnr=report["psnr"], seconds=seconds)


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    d = FitConfig()
    p = argparse.ArgumentParser(
        prog="python -m mm.training.vae_fit", description=__doc__.split("\n")[0],
        epilog="Writes OUT/wfvae.ckpt, OUT/latent_stats.json, OUT/fit_log.json and OUT/model.json (the input "
               "model JSON with ae.from_pretrained, ae.scale and ae.shift set to the fit).")
    p.add_argument("--mm-model", required=True, help="upstream model JSON; its 'ae' block defines the WFVAE")
    p.add_argument("--mm-data", required=True, help="upstream data.json (or a data.txt) with the clips to fit on")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"clips per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"AdamW peak learning rate; linear warm-up, cosine decay to lr*{d.min_lr_ratio} (default {d.lr})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"warm-up steps (default {d.warmup_steps})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"gradient-norm clip (default {d.grad_clip})")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help=f"weight of the per-element KL against the per-element L1+MSE (default {d.kl_weight})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the init, data order and posterior noise (default {d.seed})")
    p.add_argument("--init", default=None,
                   help="checkpoint to start from, any released layout (default: ae.from_pretrained, else random)")
    p.add_argument("--device", default=None,
                   help="torch device to fit on, e.g. cuda:0 (default: the backend's, $MM_BACKEND or auto: "
                        "cuda:LOCAL_RANK, npu:LOCAL_RANK or cpu)")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"log every N steps (default {d.log_every})")
    p.add_argument("--stats-clips", type=int, default=d.stats_clips,
                   help=f"clips used for the latent statistics and the final PSNR (default {d.stats_clips})")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    # progress from this module; only warnings from the libraries it drives
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    for flag, path in (("--mm-model", a.mm_model), ("--mm-data", a.mm_data), ("--init", a.init)):
        if path is not None and not os.path.isfile(path):
            p.error(f"{flag} {path!r} does not exist")
    if a.device is None:
        from mm.ops import current_backend

        a.device = str(current_backend().local_device())
    try:
        torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device {a.device!r} is not a torch device: {e}")
    try:
        fit = FitConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                        weight_decay=a.weight_decay, grad_clip=a.grad_clip, kl_weight=a.kl_weight, seed=a.seed,
                        log_every=a.log_every, stats_clips=a.stats_clips)
        result = run_fit(a.mm_model, a.mm_data, a.out, fit, init=a.init, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    logger.info("final posterior-mean PSNR %.2f dB after %d steps (%.1fs)", result.psnr, fit.steps, result.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
