"""WFVAE encode/decode throughput and peak memory, temporally tiled vs untiled, on this CPU (spec §4.7).

The released architecture (depth, blocks, 32 latent channels) at a reduced channel width, random
weights, fp32. Every (operation, tiling, frame count) runs in its own subprocess so that one run's heap
does not hide another's peak:

* one untimed warm-up call first (oneDNN creates and caches its kernels per shape on first use);
* peak memory = peak RSS during the next call minus the RSS just before it (model, input and kernel
  caches already resident). The kernel's peak counter is reset through ``/proc/self/clear_refs`` and
  glibc's mmap threshold is lowered in the worker so freed activation buffers go back to the OS;
* throughput = batch x frames (pixel frames in or out) / the fastest of that call and ``--repeats - 1``
  more.

Tiled peak memory is bounded by the largest chunk (encode: 8 frames, decode: 4 latents + 1
look-ahead), so it stays flat as frames grow apart from the output buffer itself; untiled grows with
the frame count. The default batch is 2 because with batch 1 PyTorch's CPU conv3d switches to an
im2col kernel (about 27x the input in scratch memory, and 2x slower) whenever channels x frames x
height <= 20480, which the short chunks of a reduced-width model hit; that CPU-only artefact would
dominate the tiled numbers (``--batch 1`` shows it). GPUs do not have it. Prints a table; the last line
is one JSON object: ``{"bench": "wfvae", "frames": [F1, F2], "encode_fps": {"tiled": [..], "untiled":
[..]}, "decode_fps": {...}, "peak_mb": {"tiled": [m1, m2], "untiled": [m1, m2]}}`` where ``peak_mb``
is the larger of the encode and decode peaks.

    python bench/wfvae.py [--frames 41 121] [--size 128] [--base-channels 16] [--batch 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPS = ("encode", "decode")
MODES = ("untiled", "tiled")


def _rss_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(args: argparse.Namespace) -> dict:
    import torch

    from mm.ops import select_backend

    select_backend(args.backend, patch_megatron=False)  # the VAE needs no megatron
    from mm.models.wfvae import WFVAE, released_wfvae_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width = args.base_channels
    config = {
        **released_wfvae_config(),
        "base_channels": width,
        "encoder_energy_flow_hidden_size": width,
        "decoder_energy_flow_hidden_size": width,
        "use_tiling": args.mode == "tiled",
    }
    vae = WFVAE.from_upstream(config)
    t, h, w = vae.latent_size(args.num_frames, args.size, args.size)
    if args.op == "encode":
        data = torch.rand(args.batch, 3, args.num_frames, args.size, args.size) * 2 - 1
        run = vae.encode
    else:
        data = torch.randn(args.batch, 32, t, h, w)
        run = vae.decode
    run(data)
    before = _rss_mb("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    run(data)
    times = [time.perf_counter() - start]
    peak_mb = _rss_mb("VmHWM") - before
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        run(data)
        times.append(time.perf_counter() - start)
    return {"fps": args.batch * args.num_frames / min(times), "peak_mb": peak_mb}


def _spawn(args: argparse.Namespace, op: str, mode: str, frames: int) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", op, mode, str(frames),
        "--size", str(args.size), "--base-channels", str(args.base_channels), "--repeats", str(args.repeats),
        "--threads", str(args.threads), "--backend", args.backend, "--batch", str(args.batch),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs=2, default=[41, 121], help="two frame counts (8n+1)")
    parser.add_argument("--size", type=int, default=128, help="frame height = width in pixels (multiple of 8)")
    parser.add_argument("--base-channels", type=int, default=16, help="reduced width (released: 160)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per variant (the first also measures memory)")
    parser.add_argument("--batch", type=int, default=2, help="videos per call (see the docstring for 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--worker", nargs=3, metavar=("OP", "MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.op, args.mode, args.num_frames = args.worker[0], args.worker[1], int(args.worker[2])
        print(json.dumps(worker(args)))
        return

    results = {(op, mode, f): _spawn(args, op, mode, f) for op in OPS for f in args.frames for mode in MODES}
    print(f"WFVAE released depth, base width {args.base_channels}, batch {args.batch} x {args.size}x{args.size}, "
          f"fp32, {args.threads} threads, default chunks (encode 8 frames, decode 4 latents)")  # fmt: skip
    header = f"{'op':>6} | {'frames':>6} | {'untiled fps':>11} | {'tiled fps':>9} | {'speed':>5} | {'untiled MB':>10} | {'tiled MB':>8} | {'mem':>5}"
    print(header)
    print("-" * len(header))
    for op in OPS:
        for f in args.frames:
            u, t = results[(op, "untiled", f)], results[(op, "tiled", f)]
            print(
                f"{op:>6} | {f:>6} | {u['fps']:11.2f} | {t['fps']:9.2f} | {t['fps'] / u['fps']:5.2f} | "
                f"{u['peak_mb']:10.1f} | {t['peak_mb']:8.1f} | {t['peak_mb'] / max(u['peak_mb'], 1e-9):5.2f}"
            )
    print("(speed = tiled fps / untiled fps, mem = tiled MB / untiled MB)")
    summary = {
        "bench": "wfvae",
        "frames": list(args.frames),
        "encode_fps": {m: [round(results[("encode", m, f)]["fps"], 3) for f in args.frames] for m in ("tiled", "untiled")},
        "decode_fps": {m: [round(results[("decode", m, f)]["fps"], 3) for f in args.frames] for m in ("tiled", "untiled")},
        "peak_mb": {
            m: [round(max(results[(op, m, f)]["peak_mb"] for op in OPS), 1) for f in args.frames]
            for m in ("tiled", "untiled")
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
