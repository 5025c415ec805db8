"""Memory and throughput planner: which layouts of the SUV fit on N devices, and how fast they should run.

    python -m mm.tools.plan --mm-model examples/opensoraplan1.5/model_opensoraplan1_5.json \\
        --num-devices 1024 --device h100 [--device-memory-gb 80] [--seq-shape 121x576x1024] \\
        [--global-batch-size 1024] [--micro-batch-size 1] [--text-len 512] [--top 20]

Enumerates TP (+SP) x CP (Ulysses) x PP x DP layouts, with and without the distributed optimizer, with no /
selective (FFN half) / full activation recompute, and prints per-rank memory (the fullest pipeline stage's,
with every stage's peak in the note) and an estimated step time and MFU for each; infeasible layouts are
marked with the reason, feasible ones ranked by step time. Context parallelism is Ulysses (heads split by
all-to-all: TP x CP divides the heads), ring (K/V passed around the CP group: any head count) or hybrid
(Ulysses inside groups, ring across), as the trainer's ``--context-parallel-algo``.

Memory model (bytes per rank; ``P`` = this rank's SUV parameters, counted exactly from a meta-device build:
TP-split parameters / TP + replicated ones):

* weights ``P x e`` (``e`` = 2 with ``--bf16``, else 4); grads ``4 P`` (megatron's fp32 grad buffers);
* optimizer: Adam moments ``8 P`` and fp32 master weights ``4 P`` (bf16 only), sharded over DP x CP with the
  distributed optimizer; EMA ``4 P`` (sharded the same way, ``mm.training.ema_adamw``);
* optimizer-step working memory: a quarter of an fp32 copy of the optimizer's shard (``P / shards``: the
  per-parameter AdamW temporaries), the peak when activations are small. The gradient collectives are taken
  to work in place (NCCL/HCCL; on one gloo rank since ``megatron_patches`` P10, which removed the whole-buffer
  copy the first calibration had measured as a full ``4 P / shards``);
* activations per block and micro-batch: ``tokens x D x (f32 x 4 + c_seq x e) / sp + tokens x D x c_tp x e /
  TP`` with ``tokens = (video + text tokens) / CP`` and ``sp`` = TP under sequence parallelism, else 1; the
  coefficients (elements per token in units of D: fp32 residual-stream tensors, compute-dtype tensors of the
  full width, TP-sharded ones) split into the attention and FFN halves, so recompute keeps: none = all,
  selective = the attention half + the FFN inputs, full = the block inputs (plus one block's activations
  while it is recomputed). Calibrated against ``mm.tools.memory_probe`` on real CPU runs of the tiny and a
  mid-size config at TP 1, TP 2 + SP, PP 2 and ring CP 2 (``tests/distributed/test_plan_calibration.py``,
  within 20%);
* attention buffers: the softmax statistics (fp32, one per local head and query per block); our kernels never
  materialise the ``S x S`` scores or mask (spec §3.1);
* pipeline stages (PP > 1): the trainer's stage cut (``mm.distributed.pipeline`` cost model), each stage's own
  parameters (meta-device chunk builds), and under 1F1B stage ``s`` holding ``min(PP - s, micro-batches)``
  micro-batches' activations plus the boundary state it received for each (both streams and the live long
  skips);
* frozen encoders: WFVAE, T5 and CLIP weights in their dtypes (0 with the feature cache); counted from the
  encoder directories' ``config.json`` when present, else from the released architectures. The WFVAE
  encode runs before the denoiser's forward and is bounded by its temporal tiling; it is not added.

Step-time model: compute = model FLOPs (``mm.training.metrics.train_flops``, Skiparse-aware) x the recompute
factor / (peak x ``--compute-efficiency``); TP + SP: 4 all-gathers / reduce-scatters of the activations per
block in the forward and 4 in the backward, over NVLink/HCCS when the TP group is inside a node; Ulysses CP:
4 all-to-alls per block each way over the Ulysses group; ring CP: the local K and V passed CP - 1 times
forward and K, V and their gradients backward (no overlap with the attention assumed); PP: the slowest stage's share of the FLOPs, one boundary
state each way per micro-batch, and the 1F1B bubble ``(m + PP - 1) / m``; DP: the grad reduce-scatter (fp32) and the param
all-gather of the distributed optimizer (or an all-reduce without it) over the inter-node fabric; no
overlap is assumed (the trainer's DDP does not overlap). MFU = model FLOPs / (step time x devices x peak).
Bandwidths are per device, nominal, and listed in :data:`DEVICES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
HEADROOM = 0.1  # share of device memory a layout may not plan for (fragmentation, communication buffers)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    peak_key: str  # key into mm.training.metrics.PEAK_TFLOPS
    intra_node_gbps: float  # per-device collective bandwidth inside a node (GB/s)
    inter_node_gbps: float  # per-device network bandwidth between nodes (GB/s)
    per_node: int = 8


# nominal figures: NVLink 4 (450 GB/s per direction per H100/H200), NVLink 3 (300 GB/s per A100), HCCS on an
# Atlas 800T A2 node (56 GB/s per 910B link); one 400 Gb/s NIC per GPU (50 GB/s), 200 Gb/s RoCE per NPU
DEVICES = {
    "h100": Device("H100-80GB", 80.0, "H100", 450.0, 50.0),
    "h200": Device("H200-141GB", 141.0, "H200", 450.0, 50.0),
    "a100": Device("A100-80GB", 80.0, "A100", 300.0, 25.0),
    "910b": Device("Ascend-910B-64GB", 64.0, "910B", 56.0, 25.0),
}

# activation coefficients, elements per token per block in units of D (calibrated, see the module docstring)
ACT = {
    "attn": {"f32": 2.0, "seq": 3.0, "tp": 8.0},  # residual + LN input, LN/modulate outputs, q k v / normed / roped, out
    "ffn": {"f32": 1.0, "seq": 3.0, "tp": 8.0},  # residual, LN/modulate outputs, fc1 output + activation
}
BLOCK_INPUT_F32 = 2.0  # what full recompute keeps per block: the video and text streams (fp32 residuals)
OPT_STEP_F32 = 0.25  # optimizer-step working memory, in fp32 copies of the optimizer shard
RECOMPUTE = ("none", "selective", "full")

# released T5-v1_1-XL encoder and CLIP-ViT-bigG-14 text tower (public configs), for when the directory is absent
RELEASED_T5 = dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64, vocab_size=32128,
                   feed_forward_proj="gated-gelu")
RELEASED_CLIP = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     vocab_size=49408, max_position_embeddings=77, projection_dim=1280)


# ------------------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs from a model JSON, counted once."""

    tp_split_params: int  # parameters split over TP (megatron column/row-parallel weights and biases)
    replicated_params: int
    hidden: int
    num_heads: int
    num_blocks: int
    frozen_bytes: dict  # {"wfvae": bytes, "t5": bytes, "clip": bytes} in their run dtypes (0 when cached)
    frozen_notes: tuple
    flops_shape: object  # mm.training.metrics.SUVShape
    vae_stride: tuple  # (t, h, w)
    patch: tuple  # (t, h, w) patch sizes
    suv: object = None  # mm.models.suv_config.SUVConfig (pipeline stage cuts and chunk builds)
    stage_cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def params_per_rank(self, tp: int) -> int:
        return self.tp_split_params // tp + self.replicated_params

    @property
    def total_params(self) -> int:
        return self.tp_split_params + self.replicated_params


