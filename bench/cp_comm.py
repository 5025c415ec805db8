"""Bytes moved per SUV block by each context-parallel algorithm, analytic and measured (issue 15).

Runs the tiny SUV layout (7 stages, 14 blocks) on gloo ranks with every stage at one sparsity k
(``set_sparsity([k] * 7)``), one forward + backward per algorithm, and counts the bytes each rank *sends*
in the collectives the CP code issues: all-to-all (``(CP-1)/CP`` of its input leaves the rank), ring
point-to-point sends, all-gather (its input to CP-1 peers) and reduce-scatter (``(CP-1)/CP`` of its input).
The CP input split and output gather (the same for every algorithm) are not counted. Measured = the total /
14 blocks (it includes the layout changes at stage ends); analytic = the steady-state formula per block:

  with V = video and T = caption bytes of one rank's hidden chunk ``[L'/CP, B, D]``, f = (CP-1)/CP:
  * Ulysses:   q, k, v, out all-to-alls, forward and backward: 8 (V+T) f
  * ring:      K/V blocks CP-1 shifts forward and backward, fp32 dK/dV CP shifts: 4 X (CP-1) + 2 X CP w, with
               X = V + k T (the caption is joined to each of the k sub-sequences) and w = 4 bytes / element size
  * hybrid U x R: Ulysses over U then the ring over R: 8 (V+T)(U-1)/U + 4 X (R-1) + 2 X R w
  * skiparse (CP divides k): hidden re-shards forward and backward 2 V f (n+1)/n (a stage of n blocks
    changes layout n+1 times: in, between blocks, out; n = 2 here), caption q/k/v all-gather and its
    reduce-scatter backward 6 T (CP-1), fp32 caption-output reduce-scatter and its all-gather 2 T CP f w;
    k = 1 or CP not dividing k: Ulysses (the heads allow it here)

Prints a table per CP size and one JSON line ``{"bench": "cp_comm", "ratio_vs_ulysses": {"cp2": {"skiparse_k4":
measured / Ulysses, ...}}, ...}``.

    python bench/cp_comm.py [--cp 2 4] [--frames 8 --size 32 --text-len 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

BLOCKS = 14
SPARSITY = (1, 2, 4, 8)


def _algos(cp: int) -> list[tuple[str, dict]]:
    out = [("ulysses", {"context_parallel_algo": "ulysses_cp_algo"}),
           ("ring", {"context_parallel_algo": "megatron_cp_algo"})]
    if cp == 4:
        out.append(("hybrid2x2", {"context_parallel_algo": "hybrid_cp_algo", "ulysses_degree_in_cp": 2}))
    out.append(("skiparse", {"context_parallel_algo": "skiparse_cp_algo"}))
    return out


def _count_collectives(counter: collections.Counter) -> None:
    """Wrap the torch.distributed calls the CP code reaches (directly or through megatron's mappings)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    def nbytes(t):
        return t.numel() * t.element_size()

    a2a, p2p = dist.all_to_all_single, dist.batch_isend_irecv
    gather, scatter = mappings.dist_all_gather_func, mappings.dist_reduce_scatter_func

    def all_to_all_single(output, input, *args, group=None, **kw):
        n = dist.get_world_size(group)
        counter["bytes"] += nbytes(input) * (n - 1) // n
        return a2a(output, input, *args, group=group, **kw)

    def batch_isend_irecv(ops):
        counter["bytes"] += sum(nbytes(op.tensor) for op in ops if op.op is dist.isend)
        return p2p(ops)

    def all_gather(output, input, group=None, **kw):
        counter["bytes"] += nbytes(input) * (dist.get_world_size(group) - 1)
        return gather(output, input, group=group, **kw)

    def reduce_scatter(output, input, group=None, **kw):
        n = dist.get_world_size(group)
        counter["bytes"] += nbytes(input) * (n - 1) // n
        return scatter(output, input, group=group, **kw)

    dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
    mappings.dist_all_gather_func, mappings.dist_reduce_scatter_func = all_gather, reduce_scatter


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.models import SparseUMMDiT
    from mm.models.suv_config import SUVConfig, tiny_suv_config
    from mm.ops import select_backend

    select_backend("cpu")
    counter: collections.Counter = collections.Counter()
    _count_collectives(counter)
    cfg = SUVConfig.from_upstream({**tiny_suv_config(), "num_heads": 4})
    g = torch.Generator().manual_seed(0)
    B, T, S, L = 1, args.frames, args.size, args.text_len
    latents = torch.randn(B, cfg.in_channels, T, S, S, generator=g)
    text = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask, pooled, t = torch.ones(B, L), torch.randn(B, cfg.pooled_projection_dim, generator=g), torch.tensor([500.0])
    rows = []
    for name, par in _algos(world):
        ps = init_parallel(ParallelConfig(context_parallel_size=world, **par))
        torch.manual_seed(0)
        model = SparseUMMDiT(cfg, ps)
        for k in SPARSITY:
            model.set_sparsity([k] * cfg.num_stages)
            counter.clear()
            model(latents, t, text, mask, pooled).square().mean().backward()
            rows.append((name, k, counter["bytes"] / BLOCKS))
    if rank == 0:
        lv, lt = model.padded_lengths(T * (S // 2) ** 2, L)
        queue.put((rows, lv, lt))


def analytic(name: str, k: int, cp: int, video_bytes: float, text_bytes: float, elem: int = 4,
             blocks_per_stage: int = 2) -> float:
    """Bytes one rank sends per block (forward + backward), see the module docstring."""
    V, Tb, f, w = video_bytes, text_bytes, (cp - 1) / cp, 4 / elem
    uly, X = 8 * (V + Tb) * f, V + k * Tb
    if name == "ulysses":
        return uly
    if name == "ring":
        return 4 * X * (cp - 1) + 2 * X * cp * w
    if name.startswith("hybrid"):
        u, r = 2, cp // 2
        return 8 * (V + Tb) * (u - 1) / u + 4 * X * (r - 1) + 2 * X * r * w
    if k > 1 and k % cp == 0:  # skiparse, whole sub-sequences per rank
        n = blocks_per_stage
        return 2 * V * f * (n + 1) / n + 6 * Tb * (cp - 1) + 2 * Tb * cp * f * w
    return uly


def run(cp: int, args) -> dict:
    from mm.distributed.init import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(cp, free_port(), args, queue), nprocs=cp, start_method="spawn")
    rows, lv, lt = queue.get()
    D = 4 * 16
    V, Tb = lv // cp * D * 4, lt // cp * D * 4  # fp32, B = 1
    table = {(n, k): b for n, k, b in rows}
    print(f"\nCP {cp}: video {lv} tokens, caption {lt} (padded), hidden {D}, fp32; KB per block per rank "
          "(forward + backward), measured / analytic, and measured / Ulysses")
    print(f"{'algorithm':<11}" + "".join(f"{'k=' + str(k):>26}" for k in SPARSITY))
    ratios = {}
    for name, _ in _algos(cp):
        cells = []
        for k in SPARSITY:
            m, a = table[(name, k)], analytic(name, k, cp, V, Tb)
            r = m / table[("ulysses", k)]
            ratios[f"{name}_k{k}"] = round(r, 3)
            cells.append(f"{m / 1e3:8.1f} /{a / 1e3:8.1f}  x{r:5.2f}")
        print(f"{name:<11}" + "".join(f"{c:>26}" for c in cells))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="CP sizes (processes) to measure")
    ap.add_argument("--frames", type=int, default=8, help="latent frames")
    ap.add_argument("--size", type=int, default=32, help="latent height = width (patch 2)")
    ap.add_argument("--text-len", type=int, default=32, help="caption tokens")
    args = ap.parse_args()
    bad = [c for c in args.cp if c not in (2, 4)]
    if bad:
        print(f"error: --cp {bad[0]}: the tiny SUV has 4 heads and sparsity up to 8, use 2 or 4", file=sys.stderr)
        sys.exit(2)
    out = {f"cp{cp}": run(cp, args) for cp in args.cp}
    print(json.dumps({"bench": "cp_comm", "ratio_vs_ulysses": out}))


if __name__ == "__main__":
    main()
