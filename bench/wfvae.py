"""WFVAE encode/decode throughput and peak memory, temporally tiled vs untiled, on this CPU (spec §4.7).

The released architecture (depth, blocks, 32 latent channels) at a reduced channel width, random
weights, fp32:

* throughput = batch x frames (pixel frames in or out) / the fastest of ``--repeats`` calls, after one
  untimed warm-up call per variant (oneDNN builds and caches kernels per shape), tiled and untiled
  calls interleaved so that background load hits both alike;
* peak memory, in a child process started with glibc's mmap threshold lowered
  (``MALLOC_MMAP_THRESHOLD_``) so activation buffers are mapped fresh and unmapped when freed and one
  variant's heap cannot hide another's peak (not in the timing process: the page faults cost time):
  after a warm-up call, the working memory of one call = its peak RSS minus the RSS just before it
  (model, input and kernel caches resident) minus the size of the tensor it returns, which both modes
  must hold. The kernel's peak counter is reset through ``/proc/self/clear_refs`` before that call.

Tiled working memory is bounded by the largest chunk (encode: 8 frames, decode: 4 latents + 1
look-ahead, plus the carried context) and stays flat as frames grow; untiled grows with the frame
count. The default batch is 2 because with batch 1 PyTorch's CPU conv3d switches to an im2col kernel
(about 27x the input in scratch memory, and 2x slower) whenever channels x frames x height <= 20480,
which the short chunks of a reduced-width model hit; that CPU-only artefact would dominate the tiled
numbers (``--batch 1`` shows it). GPUs do not have it. Prints a table; the last line is one JSON
object: ``{"bench": "wfvae", "frames": [F1, F2], "encode_fps": {"tiled": [..], "untiled": [..]},
"decode_fps": {...}, "peak_mb": {"tiled": [m1, m2], "untiled": [m1, m2]}}`` where ``peak_mb`` is the
larger of the encode and decode working memories.

    python bench/wfvae.py [--frames 41 121] [--size 96] [--base-channels 16] [--batch 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

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


def _working_mb(run, data) -> float:
    before = _rss_mb("VmRSS")
    _reset_peak_rss()
    out = run(data)
    return _rss_mb("VmHWM") - before - out.numel() * out.element_size() / 2**20


def _inputs(vae, op: str, frames: int, args: argparse.Namespace):
    torch.manual_seed(1)
    if op == "encode":
        return torch.rand(args.batch, 3, frames, args.size, args.size) * 2 - 1, vae.encode
    t, h, w = vae.latent_size(frames, args.size, args.size)
    return torch.randn(args.batch, 32, t, h, w), vae.decode


def measure_speed(vae, op: str, frames: int, args: argparse.Namespace) -> dict:
    """{mode: frames/s} for one operation and frame count."""
    data, run = _inputs(vae, op, frames, args)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:
        vae.use_tiling = mode == "tiled"
        run(data)
    for _ in range(args.repeats):
        for mode in MODES:
            vae.use_tiling = mode == "tiled"
            start = time.perf_counter()
            run(data)
            times[mode].append(time.perf_counter() - start)
    return {mode: args.batch * frames / min(times[mode]) for mode in MODES}


def measure_memory(vae, op: str, frames: int, args: argparse.Namespace) -> dict:
    """{mode: working MB} for one operation and frame count (run in the memory child process)."""
    data, run = _inputs(vae, op, frames, args)
    result = {}
    for mode in MODES:
        vae.use_tiling = mode == "tiled"
        run(data)
        result[mode] = _working_mb(run, data)
    return result


def _memory_child(args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--memory-child", "--frames", *map(str, args.frames),
        "--size", str(args.size), "--base-channels", str(args.base_channels), "--batch", str(args.batch),
        "--threads", str(args.threads), "--backend", args.backend,
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(args: argparse.Namespace):
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
    }
    return WFVAE.from_upstream(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs=2, default=[41, 121], help="two frame counts (8n+1)")
    parser.add_argument("--size", type=int, default=96, help="frame height = width in pixels (multiple of 8)")
    parser.add_argument("--base-channels", type=int, default=16, help="reduced width (released: 160)")
    parser.add_argument("--batch", type=int, default=2, help="videos per call (see the docstring for 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    vae = _build(args)
    if args.memory_child:
        memory = {f"{op} {f}": measure_memory(vae, op, f, args) for op in OPS for f in args.frames}
        print(json.dumps(memory))
        return
    speed = {(op, f): measure_speed(vae, op, f, args) for op in OPS for f in args.frames}
    memory = _memory_child(args)
    results = {
        key: {mode: {"fps": speed[key][mode], "peak_mb": memory[f"{key[0]} {key[1]}"][mode]} for mode in MODES}
        for key in speed
    }
    width = args.base_channels

    print(f"WFVAE released depth, base width {width}, batch {args.batch} x {args.size}x{args.size}, fp32, "
          f"{args.threads} threads, default chunks (encode 8 frames, decode 4 latents)")  # fmt: skip
    header = (
        f"{'op':>6} | {'frames':>6} | {'untiled fps':>11} | {'tiled fps':>9} | {'speed':>5} | "
        f"{'untiled MB':>10} | {'tiled MB':>8} | {'mem':>5}"
    )
    print(header)
    print("-" * len(header))
    for op in OPS:
        for f in args.frames:
            u, t = results[(op, f)]["untiled"], results[(op, f)]["tiled"]
            print(
                f"{op:>6} | {f:>6} | {u['fps']:11.2f} | {t['fps']:9.2f} | {t['fps'] / u['fps']:5.2f} | "
                f"{u['peak_mb']:10.1f} | {t['peak_mb']:8.1f} | {t['peak_mb'] / max(u['peak_mb'], 1e-9):5.2f}"
            )
    print("(speed = tiled fps / untiled fps; MB = working memory above model + input, output excluded; "
          "mem = tiled MB / untiled MB)")  # fmt: skip

    def per_mode(op: str, key: str, digits: int) -> dict:
        return {m: [round(results[(op, f)][m][key], digits) for f in args.frames] for m in ("tiled", "untiled")}

    encode_mb, decode_mb = per_mode("encode", "peak_mb", 1), per_mode("decode", "peak_mb", 1)
    summary = {
        "bench": "wfvae",
        "frames": list(args.frames),
        "encode_fps": per_mode("encode", "fps", 3),
        "decode_fps": per_mode("decode", "fps", 3),
        "peak_mb": {m: [max(e, d) for e, d in zip(encode_mb[m], decode_mb[m])] for m in ("tiled", "untiled")},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