def count_suv_params(suv_config, block_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """(TP-split, replicated) parameter counts of the SUV (or of the pipeline chunk over ``block_range``), from a
    build on the meta device."""
    import torch

    from mm.models.sparse_ummdit import SparseUMMDiT

    model = SparseUMMDiT(suv_config, None, torch.float32, device="meta", block_range=block_range)
    split = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    return split, replicated


def _meta_count(build) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _hf_config(directory: str | None) -> dict | None:
    path = Path(directory) / "config.json" if directory else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def count_frozen(spec) -> tuple[dict, tuple]:
    """Bytes of the frozen encoders as the trainer holds them, and notes on where the counts came from."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from mm.builders import torch_dtype
    from mm.models.wfvae import WFVAE

    notes = []
    text_bytes = torch_dtype(spec.weight_dtype).itemsize
    out = {"wfvae": 0, "t5": 0, "clip": 0}
    if not spec.load_video_features:
        cfg = spec.vae_config()
        out["wfvae"] = _meta_count(lambda: WFVAE(cfg)) * torch_dtype(spec.ae_dtype).itemsize
    if not spec.load_text_features:
        t5 = _hf_config(spec.text.t5)
        if t5 is None:
            notes.append(f"T5: no config.json in {spec.text.t5}: the released t5-v1_1-xl size is assumed")
        t5_cfg = T5Config(**{k: v for k, v in (t5 or RELEASED_T5).items() if k in T5Config().to_dict()})
        out["t5"] = _meta_count(lambda: T5EncoderModel(t5_cfg)) * text_bytes
        clip = _hf_config(spec.text.clip)
        if clip is None:
            notes.append(f"CLIP: no config.json in {spec.text.clip}: the released CLIP-ViT-bigG-14 size is assumed")
            clip = RELEASED_CLIP
        elif "text_config" in clip:  # a full CLIP config: the text tower and the projection
            clip = {**clip["text_config"], "projection_dim": clip.get("projection_dim", 512)}
        clip_cfg = CLIPTextConfig(**{k: v for k, v in clip.items() if k in CLIPTextConfig().to_dict()})
        out["clip"] = _meta_count(lambda: CLIPTextModelWithProjection(clip_cfg)) * text_bytes
    return out, tuple(notes)


def model_facts(spec) -> ModelFacts:
    from mm.training.metrics import SUVShape

    cfg = spec.suv_config()
    split, replicated = count_suv_params(cfg)
    frozen, notes = count_frozen(spec)
    from mm.models.wfvae import SCALE_FACTOR

    return ModelFacts(
        tp_split_params=split, replicated_params=replicated, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
        num_blocks=cfg.num_blocks, frozen_bytes=frozen, frozen_notes=notes,
        flops_shape=SUVShape(tuple(cfg.num_layers), tuple(cfg.effective_sparse_n()), cfg.hidden_size,
                             cfg.timestep_embed_dim, cfg.patch_size, cfg.patch_size_t),
        vae_stride=tuple(SCALE_FACTOR), patch=(cfg.patch_size_t, cfg.patch_size, cfg.patch_size), suv=cfg,
    )


# ------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    pp: int = 1
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    recompute: str = "selective"  # none | selective | full
    recompute_layers: int | None = None  # the first N blocks are recomputed; None = all
    cp_algorithm: str = "ulysses"  # ulysses | ring | hybrid (Ulysses inside groups of ulysses_degree, ring across)
    ulysses_degree: int | None = None  # hybrid only

    @property
    def ulysses_size(self) -> int:
        """The Ulysses part of CP (heads split by all-to-all); the ring part is CP / this."""
        return {"ulysses": self.cp, "ring": 1}.get(self.cp_algorithm, self.ulysses_degree or 1)

    @classmethod
    def of_run(cls, run, world_size: int) -> "Layout":
        """The layout a run config asks for on ``world_size`` devices."""
        par, tr = run.parallel, run.training
        tp, cp, pp = par.tensor_model_parallel_size, par.context_parallel_size, par.pipeline_model_parallel_size
        rc = tr.recompute_granularity or "none"
        layers = tr.selective_recompute_ffn_layers if rc == "selective" else tr.recompute_num_layers
        # skiparse_cp_algo is planned as its fallback for dense blocks, the ring (no head limit); its sparse
        # stages move less (bench/cp_comm.py)
        algo = {"ulysses_cp_algo": "ulysses", "megatron_cp_algo": "ring", "hybrid_cp_algo": "hybrid",
                "skiparse_cp_algo": "ring"}[par.context_parallel_algo]
        return cls(tp=tp, cp=cp, dp=world_size // (tp * cp * pp), pp=pp, sequence_parallel=par.sequence_parallel and tp > 1,
                   distributed_optimizer=run.optimizer.use_distributed_optimizer, recompute=rc,
                   recompute_layers=layers if rc != "none" else None, cp_algorithm=algo,
                   ulysses_degree=par.ulysses_degree_in_cp if algo == "hybrid" else None)

    def label(self) -> str:
        sp = "+SP" if self.sequence_parallel and self.tp > 1 else ""
        algo = f"hybrid U{self.ulysses_size}xR{self.cp // self.ulysses_size}" if self.cp_algorithm == "hybrid" \
            else self.cp_algorithm
        cp = f"CP{self.cp}" + (f"({algo})" if self.cp > 1 else "")
        return f"TP{self.tp}{sp} {cp} PP{self.pp} DP{self.dp}"


@dataclass(frozen=True)
class Workload:
    latent_thw: tuple[int, int, int]
    text_len: int
    micro_batch: int
    global_batch: int
    bf16: bool = True

    @classmethod
    def from_pixels(cls, facts: ModelFacts, frames: int, height: int, width: int, **kw) -> "Workload":
        from mm.data.config import frames_to_latent

        st, sh, sw = facts.vae_stride
        return cls(latent_thw=(frames_to_latent(frames, st), height // sh, width // sw), **kw)

    @classmethod
    def of_run(cls, data_cfg, run) -> "Workload":
        """The clips of a data config at their largest bucket shape, the batch and precision of a run config."""
        from mm.data.config import frames_to_latent

        tr = run.training
        return cls(latent_thw=(frames_to_latent(data_cfg.num_frames, data_cfg.ae_stride_t),
                               data_cfg.max_height // data_cfg.ae_stride, data_cfg.max_width // data_cfg.ae_stride),
                   text_len=data_cfg.model_max_length, micro_batch=tr.micro_batch_size,
                   global_batch=tr.global_batch_size, bf16=tr.bf16)

    def video_tokens(self, facts: ModelFacts) -> int:
        t, h, w = self.latent_thw
        pt, ph, pw = facts.patch
        return (t // pt) * (h // ph) * (w // pw)


@dataclass
class Estimate:
    layout: Layout
    memory: dict  # category -> bytes per rank
    step_seconds: float
    mfu: float | None
    comm_seconds: dict
    micro_batches: int
    problems: list
    stage_peaks: list = dataclasses.field(default_factory=list)  # per pipeline stage, bytes (PP > 1)

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def feasible(self) -> bool:
        return not self.problems


def _tokens(facts: ModelFacts, layout: Layout, work: Workload) -> float:
    """Video + text tokens of one micro-batch on one CP rank."""
    return (work.video_tokens(facts) + work.text_len) / layout.cp * work.micro_batch


def activation_bytes(facts: ModelFacts, layout: Layout, work: Workload, block_range: tuple[int, int] | None = None,
                     in_flight: int = 1) -> int:
    """Activation memory per rank at the peak of the backward, for the blocks in ``block_range`` (default all) with
    ``in_flight`` micro-batches' activations held at once (pipeline stages under 1F1B)."""
    e = 2 if work.bf16 else 4
    tokens = _tokens(facts, layout, work)
    sp = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    D = facts.hidden

    def half(c):
        return tokens * D * ((c["f32"] * 4 + c["seq"] * e) / sp + c["tp"] * e / layout.tp)

    full_block = half(ACT["attn"]) + half(ACT["ffn"])
    inputs = tokens * D * BLOCK_INPUT_F32 * 4 / sp
    b0, b1 = block_range or (0, facts.num_blocks)
    n = b1 - b0
    last = facts.num_blocks if layout.recompute_layers is None else layout.recompute_layers  # first N recomputed
    k = max(0, min(b1, last) - b0)  # recomputed blocks of this range
    if layout.recompute == "none" or k == 0:
        kept, extra = n * full_block, 0.0
    elif layout.recompute == "selective":
        kept, extra = k * (half(ACT["attn"]) + inputs / 2) + (n - k) * full_block, half(ACT["ffn"])
    else:
        kept, extra = k * inputs + (n - k) * full_block, full_block
    return int(kept * in_flight + extra)


def attention_buffer_bytes(facts: ModelFacts, layout: Layout, work: Workload, blocks: int | None = None,
                           in_flight: int = 1) -> int:
    """Softmax statistics kept for the backward (fp32, one per local head and query, every block): the fused /
    flash kernels never materialise the scores or the mask."""
    heads = facts.num_heads / (layout.tp * layout.cp)
    n = facts.num_blocks if blocks is None else blocks
    return int(n * in_flight * work.micro_batch * heads * (work.video_tokens(facts) + work.text_len) * 4)


def stage_blocks(facts: ModelFacts, layout: Layout, work: Workload) -> list[int]:
    """Blocks per pipeline stage: the trainer's cost-model cut (``mm.distributed.pipeline``)."""
    from mm.distributed.pipeline import resolve_stage_blocks

    return resolve_stage_blocks(facts.suv, layout.pp, None, work.latent_thw, work.text_len)


def stage_params(facts: ModelFacts, blocks: list[int]) -> list[tuple[int, int]]:
    """(TP-split, replicated) parameters of each pipeline chunk (meta-device builds, cached per cut)."""
    from mm.distributed.pipeline import block_ranges

    key = tuple(blocks)
    if key not in facts.stage_cache:
        facts.stage_cache[key] = [count_suv_params(facts.suv, r) for r in block_ranges(blocks)]
    return facts.stage_cache[key]


def boundary_bytes(facts: ModelFacts, layout: Layout, work: Workload, block: int) -> int:
    """The packed state a pipeline stage receives before ``block``: both streams and every live long skip."""
    from mm.models.sparse_ummdit import live_skips_at

    sp = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    return int((1 + live_skips_at(facts.suv, block)) * _tokens(facts, layout, work) / sp * facts.hidden
               * (2 if work.bf16 else 4))


def micro_batches(layout: Layout, work: Workload) -> int:
    return max(1, work.global_batch // max(1, work.micro_batch * layout.dp))


def stage_memory(facts: ModelFacts, layout: Layout, work: Workload, blocks: list[int] | None = None) -> list[dict]:
    """Per-rank memory of each pipeline stage (one entry at PP = 1): category -> bytes. ``blocks``: the stage cut
    (default: the trainer's cost-model cut)."""
    from mm.distributed.pipeline import block_ranges

    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    e = 2 if work.bf16 else 4
    master = 4 if work.bf16 else 0
    if layout.pp == 1:
        ranges, params, flights = [(0, facts.num_blocks)], [(facts.tp_split_params, facts.replicated_params)], [1]
    else:
        blocks = blocks or stage_blocks(facts, layout, work)
        ranges, params = block_ranges(blocks), stage_params(facts, blocks)
        m = micro_batches(layout, work)
        flights = [min(layout.pp - s, m) for s in range(layout.pp)]  # 1F1B: stage s holds PP - s micro-batches
    out = []
    for (b0, b1), (split, replicated), flight in zip(ranges, params, flights):
        P = split // layout.tp + replicated
        received = flight * boundary_bytes(facts, layout, work, b0) if b0 > 0 else 0
        out.append({
            "weights": P * e,
            "grads": P * 4,
            "optimizer": (8 + master) * P // shards,
            "ema": 4 * P // shards,
            "opt_step": int(OPT_STEP_F32 * 4 * P // shards),
            "activations": activation_bytes(facts, layout, work, (b0, b1), flight) + received,
            "attention": attention_buffer_bytes(facts, layout, work, b1 - b0, flight),
            "frozen": sum(facts.frozen_bytes.values()),
        })
    return out


def memory_per_rank(facts: ModelFacts, layout: Layout, work: Workload) -> dict:
    """The memory of the rank that needs the most (the fullest pipeline stage at PP > 1)."""
    return max(stage_memory(facts, layout, work), key=peak_bytes)


def checkpoint_bytes(total_params: int, bf16: bool) -> int:
    """One training checkpoint: the weights and the EMA model in the parameter dtype, and the optimizer's fp32
    state (Adam moments, EMA, and the master weights when the parameters are bf16)."""
    e = 2 if bf16 else 4
    return total_params * (2 * e + 4 * (4 if bf16 else 3))


def peak_bytes(memory: dict) -> int:
    """The optimizer step's working memory and the activations (with the attention buffers) are never alive
    together."""
    static = sum(v for k, v in memory.items() if k not in ("opt_step", "activations", "attention"))
    return static + max(memory["opt_step"], memory["activations"] + memory["attention"])


def _ring_seconds(nbytes: float, group: int, gbps: float) -> float:
    return 0.0 if group <= 1 else nbytes * (group - 1) / group / (gbps * GB)


def layout_problems(facts: ModelFacts, layout: Layout, work: Workload, num_devices: int) -> list[str]:
    p = []
    if layout.cp_algorithm == "hybrid" and not (1 < layout.ulysses_size < layout.cp and layout.cp % layout.ulysses_size == 0):
        p.append(f"hybrid CP needs a Ulysses degree strictly between 1 and CP {layout.cp} dividing it, got "
                 f"{layout.ulysses_degree}")
    if layout.tp * layout.cp * layout.pp * layout.dp != num_devices:
        p.append(f"TP x CP x PP x DP = {layout.tp * layout.cp * layout.pp * layout.dp} != {num_devices} devices")
    heads_split = layout.tp * layout.ulysses_size  # ring attention keeps all of a TP rank's heads
    if facts.num_heads % heads_split:
        p.append(f"heads {facts.num_heads} not divisible by TP x Ulysses CP = {heads_split}")
    if layout.pp > facts.num_blocks:
        p.append(f"PP {layout.pp} > the model's {facts.num_blocks} blocks")
    t = work.latent_thw[0]
    if layout.cp > 1 and (t % layout.cp or work.text_len % layout.cp):
        p.append(f"latent frames {t} / text tokens {work.text_len} not divisible by CP {layout.cp}")
    if layout.sequence_parallel and layout.tp > 1:
        lv, lt = work.video_tokens(facts) // layout.cp, work.text_len // layout.cp
        if lv % layout.tp or lt % layout.tp:
            p.append(f"SP needs video tokens {lv} and text tokens {lt} (per CP rank) divisible by TP {layout.tp}")
    if work.global_batch % (work.micro_batch * layout.dp):
        p.append(f"global batch {work.global_batch} not divisible by micro-batch {work.micro_batch} x DP {layout.dp}")
    return p


def estimate(facts: ModelFacts, layout: Layout, work: Workload, device: Device, num_devices: int,
             compute_efficiency: float = 0.5, headroom: float = HEADROOM) -> Estimate:
    from mm.distributed.pipeline import block_costs, block_ranges
    from mm.training.metrics import PEAK_TFLOPS, train_flops

    problems = layout_problems(facts, layout, work, num_devices)
    flops = train_flops(facts.flops_shape, work.latent_thw, work.text_len, work.global_batch)
    peak = PEAK_TFLOPS[device.peak_key] * 1e12
    micro = micro_batches(layout, work)
    stages = stage_memory(facts, layout, work) if layout.pp <= facts.num_blocks else [memory_per_rank(
        facts, dataclasses.replace(layout, pp=1), work)]
    memory = max(stages, key=peak_bytes)
    usable = device.memory_gb * (1 - headroom)  # allocator fragmentation, communication buffers, kernels' workspace
    if peak_bytes(memory) > usable * GB:
        problems.append(f"needs {peak_bytes(memory) / GB:.1f} GB > {usable:.1f} GB usable of {device.memory_gb:g} GB")
    recompute_factor = {"none": 1.0, "selective": 1.0 + 0.5 / 3, "full": 4.0 / 3}[layout.recompute]
    # the slowest pipeline stage sets the pace; (m + PP - 1) / m for the 1F1B fill and drain
    if layout.pp > 1 and layout.pp <= facts.num_blocks:
        blocks = stage_blocks(facts, layout, work)
        costs = block_costs(facts.suv, work.latent_thw, work.text_len)
        ranges = block_ranges(blocks)
        share = max(sum(costs[b0:b1]) for b0, b1 in ranges) / sum(costs)
        stage_blocks_max = max(blocks)
    else:
        share, stage_blocks_max, ranges = 1.0, facts.num_blocks, [(0, facts.num_blocks)]
    bubble = (micro + layout.pp - 1) / micro
    compute = flops * recompute_factor * share * layout.pp / num_devices / (peak * compute_efficiency)
    e = 2 if work.bf16 else 4
    act = _tokens(facts, layout, work) * facts.hidden * e  # one full-width activation of a micro-batch on a CP rank
    tp_bw = device.intra_node_gbps if layout.tp <= device.per_node else device.inter_node_gbps
    u, ring = layout.ulysses_size, layout.cp // layout.ulysses_size
    u_bw = device.intra_node_gbps if layout.tp * u <= device.per_node else device.inter_node_gbps
    ring_bw = device.intra_node_gbps if layout.tp * layout.cp <= device.per_node else device.inter_node_gbps
    dp_bw = device.intra_node_gbps if layout.tp * layout.cp * layout.dp <= device.per_node else device.inter_node_gbps
    pp_bw = device.intra_node_gbps if num_devices <= device.per_node else device.inter_node_gbps
    P = (memory["grads"] // 4)
    comm = {
        "tp": micro * stage_blocks_max * 8 * _ring_seconds(act, layout.tp, tp_bw),
        # Ulysses: 4 all-to-alls (q, k, v, out) each way; ring: K and V of the local tokens passed ring - 1 times
        # forward, K, V and their gradients backward (not overlapped with the attention here)
        "cp": micro * stage_blocks_max * (8 * _ring_seconds(act / layout.tp, u, u_bw)
                                          + 6 * (ring - 1) * act / layout.tp / (ring_bw * GB)),
        # one boundary state forward and its gradient backward per micro-batch, point to point
        "pp": micro * 2 * max((boundary_bytes(facts, layout, work, b0) for b0, _ in ranges[1:]), default=0) / (pp_bw * GB),
        # reduce-scatter fp32 grads + all-gather params, or one all-reduce (2x a reduce-scatter) of fp32 grads
        "dp": _ring_seconds(P * (4 + e) if layout.distributed_optimizer else 2 * 4 * P, layout.dp * layout.cp, dp_bw),
    }
    step = (compute + comm["tp"] + comm["cp"] + comm["pp"]) * bubble + comm["dp"]
    est = Estimate(layout, memory, step, flops / (step * num_devices * peak), comm, micro, problems)
    est.stage_peaks = [peak_bytes(m) for m in stages] if layout.pp > 1 else []
    return est


def enumerate_layouts(facts: ModelFacts, num_devices: int, per_node: int) -> list[Layout]:
    sizes = [1 << i for i in range(0, 12) if (1 << i) <= num_devices]
    out = []
    for tp in (s for s in sizes if s <= per_node):
        for pp in (s for s in sizes if s <= min(8, facts.num_blocks)):
            for cp in sizes:
                if num_devices % (tp * cp * pp):
                    continue
                algos = [("ulysses", None)] + ([("ring", None)] if cp > 1 else []) + [
                    ("hybrid", u) for u in sizes if 1 < u < cp]
                for algo, u in algos:
                    for distopt in (True, False):
                        for rc in RECOMPUTE:
                            out.append(Layout(tp, cp, num_devices // (tp * cp * pp), pp=pp, sequence_parallel=tp > 1,
                                              distributed_optimizer=distopt, recompute=rc, cp_algorithm=algo,
                                              ulysses_degree=u))
    return out


def plan(facts: ModelFacts, work: Workload, device: Device, num_devices: int, compute_efficiency: float = 0.5,
         headroom: float = HEADROOM):
    """(feasible ranked by step time, infeasible) estimates over all enumerated layouts."""
    ests = [estimate(facts, lay, work, device, num_devices, compute_efficiency, headroom)
            for lay in enumerate_layouts(facts, num_devices, device.per_node)]
    feasible = sorted((e for e in ests if e.feasible), key=lambda e: (e.step_seconds, e.total_bytes))
    return feasible, [e for e in ests if not e.feasible]


# ------------------------------------------------------------------------------------------ report
COLUMNS = ("layout", "distopt", "recompute", "GA", "weights", "grads", "optim", "ema", "act", "attn", "frozen",
           "peak", "step s", "MFU", "note")


def _row(e: Estimate) -> list[str]:
    head = [e.layout.label(), "y" if e.layout.distributed_optimizer else "n", e.layout.recompute, str(e.micro_batches)]
    m = e.memory
    gb = lambda v: f"{v / GB:.3g}"  # noqa: E731
    notes = list(e.problems)
    if e.stage_peaks:
        notes.insert(0, "stage peaks " + "/".join(f"{p / GB:.3g}" for p in e.stage_peaks) + " GB")
    return head + [gb(m["weights"]), gb(m["grads"]), gb(m["optimizer"]), gb(m["ema"]), gb(m["activations"]),
                   gb(m["attention"]), gb(m["frozen"]), gb(peak_bytes(m)), f"{e.step_seconds:.3g}",
                   f"{100 * e.mfu:.1f}%" if e.mfu is not None else "n/a", "; ".join(notes)]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--seq-shape must be FRAMESxHEIGHTxWIDTH (e.g. 121x576x1024), got {text!r}")
    f, h, w = map(int, parts)
    if (f - 1) % 8 or h % 16 or w % 16:
        raise ValueError(f"--seq-shape {text}: frames must be 8n+1 and height/width multiples of 16")
    return f, h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-layout memory and step-time estimates of SUV training on N devices.")
    p.add_argument("--mm-model", required=True, help="model JSON (upstream format)")
    p.add_argument("--num-devices", type=int, required=True)
    p.add_argument("--device", default="h100", choices=sorted(DEVICES), help="accelerator (peak, bandwidths, memory)")
    p.add_argument("--device-memory-gb", type=float, default=None, help="usable memory per device (default: the device's)")
    p.add_argument("--seq-shape", default="121x576x1024", help="FRAMESxHEIGHTxWIDTH of the training clips")
    p.add_argument("--text-len", type=int, default=512, help="text tokens per sample (T5 model_max_length)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the number of devices")
    p.add_argument("--feature-cache", action="store_true",
                   help="train from cached VAE latents and text features (no frozen encoders in memory)")
    p.add_argument("--fp32", action="store_true", help="fp32 parameters (default: bf16 with fp32 master weights)")
    p.add_argument("--compute-efficiency", type=float, default=0.5,
                   help="fraction of the peak the GEMMs and attention reach (default 0.5)")
    p.add_argument("--headroom", type=float, default=HEADROOM,
                   help="fraction of device memory kept free for fragmentation and communication buffers (default 0.1)")
    p.add_argument("--top", type=int, default=20, help="feasible layouts shown (all infeasible ones are counted)")
    p.add_argument("--show-infeasible", action="store_true", help="also list every infeasible layout with its reason")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_devices < 1:
            raise ValueError(f"--num-devices must be >= 1, got {args.num_devices}")
        if args.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
        if not 0 <= args.headroom < 1:
            raise ValueError(f"--headroom must be in [0, 1), got {args.headroom}")
        if not 0 < args.compute_efficiency <= 1:
            raise ValueError(f"--compute-efficiency must be in (0, 1], got {args.compute_efficiency}")
        frames, height, width = parse_shape(args.seq_shape)
        from mm.config_upstream import load_model_json
        from mm.ops import select_backend

        select_backend("cpu")  # the planner builds on the meta device only
        spec = load_model_json(args.mm_model)
        if args.feature_cache:
            spec = dataclasses.replace(spec, load_video_features=True, load_text_features=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = DEVICES[args.device]
    if args.device_memory_gb is not None:
        device = dataclasses.replace(device, memory_gb=args.device_memory_gb)
    facts = model_facts(spec)
    work = Workload.from_pixels(facts, frames, height, width, text_len=args.text_len, micro_batch=args.micro_batch_size,
                                global_batch=args.global_batch_size or args.num_devices * args.micro_batch_size,
                                bf16=not args.fp32)
    feasible, infeasible = plan(facts, work, device, args.num_devices, args.compute_efficiency, args.headroom)
    if args.json:
        print(json.dumps({"feasible": [dict(layout=dataclasses.asdict(e.layout), peak_gb=peak_bytes(e.memory) / GB,
                                            step_s=e.step_seconds, mfu=e.mfu) for e in feasible],
                          "infeasible": [dict(layout=dataclasses.asdict(e.layout), problems=e.problems)
                                         for e in infeasible]}))
        return 0
    print(f"SUV {facts.total_params:,} params; {args.num_devices} x {device.name} ({device.memory_gb:g} GB); clips "
          f"{frames}x{height}x{width} -> latents {'x'.join(map(str, work.latent_thw))}, "
          f"{work.video_tokens(facts)} video + {work.text_len} text tokens; global batch {work.global_batch}, "
          f"micro-batch {work.micro_batch}; {'bf16' if work.bf16 else 'fp32'}; GB = 1e9 bytes per rank; feasible = "
          f"peak <= {device.memory_gb * (1 - args.headroom):.1f} GB; step time at {args.compute_efficiency:g} of peak")
    for note in facts.frozen_notes:
        print(f"note: {note}")
    shown = feasible[: args.top]
    print(f"\n{len(feasible)} feasible layouts (fastest first; {len(shown)} shown):")
    print(format_table([list(COLUMNS)] + [_row(e) for e in shown]) if shown else "  none")
    print(f"\n{len(infeasible)} infeasible layouts" + (":" if args.show_infeasible else " (--show-infeasible lists them)"))
    if args.show_infeasible and infeasible:
        print(format_table([list(COLUMNS)] + [_row(e) for e in infeasible]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
