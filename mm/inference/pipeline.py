"""Text-to-video pipeline: prompts -> text features -> seeded noise -> flow-ODE sampling -> WFVAE decode.

Spec §9.2 (flow per batch), §6.2 (sampler) and §12 items 28-31, 34:

* texts: ``"high quality, {prompt}"`` and the v1.5 negative prompt (+ the user's), caption-cleaned
  (:mod:`mm.inference.prompts`); T5 hidden states + mask, CLIP pooled embedding.
* noise: one explicit ``torch.Generator`` per sample, seeded by the caller (the runner uses
  ``seed + prompt_index``), drawn on the CPU in fp32: identical on every rank of a TP group and independent
  of the device, the batch composition and the number of ranks.
* the denoising loop lives here, not in the sampler (ARCHITECTURE principle 6): CFG batch
  ``[uncond; cond]`` (negative first), guidance rescale, Euler; latents, CFG and Euler in fp32 whatever
  the DiT dtype (§12.28); the guidance scale given is the one used (§12.29).
* decode: de-normalise inside ``WFVAE.decode``, temporal tiling (exact), optional spatial tiling; uint8 by
  rounding (§12.31).

The DiT runs with tensor parallelism (+ sequence parallelism) when a ``ParallelState`` is handed in;
text encoders and the VAE are replicated (spec §9.3).

Python use (one process, released weights)::

    spec = load_inference_json("examples/tiny/inference.json")
    pipe = OpenSoraPlanPipeline.from_spec(spec)                      # predictor/ae from_pretrained in the JSON
    out = pipe(["a red square moving right"], SamplingConfig.from_spec(spec), seeds=[1234])
    out.videos[0]                                                    # uint8 (T, H, W, 3)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mm.config import check, check_choice, check_positive
from mm.config_upstream import InferenceSpec
from mm.diffusion import sampler
from mm.inference.prompts import DEFAULT_NEGATIVE_PROMPT, POSITIVE_TEMPLATE, negative_text, positive_text
from mm.inference.video_io import to_uint8

logger = logging.getLogger(__name__)

SCHEDULES = sampler.SCHEDULES
VAE_SCALE = (8, 8, 8)  # WFVAE (t, h, w) compression


@dataclass
class SamplingConfig:
    """What one sample depends on besides the prompt, the seed and the weights. Validated on construction."""

    num_frames: int = 121
    height: int = 576
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 8.0  # 1 = no CFG (cond branch only)
    guidance_rescale: float = 0.7
    schedule: str = "static_shift"  # static_shift | dynamic_shift | linear_quadratic
    shift: float = 7.0  # static_shift only
    negative_prompt: str = ""  # appended to the default negative prompt
    use_attention_mask: bool = True  # T5 padding mask on the text keys (upstream pipeline_config)
    # the texts the model was trained around (v1.5: "high quality, {prompt}" and its negative prompt; a
    # model trained on plain captions, like the tiny demo, wants "{prompt}" and "")
    prompt_template: str = POSITIVE_TEMPLATE
    default_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    def __post_init__(self):
        check(isinstance(self.num_frames, int) and self.num_frames >= 1 and (self.num_frames - 1) % 8 == 0,
              "num_frames", self.num_frames, "8n+1 (1, 9, 17, ..., 121)")
        for name in ("height", "width"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0 and v % 16 == 0, name, v, "a positive multiple of 16")
        check(isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1, "num_inference_steps",
              self.num_inference_steps, "an integer >= 1")
        check(self.guidance_scale >= 1.0, "guidance_scale", self.guidance_scale, ">= 1.0 (1 = no CFG)")
        check(0.0 <= self.guidance_rescale <= 1.0, "guidance_rescale", self.guidance_rescale, "[0, 1]")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_positive("shift", self.shift)
        check(self.schedule != "linear_quadratic" or self.num_inference_steps % 2 == 0, "num_inference_steps",
              self.num_inference_steps, "an even number with the linear_quadratic schedule")
        check(isinstance(self.negative_prompt, str), "negative_prompt", self.negative_prompt, "a string")
        check("{prompt}" in self.prompt_template, "prompt_template", self.prompt_template, "a string with '{prompt}'")

    @classmethod
    def from_spec(cls, spec: InferenceSpec, **overrides) -> "SamplingConfig":
        """Defaults from an inference JSON (``pipeline_config.input_size`` and the ``diffusion`` block)."""
        d = spec.diffusion
        if d.use_linear_quadratic_schedule:
            schedule = "linear_quadratic"
        elif d.use_dynamic_shifting:
            schedule = "dynamic_shift"
        else:
            schedule = "static_shift"
        base = dict(num_frames=spec.num_frames, height=spec.height, width=spec.width,
                    num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale,
                    guidance_rescale=d.guidance_rescale, schedule=schedule, shift=d.shift,
                    use_attention_mask=spec.use_attention_mask)
        if spec.prompt_template is not None:
            base["prompt_template"] = spec.prompt_template
        if spec.default_negative_prompt is not None:
            base["default_negative_prompt"] = spec.default_negative_prompt
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def latent_grid(self) -> tuple[int, int, int]:
        """Latent ``(t, h, w)``: ``((T - 1) / 8 + 1, H / 8, W / 8)`` (spec §4.6)."""
        return ((self.num_frames - 1) // VAE_SCALE[0] + 1, self.height // VAE_SCALE[1], self.width // VAE_SCALE[2])

    def sigmas(self, device=None) -> torch.Tensor:
        t, h, w = self.latent_grid()
        return sampler.sigmas(self.num_inference_steps, schedule=self.schedule, shift=self.shift,
                              latent_hw=(h, w), device=device)

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TextConditioning:
    """DiT text inputs for a batch: T5 hidden ``(B, L, C)``, T5 mask ``(B, L)``, CLIP pooled ``(B, P)``."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def expand(self, batch: int) -> "TextConditioning":
        """A 1-sample conditioning repeated ``batch`` times."""
        assert len(self) == 1, len(self)
        return TextConditioning(*(t.expand(batch, *t.shape[1:]) for t in (self.hidden, self.mask, self.pooled)))

    @staticmethod
    def cat(first: "TextConditioning", second: "TextConditioning") -> "TextConditioning":
        """``[first; second]`` on the batch dim."""
        return TextConditioning(torch.cat([first.hidden, second.hidden]), torch.cat([first.mask, second.mask]),
                                torch.cat([first.pooled, second.pooled]))


