"""Pipeline parallelism of the U-shaped SUV on megatron-core's own schedules (SCALING_NOTES.md §1).

megatron's ``backward_step`` backpropagates only the first output of a stage, and the interleaved schedule
moves one tensor per boundary, so everything that crosses a boundary is packed into ONE sequence-first
tensor: ``[x ; y ; xs_0 ; ys_0 ; ...]`` along the sequence dim, ``[S_pack, B, D]`` with
``S_pack = (1 + live skips) * (Lv' + Lt')`` (this rank's SP/CP chunk lengths). The live long skips ride
through the stages in between; ``torch.cat`` routes their gradients back to the producing stage. The shape
changes with the boundary and the bucket, so ``variable_seq_lengths`` is on (shapes are exchanged first);
the interleaved schedule takes one shape, so there every boundary is zero-padded to the longest one.

* :func:`block_costs` / :func:`balanced_stage_blocks`: stage cuts from a cost model that knows skiparse
  (per block: linear FLOPs + attention FLOPs at sparsity k, from ``mm.training.metrics``) at the run's
  sequence length, or an explicit ``--pipeline-stage-blocks`` list; :func:`stage_plan_text` prints them.
* :func:`build_pipeline_chunks`: this rank's model chunks (one, or ``vpp`` interleaved ones: chunk ``v`` of
  PP rank ``r`` holds virtual stage ``v * pp + r``), each a :class:`SparseUMMDiT` over a block range.
* :func:`pack_state` / :func:`unpack_state`: the boundary tensor, in this one place.
* :func:`run_chunk`: one chunk's forward inside megatron's ``forward_step`` (unpack, model, pack).
* :class:`ChunkGroup` / :class:`MicroBatchFeed`: a rank's interleaved chunks as one model for checkpoints and
  the EMA, and the one read of each micro-batch that all of them run.
* :func:`configure_pipeline`: what the schedules and ``finalize_model_grads`` read (pipeline dtype,
  variable shapes, ``batch_p2p_comm=False`` at PP = 2 with VPP, the conditioning embedder replicated on
  every chunk: grads all-reduced over PP, own DDP bucket, counted once in the grad norm).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mm.models.sparse_ummdit import SparseUMMDiT, StageState, live_skips_at
from mm.models.suv_config import SUVConfig
from mm.training.metrics import SUVShape, suv_block_flops


# ------------------------------------------------------------------------------------------- stage cuts
def block_costs(cfg: SUVConfig, latent_thw: tuple[int, int, int], text_len: int) -> list[float]:
    """Forward FLOPs of each global block at this sequence length (linear + attention / k, skiparse-aware)."""
    shape = SUVShape(tuple(cfg.num_layers), tuple(cfg.effective_sparse_n()), cfg.hidden_size,
                     cfg.timestep_embed_dim, cfg.patch_size, cfg.patch_size_t)
    return suv_block_flops(shape, latent_thw, text_len)


def balanced_stage_blocks(costs: Sequence[float], num_chunks: int) -> list[int]:
    """Blocks per pipeline chunk (contiguous, >= 1 each) minimising the most expensive chunk; ties go to the
    cut that leaves the later chunks lighter (the last stage also runs the head and the loss)."""
    n = len(costs)
    if not 1 <= num_chunks <= n:
        raise ValueError(f"cannot cut {n} blocks into {num_chunks} pipeline chunks (allowed 1..{n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: minimal max-cost of splitting the first i blocks into j chunks; cut[j][i]: start of the last one
    best = [[inf] * (n + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for j in range(1, num_chunks + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i] * (1 - 1e-12):
                    best[j][i], cut[j][i] = v, s
    sizes, i = [], n
    for j in range(num_chunks, 0, -1):
        s = cut[j][i]
        sizes.append(i - s)
        i = s
    return sizes[::-1]


def resolve_stage_blocks(cfg: SUVConfig, num_chunks: int, explicit: Sequence[int] | None,
                         latent_thw: tuple[int, int, int], text_len: int) -> list[int]:
    """The explicit list (checked: ``num_chunks`` entries summing to the model's blocks) or the cost model's."""
    if explicit is None:
        return balanced_stage_blocks(block_costs(cfg, latent_thw, text_len), num_chunks)
    explicit = list(explicit)
    if len(explicit) != num_chunks or sum(explicit) != cfg.num_blocks or min(explicit) < 1:
        raise ValueError(f"--pipeline-stage-blocks {','.join(map(str, explicit))}: need {num_chunks} counts >= 1 "
                         f"(PP x VPP chunks) summing to the model's {cfg.num_blocks} blocks")
    return explicit


def block_ranges(stage_blocks: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in stage_blocks:
        out.append((start, start + n))
        start += n
    return out


def stage_plan_text(cfg: SUVConfig, stage_blocks: Sequence[int], pp: int, latent_thw, text_len: int) -> str:
    """One line per virtual stage: its PP rank, blocks, live skips received and estimated cost share."""
    costs = block_costs(cfg, latent_thw, text_len)
    total = sum(costs)
    lines = []
    for v, (b0, b1) in enumerate(block_ranges(stage_blocks)):
        share = sum(costs[b0:b1]) / total
        lines.append(f"stage {v} (PP rank {v % pp}, chunk {v // pp}): blocks {b0}-{b1 - 1} ({b1 - b0}), "
                     f"receives {live_skips_at(cfg, b0)} skips, est. cost {100 * share:.1f}% "
                     f"({sum(costs[b0:b1]) / 1e12:.3g} TFLOP fwd/sample)")
    return "pipeline stages (cost model at latent %s, %d text tokens):\n  " % ("x".join(map(str, latent_thw)),
                                                                                  text_len) + "\n  ".join(lines)


# ------------------------------------------------------------------------------------------- chunks
def build_pipeline_chunks(cfg: SUVConfig, parallel, stage_blocks: Sequence[int], params_dtype: torch.dtype, *,
                          vpp: int = 1, device=None) -> list[SparseUMMDiT]:
    """This PP rank's model chunks in schedule order (chunk v holds virtual stage ``v * pp + pp_rank``)."""
    pp, rank = parallel.pp_size, parallel.pp_rank
    ranges = block_ranges(stage_blocks)
    assert len(ranges) == pp * vpp, (stage_blocks, pp, vpp)
    chunks = []
    for v in range(vpp):
        index = v * pp + rank
        chunks.append(SparseUMMDiT(cfg, parallel, params_dtype, device=device, block_range=ranges[index],
                                   pipeline_replica=index))
    return chunks


def _set_input_tensor(chunk: SparseUMMDiT, tensors) -> None:
    """megatron's schedules hand a stage its received activation as a one-element list ([None] when first)."""
    chunk.pipeline_input = tensors[0] if isinstance(tensors, (list, tuple)) else tensors


def configure_pipeline(chunks: Sequence[SparseUMMDiT], parallel, vpp: int = 1) -> None:
    """Hooks and flags megatron's schedules and ``finalize_model_grads`` read, on every chunk's config.

    The replicated ``time_text_embed`` parameters are tagged ``pipeline_parallel`` (their grads are
    all-reduced over the PP group after the DP reduction, megatron's ``_allreduce_conditional_embedding_grads``),
    ``shared_embedding`` (each gets its own DDP bucket, so under the distributed optimizer every PP stage
    shards them identically over DP and the PP all-reduce sums matching shards) and, except on chunk 0,
    ``shared`` (the grad norm counts one copy)."""
    for chunk in chunks:
        cfg = chunk.config
        cfg.pipeline_dtype = chunk.params_dtype
        # 1F1B: exact boundary shapes, exchanged before each p2p. Interleaved: one shape for every boundary
        # (the schedule's seq_length, :func:`schedule_seq_length`), the packed tensor zero-padded to it; its
        # batched shape exchange would also swap shapes at PP = 2, where the previous and next rank coincide.
        cfg.variable_seq_lengths = vpp == 1
        cfg.has_cond_embedder = parallel.pp_size > 1
        cfg.pipeline_model_parallel_size = parallel.pp_size
        cfg.microbatch_group_size_per_vp_stage = parallel.pp_size  # megatron's default (set at PP = 1 before)
        if vpp > 1:
            cfg.virtual_pipeline_model_parallel_size = vpp
            if parallel.pp_size == 2:  # batched p2p swaps tensors at PP = 2 with VPP (MEGATRON_CPU.md §4)
                cfg.batch_p2p_comm = False
        chunk.share_embeddings_and_output_weights = False  # finalize_model_grads asks the first/last stages
        chunk.pipeline_input = None
        chunk.set_input_tensor = lambda tensors, chunk=chunk: _set_input_tensor(chunk, tensors)
        if parallel.pp_size > 1:
            for p in chunk.time_text_embed.parameters():
                p.pipeline_parallel = True
                p.shared_embedding = True
                p.shared = chunk.pipeline_replica != 0


# ------------------------------------------------------------------------------------------- boundary tensor
def stream_lengths(chunk: SparseUMMDiT, latents: torch.Tensor, text_len: int) -> tuple[int, int]:
    """This rank's video / text token counts at a boundary (the model's SP and CP chunks)."""
    cfg = chunk.suv_config
    _, _, T, H, W = latents.shape
    lv, lt = chunk.padded_lengths(T * (H // cfg.patch_size) * (W // cfg.patch_size), text_len)  # CP padding
    div = chunk.cp.size * (chunk.tp.size if chunk.tp.sequence_parallel else 1)
    return lv // div, lt // div


def pack_state(state: StageState) -> torch.Tensor:
    """``StageState`` -> ``[S_pack, B, D]`` (a fresh tensor: megatron frees sent outputs, not views)."""
    parts = [state.x, state.y]
    for xs, ys in state.skips:
        parts += [xs, ys]
    assert len({p.dtype for p in parts}) == 1, [p.dtype for p in parts]
    return torch.cat(parts, dim=0)


def unpack_state(packed: torch.Tensor, lengths: tuple[int, int], num_skips: int) -> StageState:
    """Inverse of :func:`pack_state` (views of the received buffer, so gradients reach it); a zero padding
    after the packed streams (interleaved schedule) is ignored."""
    lv, lt = lengths
    used = (1 + num_skips) * (lv + lt)
    assert packed.shape[0] >= used, (tuple(packed.shape), lengths, num_skips)
    parts = torch.split(packed, [lv, lt] * (1 + num_skips) + [packed.shape[0] - used], dim=0)
    return StageState(parts[0], parts[1], [(parts[2 + 2 * i], parts[3 + 2 * i]) for i in range(num_skips)])


def _padded_length(cfg: SUVConfig, lengths: tuple[int, int]) -> int:
    """The one boundary length of the interleaved schedule: room for the most skips alive at any cut."""
    most = max(live_skips_at(cfg, b) for b in range(cfg.num_blocks + 1))
    return (1 + most) * sum(lengths)


def schedule_seq_length(chunk: SparseUMMDiT, latents: torch.Tensor, text_len: int) -> int:
    """The ``seq_length`` to give megatron's schedule (it divides by CP, and by TP under SP): only the
    interleaved schedule reads it."""
    div = chunk.cp.size * (chunk.tp.size if chunk.tp.sequence_parallel else 1)
    return div * _padded_length(chunk.suv_config, stream_lengths(chunk, latents, text_len))


def run_chunk(module, chunk: SparseUMMDiT, latents, timestep, text_hidden, text_mask, pooled, video_mask=None):
    """One chunk's forward as megatron's ``forward_step`` calls it: ``module`` is the (DDP-wrapped) chunk.
    Returns the velocity on the last chunk, the packed boundary tensor on the others."""
    state = None
    lengths = stream_lengths(chunk, latents, text_hidden.shape[-2])
    if not chunk.pre_process:
        state = unpack_state(chunk.pipeline_input, lengths, live_skips_at(chunk.suv_config, chunk.block_range[0]))
    out = module(latents, timestep, text_hidden, text_mask, pooled, video_mask, stage_input=state)
    if chunk.post_process:
        return out
    packed = pack_state(out)
    if not chunk.config.variable_seq_lengths:  # interleaved: one shape for every boundary
        packed = F.pad(packed, (0, 0, 0, 0, 0, _padded_length(chunk.suv_config, lengths) - packed.shape[0]))
    return packed


# ------------------------------------------------------------------------------------------- trainer
def data_latent_shape(data_cfg) -> tuple[tuple[int, int, int], int]:
    """(latent t, h, w) and text length of the data config's largest sample: the cost model's sequence."""
    t = (data_cfg.num_frames - 1) // data_cfg.ae_stride_t + 1
    return (t, data_cfg.max_height // data_cfg.ae_stride, data_cfg.max_width // data_cfg.ae_stride), \
        data_cfg.model_max_length


def trainer_chunk_kwargs(cfg: SUVConfig, parallel, parallel_cfg, data_cfg, seed: int) -> tuple[list[dict], str | None]:
    """``SparseUMMDiT`` keywords of this rank's chunks for the trainer (one per virtual stage it holds), and
    the stage plan to print (None at PP = 1). Every layout initialises from per-module streams of ``seed``,
    so PP = N starts from the weights PP = 1 starts from."""
    if parallel.pp_size == 1:
        return [{"init_seed": seed}], None
    pp, vpp = parallel.pp_size, parallel_cfg.virtual_pipeline_model_parallel_size or 1
    thw, text_len = data_latent_shape(data_cfg)
    blocks = resolve_stage_blocks(cfg, pp * vpp, parallel_cfg.pipeline_stage_blocks, thw, text_len)
    ranges = block_ranges(blocks)
    kwargs = [{"init_seed": seed, "block_range": ranges[v * pp + parallel.pp_rank],
               "pipeline_replica": v * pp + parallel.pp_rank} for v in range(vpp)]
    return kwargs, stage_plan_text(cfg, blocks, pp, thw, text_len)


class ChunkGroup:
    """A rank's interleaved model chunks seen as one model by checkpointing, the EMA and the summary: one flat
    key space, the released names, except that the conditioning embedder replicated on chunk ``v > 0`` is
    ``vpp<v>/time_text_embed.*`` (its sharded tensors keep the released storage key with their own replica
    id, so checkpoints stay layout-free)."""

    EMBEDDER = "time_text_embed."

    def __init__(self, chunks: Sequence[SparseUMMDiT]):
        self.chunks = list(chunks)
        self.suv_config = self.chunks[0].suv_config

    def _name(self, v: int, name: str) -> str:
        return f"vpp{v}/{name}" if v and name.startswith(self.EMBEDDER) else name

    def named_parameters(self):
        for v, chunk in enumerate(self.chunks):
            for name, p in chunk.named_parameters():
                yield self._name(v, name), p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def train(self, mode: bool = True) -> "ChunkGroup":
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    def state_dict(self) -> dict:
        return {self._name(v, k): t for v, chunk in enumerate(self.chunks) for k, t in chunk.state_dict().items()}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: dict | None = None) -> dict:
        out = {}
        for v, chunk in enumerate(self.chunks):
            for k, sh in chunk.sharded_state_dict(prefix, sharded_offsets, metadata).items():
                out[self._name(v, k[len(prefix):]) if k.startswith(prefix + self.EMBEDDER) and v else k] = sh
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Each chunk takes its keys (``vpp<v>/`` ones for its embedder); returns (missing, unexpected)."""
        missing, used = [], set()
        for v, chunk in enumerate(self.chunks):
            mine = {}
            for k in chunk.state_dict():
                key = self._name(v, k)
                if key in state_dict:
                    mine[k] = state_dict[key]
                    used.add(key)
                else:
                    missing.append(key)
            chunk.load_state_dict(mine, strict=strict)
        return missing, sorted(set(state_dict) - used)


def loss_from_last_stage(loss: torch.Tensor, parallel) -> torch.Tensor:
    """The last pipeline stage computes the loss; every PP rank gets it (broadcast over the PP group)."""
    if parallel.pp_size == 1:
        return loss
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return loss


def pipeline_problems(cfg: SUVConfig, parallel_cfg, num_microbatches: int | None = None) -> list[str]:
    """What makes a pipeline layout unusable for this model, one message each (empty at PP = 1)."""
    pp, vpp = parallel_cfg.pipeline_model_parallel_size, parallel_cfg.virtual_pipeline_model_parallel_size or 1
    problems = []
    if vpp > 1 and num_microbatches is not None and num_microbatches % pp:
        problems.append(f"--virtual-pipeline-model-parallel-size {vpp}: the interleaved schedule runs micro-batches "
                        f"in groups of PP = {pp}; {num_microbatches} micro-batches per step is not a multiple")
    if pp * vpp > cfg.num_blocks:
        problems.append(f"--pipeline-model-parallel-size {pp} x virtual {vpp} = {pp * vpp} chunks: the SUV has only "
                        f"{cfg.num_blocks} blocks")
    blocks = parallel_cfg.pipeline_stage_blocks
    if blocks is not None and sum(blocks) != cfg.num_blocks:
        problems.append(f"--pipeline-stage-blocks {','.join(map(str, blocks))} sums to {sum(blocks)}; the SUV has "
                        f"{cfg.num_blocks} blocks")
    return problems


class MicroBatchFeed:
    """Each micro-batch read once and handed (the same object) to every model chunk of this rank: the
    interleaved schedule asks each chunk for its own data iterator and runs the chunks' forwards in its own
    order."""

    def __init__(self, source, num_chunks: int):
        from collections import deque

        self.source = source
        self.queues = [deque() for _ in range(num_chunks)]

    def _pull(self) -> None:
        item = next(self.source)
        for q in self.queues:
            q.append(item)

    def peek(self):
        if not self.queues[0]:
            self._pull()
        return self.queues[0][0]

    def iterator(self, chunk: int):
        while True:
            if not self.queues[chunk]:
                self._pull()
            yield self.queues[chunk].popleft()
