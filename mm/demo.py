"""`make demo`: the main job on the embedded tiny default — CPU only, nothing downloaded.

Phases (each a real user-facing command, run as a subprocess so the output is what a user would see):

1. data      ``python -m mm.data.synthetic``: H.264 clips of coloured shapes + tiny T5/CLIP encoders
2. vae       ``python -m mm.training.vae_fit``: fit the tiny WFVAE (reconstruction + KL) and its latent stats
3. features  ``python -m mm.data.extract_features``: cache the frozen encoders' outputs once
4. train     ``torchrun --nproc_per_node 2 pretrain_sora.py``: tiny SUV from the cache, TP=2 + SP on gloo
5. infer     ``torchrun --nproc_per_node 2 inference_sora.py``: batch inference on the demo prompts
6. i2v       ``python -m checkpoint_tools to-i2v``, a short I2V fine-tune, clips from held-out first frames
             (:mod:`mm.demo_i2v`: frame-0 PSNR against the given image + colour agreement)
7. evaluate  colour agreement of every clip with its prompt, a loss-curve PNG and ``summary.md``

Everything lands in ``outputs/demo/`` (``--out``). ``--quick`` runs a few steps of each phase (the CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(clips=48, frames=17, size=64, vae_steps=800, train_iters=2000, batch=4, lr=1e-3, infer_steps=24,
            prompts=12, text_len=16, save_interval=500, i2v_iters=300, i2v_prompts=6)
QUICK = dict(clips=4, frames=9, size=32, vae_steps=3, train_iters=2, batch=2, lr=1e-3, infer_steps=2, prompts=2,
             text_len=16, save_interval=2, i2v_iters=2, i2v_prompts=2)
PROMPTS = ["a red square moving right", "a blue circle moving up", "a green triangle moving left",
           "a yellow square moving down", "a purple circle moving right", "an orange triangle moving up",
           "a red circle moving down", "a blue triangle moving right", "a green square moving up",
           "a yellow circle moving left", "a purple triangle moving down", "an orange square moving left"]


def _run(cmd: list[str], log: Path, env: dict) -> None:
    """Run a phase command, streaming its output to the console and to ``log``."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env=env, cwd=ROOT) as p:
        for line in p.stdout:
            f.write(line)
            if "Warning" not in line and "warnings.warn" not in line:
                sys.stdout.write("  " + line)
                sys.stdout.flush()
    if p.returncode:
        raise SystemExit(f"demo: phase command failed with exit code {p.returncode}; log: {log}")


def _write_configs(out: Path, data: Path, p: dict, ae_update: dict, features: Path | None = None) -> dict[str, Path]:
    """The tiny preset re-pointed at the demo's data (and, once fitted, its WFVAE + latent statistics, and
    the feature cache to train from), plus the demo prompts."""
    from mm.presets import write_tiny_configs

    paths = write_tiny_configs(out, data, frames=p["frames"], size=p["size"], text_len=p["text_len"],
                               ae_update=ae_update, features=features, infer_steps=p["infer_steps"])
    paths["prompts"] = out / "prompts.txt"
    paths["prompts"].write_text("\n".join(PROMPTS[:p["prompts"]]) + "\n")
    return paths