@dataclass
class GenerationOutput:
    latents: torch.Tensor  # fp32 (B, C, t, h, w), normalised latent space
    videos: torch.Tensor | None  # uint8 (B, T, H, W, 3) on the CPU, or None without decode


def sha256_prefix(path: str | os.PathLike, num_chars: int = 16) -> str:
    """First ``num_chars`` hex digits of a file's SHA-256 (identifies released weight files in sidecars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:num_chars]


def default_device() -> torch.device:
    """The selected backend's device for this process (``LOCAL_RANK`` picks the accelerator)."""
    from mm.ops import current_backend

    return current_backend().local_device()


class OpenSoraPlanPipeline:
    """The frozen parts (WFVAE, T5, CLIP) + the SUV denoiser, and the sampling loop.

    ``parallel``: a ``mm.distributed.init.ParallelState`` (the DiT's TP/SP layout) or None (one process).
    Every rank of a TP group must call :meth:`denoise` with the same inputs (the DiT runs collectives).
    ``weights``: a JSON-able description of the weights (written into the sidecars).
    """

    def __init__(self, dit, vae, t5, clip, *, parallel=None, device: torch.device | None = None,
                 weights: dict | None = None, replicas=None):
        self.dit, self.vae, self.t5, self.clip = dit, vae, t5, clip
        self.parallel = parallel
        # mm.distributed.cfg_parallel.ReplicaLayout (None: the DiT's TP x CP group is the replica); with
        # cfg_size 2 this rank runs one CFG branch and exchanges velocities with its peer every step
        self.replicas = replicas
        self.device = device if device is not None else torch.device("cpu")
        self.weights = weights or {}
        self._negative_cache: dict[str, TextConditioning] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: InferenceSpec, *, parallel=None, load: str | None = None, use_ema: bool = True,
                  dtype: str | None = None, device: torch.device | str | None = None,
                  replicas=None) -> "OpenSoraPlanPipeline":
        """Build every part from a parsed inference JSON.

        DiT weights: ``load`` = one of our training checkpoints (dist_checkpointing; its EMA weights unless
        ``use_ema=False``; needs ``init_parallel`` first, collective over all ranks), else the released flat
        state dict ``spec.predictor_checkpoint`` (this rank's TP slices are cut at load). VAE weights:
        ``spec.ae_checkpoint``. ``dtype``: DiT and text-encoder dtype (default ``spec.weight_dtype``).
        ``replicas``: a ``mm.distributed.cfg_parallel.ReplicaLayout`` (CFG-parallel sampling).
        Raises ValueError when a weight source is missing.
        """
        from mm.builders import build_suv, build_text_encoders, build_vae, torch_dtype

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or spec.weight_dtype
        if load is None and not spec.predictor_checkpoint:
            raise ValueError("no DiT weights: pass a training checkpoint (--load) or a released state dict "
                             "(--upstream-dit / predictor.from_pretrained)")
        if not spec.ae_checkpoint:
            raise ValueError("no WFVAE weights: pass --upstream-vae (or ae.from_pretrained in the JSON)")
        if load is not None and parallel is None:
            raise ValueError("loading a training checkpoint (--load) needs the process groups: call "
                             "mm.distributed.init.init_parallel first and pass its ParallelState")
        weights = describe_weights(spec, load=load, use_ema=use_ema, collective=parallel is not None)

        vae = build_vae(spec).to(device)
        t5, clip = build_text_encoders(spec, dtype=dtype, device=device)
        if load is not None:
            from mm.training.checkpointing import load_checkpoint

            # on the device first: the load then takes the same path as a training resume
            dit = build_suv(spec, parallel, params_dtype=torch_dtype(dtype)).to(device)
            iteration, _ = load_checkpoint(load, dit, None, use_ema=use_ema, load_rng=False)
            weights["dit"]["iteration"] = iteration
            logger.info("DiT: %s weights of iteration %d from %s", "EMA" if use_ema else "raw", iteration, load)
        else:
            dit = build_suv(spec, parallel, params_dtype=torch_dtype(dtype), checkpoint=spec.predictor_checkpoint)
        dit = dit.to(device).eval().requires_grad_(False)
        return cls(dit, vae, t5, clip, parallel=parallel, device=device, weights=weights, replicas=replicas)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], use_attention_mask: bool = True) -> TextConditioning:
        """Already templated + cleaned texts -> DiT text inputs (spec §9.2 step 3)."""
        hidden, mask = self.t5(list(texts))
        pooled = self.clip(list(texts))
        if not use_attention_mask:
            mask = torch.ones_like(mask)
        return TextConditioning(hidden.to(self.device), mask.to(self.device), pooled.to(self.device))

    def conditioning(self, prompts: Sequence[str], cfg: SamplingConfig) -> tuple[TextConditioning, TextConditioning]:
        """(uncond, cond) for a batch of raw prompts; the negative text is encoded once and reused."""
        cond = self.encode_text([positive_text(p, cfg.prompt_template) for p in prompts], cfg.use_attention_mask)
        key = f"{cfg.use_attention_mask}|{cfg.default_negative_prompt}|{cfg.negative_prompt}"
        if key not in self._negative_cache:
            self._negative_cache = {key: self.encode_text([negative_text(cfg.negative_prompt,
                                                                         cfg.default_negative_prompt)],
                                                           cfg.use_attention_mask)}
        return self._negative_cache[key].expand(len(prompts)), cond

    def initial_noise(self, seeds: Sequence[int], cfg: SamplingConfig) -> torch.Tensor:
        """Standard normal fp32 ``(B, C, t, h, w)``, sample ``i`` from ``torch.Generator().manual_seed(seeds[i])``
        on the CPU (spec §6.2: no init-noise scaling), then moved to the device."""
        shape = (self.dit.suv_config.in_channels, *cfg.latent_grid())
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
                 for s in seeds]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, uncond: TextConditioning, cond: TextConditioning, cfg: SamplingConfig,
                callback: Callable[[int, int], None] | None = None, *,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """Euler integration of the flow ODE from sigma 1 to 0 (spec §6.2); returns fp32 latents.

        ``condition``: an I2V model's extra input channels ``[B, C + ft, t, h, w]`` (``mm.inference.i2v``),
        appended to the noisy latents of both CFG branches at every step.

        Per step the DiT sees the batch ``[uncond; cond]`` (negative first) in its own dtype; its velocity
        comes back to fp32 for CFG + rescale and the Euler update. ``callback(step, num_steps)`` after
        each step.

        CFG-parallel (``replicas.cfg_size == 2``): this rank runs only its branch (batch ``B``) and the two
        velocities are all-gathered over the CFG pair once per step; the math after that is the same.
        """
        grid = cfg.sigmas(device=self.device)
        timesteps = sampler.timesteps(grid)
        split_cfg = self.replicas is not None and self.replicas.cfg_size == 2
        if split_cfg:
            assert cfg.use_cfg, "CFG parallelism needs guidance_scale > 1 (checked by the CLI)"
            text = cond if self.replicas.cfg_rank else uncond
        else:
            text = TextConditioning.cat(uncond, cond) if cfg.use_cfg else cond
        x = noise.float()
        dtype = self.dit.params_dtype
        for i in range(cfg.num_inference_steps):
            x_in = torch.cat([x, x]) if cfg.use_cfg and not split_cfg else x  # [2B or B, C, t, h, w]
            if condition is not None:  # I2V: the same conditioning channels for both CFG branches
                x_in = torch.cat([x_in, condition.repeat(x_in.shape[0] // condition.shape[0], 1, 1, 1, 1)], dim=1)
            t_in = timesteps[i].expand(x_in.shape[0])
            v = self.dit(x_in.to(dtype), t_in, text.hidden, text.mask, text.pooled).float()
            if cfg.use_cfg:
                v_uncond, v_cond = self.replicas.branch_velocities(v) if split_cfg else v.chunk(2)
                v = sampler.cfg(v_uncond, v_cond, cfg.guidance_scale, cfg.guidance_rescale)
            sampler.check_finite(v, i)
            x = sampler.euler_step(x, v, grid[i], grid[i + 1])
            if callback is not None:
                callback(i + 1, cfg.num_inference_steps)
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> uint8 ``(B, T, H, W, 3)`` on the CPU; one sample at a time (memory)."""
        return torch.cat([to_uint8(self.vae.decode(z[None])) for z in latents])

    def __call__(self, prompts: Sequence[str], cfg: SamplingConfig, seeds: Sequence[int], *, decode: bool = True,
                 callback: Callable[[int, int], None] | None = None, images=None) -> GenerationOutput:
        """Raw prompts (templating and cleaning are applied here) + one seed per prompt -> latents (+ videos).
        ``images``: one ``mm.inference.i2v.ImageCondition`` per prompt (an I2V predictor; None: text only)."""
        from mm.inference.i2v import pipeline_condition

        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str")
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
        uncond, cond = self.conditioning(prompts, cfg)
        condition = pipeline_condition(self, images, len(prompts), cfg)
        latents = self.denoise(self.initial_noise(seeds, cfg), uncond, cond, cfg, callback, condition=condition)
        return GenerationOutput(latents, self.decode(latents) if decode else None)


def describe_weights(spec: InferenceSpec, *, load: str | None, use_ema: bool, collective: bool = False) -> dict:
    """JSON-able identity of the weights: training checkpoint path (+ iteration, filled in at load) and
    EMA/raw, or released file paths with a SHA-256 prefix; text-encoder directories. ``collective``: every
    rank calls this; rank 0 hashes and broadcasts."""
    if load is not None:
        dit = {"kind": "training_checkpoint", "path": str(Path(load).resolve()), "weights": "ema" if use_ema else "raw"}
    else:
        dit = {"kind": "released", "path": str(Path(spec.predictor_checkpoint).resolve()),
               "sha256": _cached_sha256(spec.predictor_checkpoint, collective)}
    vae = {"path": str(Path(spec.ae_checkpoint).resolve()), "sha256": _cached_sha256(spec.ae_checkpoint, collective)}
    return {"dit": dit, "vae": vae, "t5": spec.text.t5, "clip": spec.text.clip}


def _cached_sha256(path: str, collective: bool) -> str:
    """SHA-256 prefix. ``collective`` (every rank calls): rank 0 hashes and broadcasts, so a released DiT
    (~17 GB) is read once, not once per rank. Results are cached per (path, size, mtime) in the process."""
    import torch.distributed as dist

    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        box = [_local_sha256(path) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return _local_sha256(path)


def _local_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_prefix(path)
    return _SHA_CACHE[key]


_SHA_CACHE: dict = {}

__all__ = ["SamplingConfig", "TextConditioning", "GenerationOutput", "OpenSoraPlanPipeline", "describe_weights",
           "sha256_prefix", "default_device"]
