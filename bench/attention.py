"""Skiparse vs dense attention, and the full SUV vs its dense mode, on the current backend (spec §2.6).

1. Attention at equal sequence length: ``joint_attention`` (regroup + one ``mm.ops.attention`` call +
   inverse regroup) over ``S`` video tokens, dense (k = 1) vs skiparse k = 2, 4, 8, forward + backward.
   Measured video-only and with a short text stream (text is replicated k times, so its share grows with k).
2. Full SUV forward + backward at the released depth/sparsity layout and a reduced width vs the same
   weights with ``set_sparsity(dense=True)``.

Variants are timed interleaved in one process (medians), so background load hits both alike. Prints a
table; the last line is one JSON object:
``{"bench": "attention", "seq_len": S, "attention_speedup": {"2": .., "4": .., "8": ..},
"suv_vs_dense_step_speedup": ..}`` (speed-up = dense time / sparse time; attention numbers video-only).

    python bench/attention.py [--seq-len 4096] [--heads 4] [--head-dim 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each callable, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_attention(seq_len: int, text_len: int, heads: int, head_dim: int, repeats: int) -> dict[int, float]:
    from mm.models.attention import joint_attention

    g = torch.Generator().manual_seed(0)
    B = 1
    leaves = [torch.randn(n, B, heads, head_dim, generator=g).requires_grad_()
              for n in (seq_len, seq_len, seq_len, text_len, text_len, text_len)]
    # dense incoming gradients (a .sum() would hand SDPA a stride-0 grad, a slow path unlike training)
    grad_v = torch.randn(seq_len, B, heads, head_dim, generator=g)
    grad_t = torch.randn(text_len, B, heads, head_dim, generator=g)

    def step(k: int, group: bool):
        def run():
            for t in leaves:
                t.grad = None
            q, kk, v, qt, kt, vt = leaves
            ov, ot = joint_attention(q, kk, v, qt, kt, vt, sparse_k=k, group=group, key_mask=None,
                                     scale=head_dim ** -0.5)
            torch.autograd.backward([ov, ot], [grad_v, grad_t])
        return run

    fns = {1: step(1, False)}
    for k in (2, 4, 8):
        fns[k] = step(k, True)  # group-skip (the costlier regroup of the two)
    return _time_interleaved(fns, repeats)


def bench_suv(seq_len: int, heads: int, head_dim: int, repeats: int) -> tuple[float, float]:
    from mm.models import SparseUMMDiT
    from mm.models.suv_config import SUVConfig

    cfg = SUVConfig(num_heads=heads, head_dim=head_dim, in_channels=16, out_channels=16, timestep_embed_dim=128,
                    caption_channels=64, pooled_projection_dim=64)  # released depth and sparse_n, reduced width
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).train()
    side = int(round((seq_len // 4) ** 0.5))
    if 4 * side * side != seq_len:
        raise ValueError(f"--seq-len must be 4 * n^2 for the SUV benchmark (4 frames of n x n tokens), got {seq_len}")
    g = torch.Generator().manual_seed(1)
    B, L = 1, 64
    inputs = (torch.randn(B, 16, 4, 2 * side, 2 * side, generator=g), torch.tensor([500.0]),
              torch.randn(B, L, 64, generator=g), torch.ones(B, L), torch.randn(B, 64, generator=g))

    def step(dense: bool):
        def run():
            model.set_sparsity(dense=dense)
            model.zero_grad(set_to_none=True)
            model(*inputs).square().mean().backward()
        return run

    t = _time_interleaved({"dense": step(True), "suv": step(False)}, repeats, warmup=0)
    model.set_sparsity()
    return t["dense"], t["suv"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096, help="video tokens (4 * n^2)")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--suv-repeats", type=int, default=2)
    ap.add_argument("--suv-width", type=int, nargs=2, default=(2, 32), metavar=("HEADS", "HEAD_DIM"),
                    help="reduced SUV width (the released model is 24 x 128)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: stable timings on a shared, oversubscribed CPU)")
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()

    from mm.ops import select_backend

    backend = select_backend(args.backend)
    torch.set_num_threads(args.threads)
    S = args.seq_len
    print(f"backend {backend.name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"S = {S} video tokens, B = 1, forward + backward, median of interleaved runs")

    video_only = bench_attention(S, 0, args.heads, args.head_dim, args.repeats)
    with_text = bench_attention(S, args.text_len, args.heads, args.head_dim, args.repeats)
    print(f"\nattention, {args.heads} heads x {args.head_dim}")
    print(f"{'k':>3} | {'video-only ms':>13} | {'speed-up':>8} | {'/k':>5} | {f'+{args.text_len} text ms':>13} | {'speed-up':>8} | {'/k':>5}")
    print("-" * 74)
    speedup = {}
    for k in (1, 2, 4, 8):
        s1, s2 = video_only[1] / video_only[k], with_text[1] / with_text[k]
        speedup[k] = s1
        print(f"{k:>3} | {video_only[k] * 1e3:13.1f} | {s1:8.2f} | {s1 / k:5.2f} | {with_text[k] * 1e3:13.1f} | {s2:8.2f} | {s2 / k:5.2f}")

    dense_t, suv_t = bench_suv(S, *args.suv_width, args.suv_repeats)
    print(f"\nfull SUV (num_layers [2,4,6,8,6,4,2], sparse_n [1,2,4,8,4,2,1]), width {args.suv_width[0]}x{args.suv_width[1]}, "
          f"{S} video + 64 text tokens, forward + backward")
    print(f"{'variant':>16} | {'step s':>7} | speed-up")
    print("-" * 38)
    print(f"{'dense mode':>16} | {dense_t:7.2f} | 1.00")
    print(f"{'SUV (skiparse)':>16} | {suv_t:7.2f} | {dense_t / suv_t:.2f}")

    print(json.dumps({
        "bench": "attention",
        "seq_len": S,
        "attention_speedup": {str(k): round(speedup[k], 3) for k in (2, 4, 8)},
        "suv_vs_dense_step_speedup": round(dense_t / suv_t, 3),
    }))


if __name__ == "__main__":
    main()
