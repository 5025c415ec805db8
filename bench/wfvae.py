"""WFVAE encode/decode CPU time and working memory, temporally tiled and untiled (spec §4.7).

Every case (encode/decode x untiled/tiled) runs once in a fresh child process with one thread, on a
model with seeded random weights (every non-Haar tensor drawn from one generator in sorted-key order,
so any implementation with the released key set gets the same weights) and a seeded input:

* ``cpu_s``: process CPU time of the call (``time.process_time``; with one thread it is hardly affected
  by other load on the machine, unlike wall time);
* ``working_mb``: peak RSS during the call minus the RSS just before it (model built, input made, peak
  counter reset through ``/proc/self/clear_refs``); it includes the returned tensor.

``--released-dims`` uses the released widths (base 160, energy flow 128); the default is a reduced width
(``--base-channels``) for a quick run. ``--baseline DIR`` runs every case a second time with the ``mm``
package found in DIR (another version of this project, e.g. ``git archive <rev> mm | tar -x -C DIR``)
and prints ours / baseline ratios and the largest absolute difference of the outputs (parity). Prints a
table and the machine's load average; the last line is one JSON object
``{"bench": "wfvae", "size": S, "frames": T, "cases": {"encode_untiled": {"cpu_s": .., "working_mb": ..},
"encode_tiled": .., "decode_untiled": .., "decode_tiled": ..}}`` (plus ``"baseline"`` and ``"max_abs_diff"``
with ``--baseline``), also written to ``--out`` when given.

    python bench/wfvae.py --released-dims --size 256 --frames 33 [--baseline DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from _summary import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("encode_untiled", "encode_tiled", "decode_untiled", "decode_tiled")


def _rss_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _config(args: argparse.Namespace) -> dict:
    from mm.models.wfvae import released_wfvae_config

    config = released_wfvae_config()
    if not args.released_dims:
        width = args.base_channels
        config.update(base_channels=width, encoder_energy_flow_hidden_size=width, decoder_energy_flow_hidden_size=width)
    return config


def _seeded_weights(vae) -> None:
    """Overwrite every learned tensor with seeded values (fan-in scaled); Haar kernels stay as they are."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in sorted(vae.state_dict().items()):
            if "wavelet" in name:
                continue
            if t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            elif name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def _child(args: argparse.Namespace) -> None:
    """One case in this process: build, make the input, measure one call; prints one JSON line."""
    sys.path.insert(0, args.root)
    import torch

    torch.set_num_threads(args.threads)
    from mm.ops import select_backend

    select_backend("cpu", patch_megatron=False)  # the VAE needs no megatron
    from mm.models.wfvae import WFVAE

    vae = WFVAE.from_upstream(_config(args))
    _seeded_weights(vae)
    op, mode = args.child.split("_")
    vae.use_tiling = mode == "tiled"
    g = torch.Generator().manual_seed(1)
    if op == "encode":
        data, run = torch.rand(args.batch, 3, args.frames, args.size, args.size, generator=g) * 2 - 1, vae.encode
    else:
        t, h, w = vae.latent_size(args.frames, args.size, args.size)
        data, run = torch.randn(args.batch, 32, t, h, w, generator=g), vae.decode
    before = _rss_mb("VmRSS")
    _reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    out = run(data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    working = _rss_mb("VmHWM") - before
    if args.save:
        torch.save(out.contiguous(), args.save)
    print(json.dumps({"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "working_mb": round(working, 1)}))


def _run_case(args: argparse.Namespace, case: str, root: str, save: str | None) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", case, "--root", root, "--size", str(args.size),
        "--frames", str(args.frames), "--base-channels", str(args.base_channels), "--batch", str(args.batch),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.released_dims:
        cmd.append("--released-dims")
    if save:
        cmd += ["--save", save]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _max_abs_diff(a: str, b: str) -> float:
    import torch

    return float((torch.load(a) - torch.load(b)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--released-dims", action="store_true", help="released widths (base 160, energy flow 128)")
    parser.add_argument("--base-channels", type=int, default=16, help="reduced width when not --released-dims")
    parser.add_argument("--size", type=int, default=256, help="frame height = width in pixels (multiple of 8)")
    parser.add_argument("--frames", type=int, default=33, help="frames T (8n+1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--baseline", help="directory holding another version's mm package, compared as ratios")
    parser.add_argument("--concurrent", action="store_true", help="run each case's two versions at the same time")
    parser.add_argument("--out", help="also write the JSON summary to this file")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    results, baseline, diffs = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            if not args.baseline:
                results[case] = _run_case(args, case, ROOT, None)
                continue
            ours_out, base_out = os.path.join(tmp, f"{case}_ours.pt"), os.path.join(tmp, f"{case}_base.pt")
            runs = [(ROOT, ours_out), (os.path.abspath(args.baseline), base_out)]
            if args.concurrent:  # one child each at the same time (CPU time and RSS are per process)
                with ThreadPoolExecutor(2) as pool:
                    results[case], baseline[case] = pool.map(lambda r: _run_case(args, case, *r), runs)
            else:
                results[case], baseline[case] = (_run_case(args, case, *r) for r in runs)
            diffs[case] = _max_abs_diff(ours_out, base_out)
            os.remove(ours_out)
            os.remove(base_out)

    dims = "released dims (base 160, energy flow 128)" if args.released_dims else f"base width {args.base_channels}"
    print(f"WFVAE {dims}, {args.batch}x3x{args.frames}x{args.size}x{args.size}, fp32, {args.threads} thread(s), "
          f"one fresh process per case; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    header = f"{'case':>15} | {'cpu s':>8} | {'wall s':>8} | {'working MB':>10}"
    if args.baseline:
        header += f" | {'base cpu s':>10} | {'base MB':>8} | {'cpu ratio':>9} | {'MB ratio':>8} | {'max |diff|':>10}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        r = results[case]
        line = f"{case:>15} | {r['cpu_s']:8.2f} | {r['wall_s']:8.2f} | {r['working_mb']:10.1f}"
        if args.baseline:
            b = baseline[case]
            line += (
                f" | {b['cpu_s']:10.2f} | {b['working_mb']:8.1f} | {r['cpu_s'] / b['cpu_s']:9.2f} | "
                f"{r['working_mb'] / max(b['working_mb'], 1e-9):8.2f} | {diffs[case]:10.2e}"
            )
        print(line)
    summary = {
        "bench": "wfvae",
        "size": args.size,
        "frames": args.frames,
        "cases": {c: {"cpu_s": results[c]["cpu_s"], "working_mb": results[c]["working_mb"]} for c in args.cases},
    }
    if args.baseline:
        summary["baseline"] = {c: {"cpu_s": baseline[c]["cpu_s"], "working_mb": baseline[c]["working_mb"]} for c in args.cases}
        summary["max_abs_diff"] = diffs
    emit(summary, args.out)


if __name__ == "__main__":
    main()
