"""I2V inference: --image / --last-image / prompt-file TAB columns, sidecars with image hashes, TP2 == one process,
bad inputs as one error before anything is built."""

import json
import os

import numpy as np
import pytest
import torch

import inference_sora
from harness import run_distributed
from inference_artifacts import PROMPTS, base_argv, inference_dict, tiny_artifacts

SEEDS = [3, 4]


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """The tiny artefacts + an I2V predictor (to-i2v of dit.pt, conditioning weights then made nonzero so the
    images matter), its inference JSON, two images (not the output aspect: crop + resize run) and a TAB prompt file."""
    from PIL import Image

    from checkpoint_tools.cli import main as tools_main
    from mm.models.sparse_ummdit import load_upstream_checkpoint

    paths = dict(tiny_artifacts())
    root = tmp_path_factory.mktemp("i2v")
    assert tools_main(["to-i2v", "--load", paths["dit.pt"], "--save", str(root / "i2v.pt")]) == 0
    state = {k: v.clone() for k, v in load_upstream_checkpoint(root / "i2v.pt").items()}  # not the mmap
    w = state["patch_embed.proj.weight"]
    g = torch.Generator().manual_seed(1)
    w[:, 32:] = 0.05 * torch.randn(w[:, 32:].shape, generator=g)
    torch.save(state, root / "i2v_trained.pt")
    spec = inference_dict(root)
    spec["predictor"]["conditioning"] = {"type": "i2v", "mask_channels": 8}
    for k in ("t5", "clip"):
        spec[{"t5": "text_encoder", "clip": "text_encoder_2"}[k]]["from_pretrained"] = paths[k]
    (root / "i2v.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(0)
    for name in ("first.png", "last.png"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / name)
    (root / "prompts.txt").write_text(f"{PROMPTS[0]}\tfirst.png\n{PROMPTS[1]}\tfirst.png\tlast.png\n{PROMPTS[2]}\n")
    paths.update({"i2v.pt": str(root / "i2v_trained.pt"), "i2v.json": str(root / "i2v.json"), "i2v_root": str(root)})
    return paths


def i2v_argv(p, save, *extra):
    return ["--mm-model", p["i2v.json"], "--upstream-dit", p["i2v.pt"], "--upstream-vae", p["wfvae.ckpt"],
            "--save-path", str(save), "--no-progress", *extra]


def test_prompt_file_columns_and_sidecars(i2v, tmp_path):
    from mm.inference.cli import parse_request, run
    from mm.inference.i2v import ImageCondition

    req = parse_request(i2v_argv(i2v, tmp_path / "out", "--prompt-file", os.path.join(i2v["i2v_root"], "prompts.txt"),
                                 "--batch-size", "3", "--no-grid"), world_size=1)
    root = i2v["i2v_root"]
    assert req.prompts == PROMPTS
    assert [c.mode for c in req.images] == ["first", "transition", "none"]
    assert req.images[1] == ImageCondition(os.path.join(root, "first.png"), os.path.join(root, "last.png"))
    run(req, None)
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    records = [json.loads(s.read_text()) for s in sidecars]
    assert [r["conditioning"] for r in records] == ["first", "transition", "none"]
    assert records[1]["last_image"] == os.path.join(root, "last.png") and len(records[1]["last_image_sha256"]) == 16
    assert records[0]["image_sha256"] == records[1]["image_sha256"] != records[1]["last_image_sha256"]
    assert "image" not in records[2]


def _latents(rank, world, p):
    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.inference import OpenSoraPlanPipeline, SamplingConfig
    from mm.inference.cli import parse_request

    req = parse_request(i2v_argv(p, "unused", "--prompt", "x"), world_size=world)
    cfg = SamplingConfig.from_spec(req.spec)
    root = p["i2v_root"]
    from mm.inference.i2v import ImageCondition

    images = [ImageCondition(os.path.join(root, "first.png")),
              ImageCondition(os.path.join(root, "first.png"), os.path.join(root, "last.png"))]
    out = {}
    st = init_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    out["tp2"] = OpenSoraPlanPipeline.from_spec(req.spec, parallel=st)(PROMPTS[:2], cfg, SEEDS, decode=False,
                                                                       images=images).latents
    pipe = OpenSoraPlanPipeline.from_spec(req.spec)
    out["tp1"] = pipe(PROMPTS[:2], cfg, SEEDS, decode=False, images=images).latents
    out["text_only"] = pipe(PROMPTS[:2], cfg, SEEDS, decode=False).latents
    return out


def test_image_tp2_equals_one_process(i2v):
    r0, r1 = run_distributed(_latents, 2, args=(i2v,), timeout=180)
    for r in (r0, r1):
        torch.testing.assert_close(r["tp2"], r["tp1"], rtol=0, atol=1e-5)
    assert (r0["tp1"] - r0["text_only"]).abs().max() > 1e-3  # the images do change the sample


def test_bad_inputs_fail_before_building(i2v, tmp_path, capsys):
    first = os.path.join(i2v["i2v_root"], "first.png")
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text(f"x\t\t{first}\n")
    cases = [
        (i2v_argv(i2v, tmp_path, "--prompt", "x", "--last-image", first), "--last-image needs --image"),
        (i2v_argv(i2v, tmp_path, "--prompt", "x", "--image", str(tmp_path / "missing.png")), "does not exist"),
        (base_argv(i2v, tmp_path, "--prompt", "x", "--image", first), "has no I2V conditioning"),
        (i2v_argv(i2v, tmp_path, "--prompt", "x", "--image", first, "--last-image", first, "--num-frames", "1"),
         "transition conditioning needs"),
        (i2v_argv(i2v, tmp_path, "--prompt", "x")[:2] + ["--upstream-dit", i2v["dit.pt"]]
         + i2v_argv(i2v, tmp_path, "--prompt", "x")[4:], "patch_embed takes 32 input channels"),
        (i2v_argv(i2v, tmp_path, "--prompt-file", str(bad_file)), "no empty columns"),
    ]
    for argv, message in cases:
        assert inference_sora.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and message in err[0], (message, err)
