"""Tiny inference artefacts for the inference tests, written once per pytest process into a temp dir.

* ``t5/``, ``clip/``: tiny real Hugging Face text encoders (tokenizers learned from the test prompts)
* ``wfvae.ckpt``: a tiny WFVAE in the released ``state_dict.gen_model`` layout
* ``dit.pt``: a flat SUV state dict (``torch.save(model.state_dict())`` of ``SparseUMMDiT.from_upstream``)
* ``dit_half.pt``: the same weights x 0.5 (what the training checkpoint's EMA holds)
* ``ckpt/``: our training checkpoint (dist_checkpointing, iteration 7) with raw = ``dit.pt``, EMA = ``dit_half.pt``
* ``inference.json``: an upstream-style inference JSON (9 frames 32x32, 2 steps, static shift, T5 length 16)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PROMPTS = ["a red square moving right", "a blue circle moving up", "a green triangle moving left"]
ITERATION = 7
_CACHE: dict[str, dict] = {}


def suv_block() -> dict:
    from mm.models.suv_config import tiny_suv_config

    pred = tiny_suv_config()
    pred["in_channels"] = pred["out_channels"] = 32  # the WFVAE latent
    return pred


def inference_dict(root: Path) -> dict:
    from mm.models.wfvae import tiny_wfvae_config

    return {
        "weight_dtype": "fp32",
        "ae": {**tiny_wfvae_config(), "from_pretrained": None},
        "text_encoder": {"model_id": "T5", "from_pretrained": "t5"},
        "text_encoder_2": {"model_id": "CLIPWithProjection", "from_pretrained": "clip"},
        "predictor": {**suv_block(), "from_pretrained": None},
        "diffusion": {"model_id": "OpenSoraPlan", "num_inference_steps": 2, "guidance_scale": 4.0,
                      "guidance_rescale": 0.7, "shift": 3.0, "use_dynamic_shifting": False},
        "pipeline_config": {"use_attention_mask": True, "input_size": [9, 32, 32], "version": "v1.5",
                            "model_type": "t2v"},
        "micro_batch_size": 1,
        "frame_interval": 1,
        "model_max_length": 16,
        "save_path": str(root / "samples"),
        "fps": 8,
        "prompt": "prompts.txt",
    }


def _save_training_checkpoint(rank, world, root, spec_path, flat_path):
    from mm.builders import build_suv
    from mm.config import ParallelConfig
    from mm.config_upstream import load_inference_json
    from mm.distributed.init import init_parallel
    from mm.training.checkpointing import save_checkpoint

    st = init_parallel(ParallelConfig(tensor_model_parallel_size=1))
    model = build_suv(load_inference_json(spec_path), st, checkpoint=flat_path)
    ema = {k: (v.detach() * 0.5).clone() for k, v in model.state_dict().items()}
    save_checkpoint(root, ITERATION, model, None, common={}, ema_weights=ema)


def tiny_artifacts() -> dict:
    """Paths of the artefacts (created on first use in this process; forked ranks inherit them)."""
    if "paths" in _CACHE:
        return _CACHE["paths"]
    from harness import run_distributed
    from mm.data.synthetic import caption_corpus
    from mm.models.sparse_ummdit import SparseUMMDiT
    from mm.models.tiny_text_encoders import write_tiny_clip, write_tiny_t5
    from mm.models.wfvae import WFVAE, tiny_wfvae_config

    root = Path(tempfile.mkdtemp(prefix="mm_inference_test_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # forked ranks leave through os._exit: no cleanup
    corpus = caption_corpus() + PROMPTS
    write_tiny_t5(root / "t5", corpus, d_model=32)
    write_tiny_clip(root / "clip", corpus, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = WFVAE.from_upstream(tiny_wfvae_config())
        torch.save({"state_dict": {"gen_model": vae.state_dict()}}, root / "wfvae.ckpt")
        dit = SparseUMMDiT.from_upstream(suv_block())
        # random, not zero-initialised skip merges, so every path through the U matters
        for name, p in dit.named_parameters():
            if "skip_norm_linear" in name:
                p.data.normal_(0, 0.05)
        flat = dit.state_dict()
    torch.save(flat, root / "dit.pt")
    torch.save({k: v * 0.5 for k, v in flat.items()}, root / "dit_half.pt")
    (root / "prompts.txt").write_text("# test prompts\n\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    spec_path = root / "inference.json"
    spec_path.write_text(json.dumps(inference_dict(root), indent=1), encoding="utf-8")
    run_distributed(_save_training_checkpoint, 1, args=(str(root / "ckpt"), str(spec_path), str(root / "dit.pt")))
    paths = {k: str(root / k) for k in ("t5", "clip", "wfvae.ckpt", "dit.pt", "dit_half.pt", "ckpt", "prompts.txt",
                                        "inference.json")}
    paths["root"] = str(root)
    _CACHE["paths"] = paths
    return paths


def base_argv(paths: dict, save_path: str | os.PathLike, *extra: str) -> list[str]:
    """inference_sora.py flags for the tiny artefacts with the released-weights path."""
    return ["--mm-model", paths["inference.json"], "--upstream-dit", paths["dit.pt"], "--upstream-vae",
            paths["wfvae.ckpt"], "--save-path", str(save_path), "--no-progress", *extra]
