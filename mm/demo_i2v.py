"""The image-to-video phase of ``make demo`` (:mod:`mm.demo`): T2V checkpoint -> I2V layout
(``python -m checkpoint_tools to-i2v``), a short I2V fine-tune from the same feature cache (TP=2 + SP), then
generation from the first frames of held-out clips and two numbers: the PSNR of each generated clip's frame 0
against its conditioning image (how well the clip keeps the given frame) and the colour agreement of the clips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

RATES = {"none": 0.1, "first": 0.8, "transition": 0.1}


def _with_conditioning(src: Path, dst: Path, **predictor) -> Path:
    cfg = json.loads(src.read_text())
    cfg["predictor"].update(conditioning={"type": "i2v", "mask_channels": 8, "rates": RATES}, **predictor)
    dst.write_text(json.dumps(cfg, indent=1))
    return dst


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def run_i2v_phase(out: Path, paths: dict, ckpt: Path, p: dict, run: Callable, py: str, torchrun: str, env: dict,
                  env_2proc: dict) -> dict:
    """Convert, fine-tune, generate, measure; returns ``{"psnr_frame0", "colour_agreement", "clips"}``."""
    from PIL import Image

    from mm.inference.colour_agreement import colour_agreement
    from mm.inference.video_io import read_video

    root, logs = out / "i2v", out / "logs"
    root.mkdir(exist_ok=True)
    run([py, "-m", "checkpoint_tools", "to-i2v", "--load", str(ckpt), "--save", str(root / "i2v_init.pt")],
        logs / "i2v_convert.log", env)
    model = _with_conditioning(Path(paths["model"]), root / "model.json", from_pretrained=str(root / "i2v_init.pt"))
    inference = _with_conditioning(Path(paths["inference"]), root / "inference.json")

    # held-out clips (another seed): their first frames condition the generation, their captions prompt it
    heldout = root / "heldout"
    run([py, "-m", "mm.data.synthetic", "--out", str(heldout), "--num", str(p["i2v_prompts"]), "--frames",
         str(p["frames"]), "--height", str(p["size"]), "--width", str(p["size"]), "--seed", "7", "--no-encoders"],
        logs / "i2v_heldout.log", env)
    lines = []
    for i, rec in enumerate(json.loads((heldout / "annotation.json").read_text())):
        frames, _ = read_video(heldout / rec["path"])
        image = root / f"first_{i:02d}.png"
        Image.fromarray(frames[0]).save(image)
        lines.append(f"{rec['cap'][0]}\t{image.name}")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")

    i2v_ckpt, samples = root / "ckpt", root / "samples"
    run([torchrun, "--nproc_per_node", "2", "pretrain_sora.py", "--mm-model", str(model), "--mm-data",
         str(paths["data"]), "--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size",
         str(p["batch"]), "--global-batch-size", str(p["batch"]), "--train-iters", str(p["i2v_iters"]), "--lr",
         str(p["lr"]), "--min-lr", str(p["lr"] / 10), "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
         "--weight-decay", "0.0", "--use-distributed-optimizer", "--save", str(i2v_ckpt), "--save-interval",
         str(p["i2v_iters"]), "--log-interval", str(max(1, p["i2v_iters"] // 20)), "--data-num-workers", "0"],
        logs / "i2v_train.log", env_2proc)
    run([torchrun, "--nproc_per_node", "2", "inference_sora.py", "--mm-model", str(inference), "--load",
         str(i2v_ckpt), "--prompt-file", str(prompts), "--save-path", str(samples), "--tensor-model-parallel-size",
         "2", "--sequence-parallel", "--seed", "0", "--no-grid"], logs / "i2v_infer.log", env_2proc)

    clips = []
    for sidecar in sorted(samples.glob("*.json")):
        meta = json.loads(sidecar.read_text())
        frames, _ = read_video(samples / meta["file"])
        given = np.asarray(Image.open(meta["image"]).convert("RGB"))
        clips.append({"prompt": meta["prompt"], "image": meta["image"], "psnr_frame0": psnr(frames[0], given)})
    score, _ = colour_agreement(samples)
    mean_psnr = sum(c["psnr_frame0"] for c in clips) / len(clips)
    result = {"psnr_frame0": mean_psnr, "colour_agreement": score, "clips": clips}
    (out / "i2v_metrics.json").write_text(json.dumps(result, indent=1))
    return result