def _loss_curve(log_file: Path, png: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    it = [r["iteration"] for r in rows]
    loss = [r["loss"] for r in rows]
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(it, loss, alpha=0.3, label="loss")
    ax.plot(it, smooth, label=f"moving average ({k})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("tiny SUV on synthetic shapes (TP=2 + SP, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs/demo"), help="output directory (default outputs/demo)")
    ap.add_argument("--quick", action="store_true", help="a few steps of every phase (what CI runs)")
    ap.add_argument("--train-iters", type=int, default=None, help="override the SUV training iterations")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the WFVAE fitting steps")
    a = ap.parse_args(argv)
    p = dict(QUICK if a.quick else FULL)
    if a.train_iters:
        p["train_iters"] = a.train_iters
    if a.vae_steps:
        p["vae_steps"] = a.vae_steps
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    # one process phases use both cores; the 2-process (torchrun) phases one thread each
    env = dict(os.environ, MM_BACKEND="cpu", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env_2proc = dict(env, OMP_NUM_THREADS="1")
    py = sys.executable
    torchrun = str(Path(py).parent / "torchrun")
    times: dict[str, float] = {}

    def phase(name: str, title: str):
        print(f"\n=== [{len(times) + 1}/7] {title}", flush=True)
        times[name] = time.time()

    t_all = time.time()
    phase("data", "synthetic dataset + tiny text encoders")
    _run([py, "-m", "mm.data.synthetic", "--out", str(out / "data"), "--num", str(p["clips"]), "--frames",
          str(p["frames"]), "--height", str(p["size"]), "--width", str(p["size"])], logs / "data.log", env)
    times["data"] = time.time() - times["data"]

    phase("vae", "fit the tiny WFVAE")
    data, vae = out / "data", out / "vae"
    prefit = _write_configs(out / "prefit", data, p, {"from_pretrained": None})
    _run([py, "-m", "mm.training.vae_fit", "--mm-model", str(prefit["model"]), "--mm-data", str(prefit["data"]),
          "--steps", str(p["vae_steps"]), "--out", str(vae)], logs / "vae.log", env)
    times["vae"] = time.time() - times["vae"]
    stats = json.loads((vae / "latent_stats.json").read_text())
    fitted = {"from_pretrained": str(vae / "wfvae.ckpt"), "scale": stats["scale"], "shift": stats["shift"]}
    feats = out / "features"
    paths = _write_configs(out, data, p, fitted, features=feats)

    phase("features", "cache WFVAE latents and T5/CLIP features once")
    _run([py, "-m", "mm.data.extract_features", "--data", str(paths["data"]), "--out", str(feats), "--vae-config",
          str(paths["model"]), "--vae-checkpoint", fitted["from_pretrained"], "--text-dtype", "fp32"],
         logs / "features.log", env)
    times["features"] = time.time() - times["features"]

    phase("train", "train the tiny SUV from the cache: 2 processes, TP=2 + sequence parallel (gloo)")
    ckpt = out / "ckpt"
    _run([torchrun, "--nproc_per_node", "2", "pretrain_sora.py", "--mm-model", str(paths["model"]),
          "--mm-data", str(paths["data"]), "--tensor-model-parallel-size", "2", "--sequence-parallel",
          "--micro-batch-size", str(p["batch"]), "--global-batch-size", str(p["batch"]),
          "--train-iters", str(p["train_iters"]),
          "--lr", str(p["lr"]), "--min-lr", str(p["lr"] / 10), "--lr-decay-style", "cosine", "--lr-warmup-iters",
          str(max(1, p["train_iters"] // 20)), "--weight-decay", "0.0", "--use-distributed-optimizer",
          "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(p["save_interval"]),
          "--log-interval", str(max(1, p["train_iters"] // 60)), "--data-num-workers", "0"],
         logs / "train.log", env_2proc)
    times["train"] = time.time() - times["train"]

    phase("infer", "batch inference on the demo prompts (2 processes, TP=2 + SP)")
    samples = out / "samples"
    _run([torchrun, "--nproc_per_node", "2", "inference_sora.py", "--mm-model", str(paths["inference"]),
          "--load", str(ckpt), "--prompt-file", str(paths["prompts"]), "--save-path", str(samples),
          "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seed", "0"], logs / "infer.log", env_2proc)
    times["infer"] = time.time() - times["infer"]

    phase("i2v", "image-to-video: T2V -> I2V checkpoint, short I2V fine-tune (TP=2 + SP), held-out first frames")
    from mm.demo_i2v import run_i2v_phase

    i2v = run_i2v_phase(out, paths, ckpt, p, _run, py, torchrun, env, env_2proc)
    times["i2v"] = time.time() - times["i2v"]

    phase("evaluate", "colour agreement, loss curve, summary")
    from mm.inference.colour_agreement import colour_agreement

    score, rows = colour_agreement(samples)
    for r in rows:
        print(f"  {'ok  ' if r['agree'] else 'MISS'} {r['prompt']!r}: found {r['found']}")
    print(f"  colour agreement: {score:.2f} over {len(rows)} prompts (chance 0.17)")
    i2v_line = (f"I2V: frame-0 PSNR {i2v['psnr_frame0']:.1f} dB against the conditioning image, colour agreement "
                f"{i2v['colour_agreement']:.2f} over {len(i2v['clips'])} held-out first frames "
                f"({p['i2v_iters']} I2V fine-tune iterations)")
    print("  " + i2v_line)
    history = _loss_curve(ckpt / "train_log.jsonl", out / "loss_curve.png")
    times["evaluate"] = time.time() - times["evaluate"]
    total = time.time() - t_all
    (out / "colour_agreement.json").write_text(json.dumps({"score": score, "clips": rows}, indent=1))
    summary = [
        "# Demo summary", "",
        f"Tiny SUV trained for {p['train_iters']} iterations of {p['batch']} clips (TP=2 + SP, 2 gloo processes, CPU) on "
        f"{p['clips']} synthetic clips ({p['frames']}x{p['size']}x{p['size']}); tiny WFVAE fitted for "
        f"{p['vae_steps']} steps.", "",
        f"**Colour agreement: {score:.2f}** over {len(rows)} prompts (chance {1 / 6:.2f}).", "",
        f"**{i2v_line}** (`i2v_metrics.json`).", "",
        f"Loss: first logged {history[0]['loss']:.4f}, last {history[-1]['loss']:.4f} (`loss_curve.png`).", "",
        "| phase | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in times.items()], f"| total | {total:.0f} |",
        "", "Files:", "",
        f"- generated clips + JSON sidecars: `{samples}`",
        f"- loss curve: `{out / 'loss_curve.png'}`; training log: `{ckpt / 'train_log.jsonl'}`",
        f"- checkpoints: `{ckpt}`; fitted WFVAE: `{out / 'vae'}`; data: `{out / 'data'}`",
        f"- configs used: `{paths['model']}`, `{paths['data']}`, `{paths['inference']}`; phase logs: `{logs}`",
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n" + "\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
