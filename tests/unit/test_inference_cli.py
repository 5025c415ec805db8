"""inference_sora.py flags: --help, overrides, and bad input failing fast (exit 2, message, nothing built)."""

import os
import subprocess
import sys

import pytest

import inference_sora
from inference_artifacts import base_argv, tiny_artifacts
from mm.inference.cli import build_parser, parse_request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def paths():
    return tiny_artifacts()


def test_help_documents_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
        for opt in action.option_strings:
            assert opt in text
    for flag in ("--prompt-file", "--negative-prompt", "--num-frames", "--guidance-rescale", "--shift", "--seed",
                 "--batch-size", "--save-path", "--fps", "--tensor-model-parallel-size", "--sequence-parallel",
                 "--load", "--no-use-ema", "--upstream-dit", "--upstream-vae", "--t5", "--clip", "--backend",
                 "--spatial-tiling"):
        assert flag in text
    with pytest.raises(SystemExit) as e:
        inference_sora.main(["--help"])
    assert e.value.code == 0


def test_overrides(paths, tmp_path):
    req = parse_request(base_argv(paths, tmp_path, "--prompt", "A Cat", "--num-frames", "17", "--height", "48",
                                  "--width", "64", "--num-inference-steps", "3", "--guidance-scale", "2.5",
                                  "--guidance-rescale", "0", "--shift", "5", "--seed", "7", "--fps", "12",
                                  "--batch-size", "2", "--negative-prompt", "blurry", "--spatial-tiling",
                                  "--t5", paths["t5"], "--clip", paths["clip"]), world_size=1)
    s = req.sampling
    assert req.prompts == ["A Cat"]
    assert (s.num_frames, s.height, s.width, s.num_inference_steps) == (17, 48, 64, 3)
    assert (s.guidance_scale, s.guidance_rescale, s.shift, s.schedule) == (2.5, 0.0, 5.0, "static_shift")
    assert s.negative_prompt == "blurry"
    assert (req.output.seed, req.output.fps, req.output.batch_size) == (7, 12, 2)
    assert req.spec.ae["use_spatial_tiling"] is True and req.spec.ae["use_tiling"] is True
    assert req.spec.predictor_checkpoint == paths["dit.pt"] and req.spec.ae_checkpoint == paths["wfvae.ckpt"]
    assert req.use_ema and req.load is None


def test_defaults_from_json(paths, tmp_path):
    req = parse_request(base_argv(paths, tmp_path), world_size=2)
    assert req.prompts[0] == "a red square moving right" and len(req.prompts) == 3  # JSON prompt file
    assert (req.sampling.num_frames, req.sampling.height, req.sampling.num_inference_steps) == (9, 32, 2)
    assert (req.output.fps, req.output.batch_size, req.output.seed) == (8, 1, 1234)
    req = parse_request(["--mm-model", paths["inference.json"], "--load", paths["ckpt"], "--no-use-ema",
                         "--upstream-vae", paths["wfvae.ckpt"]], world_size=1)
    assert req.load == paths["ckpt"] and not req.use_ema and req.spec.predictor_checkpoint is None


def _bad_cases(p, tmp):
    empty = tmp / "empty.txt"
    empty.write_text("# nothing\n\n")
    nockpt = tmp / "nockpt"
    nockpt.mkdir()
    notmodel = tmp / "notmodel"
    notmodel.mkdir()
    return [
        (["--num-frames", "10"], "num_frames"),
        (["--height", "40"], "height"),
        (["--width", "0"], "width"),
        (["--prompt-file", str(empty)], "holds no prompt"),
        (["--prompt-file", str(tmp / "missing.txt")], "does not exist"),
        (["--num-inference-steps", "0"], "num_inference_steps"),
        (["--guidance-rescale", "2"], "guidance_rescale"),
        (["--batch-size", "0"], "batch_size"),
        (["--t5", str(tmp / "no_t5")], "T5 directory"),
        (["--clip", str(notmodel)], "no config.json"),
        (["--upstream-vae", str(tmp / "no.ckpt")], "WFVAE checkpoint"),
        (["--upstream-dit", str(tmp / "no.pt")], "DiT checkpoint"),
        (["--tensor-model-parallel-size", "3"], "divisor of num_heads=2"),
        (["--tensor-model-parallel-size", "2"], "does not divide the world size 1"),
    ]


def test_bad_arguments_fail_fast(paths, tmp_path, monkeypatch, capsys):
    def must_not_build(*a, **k):
        raise AssertionError("a model was built despite bad input")

    monkeypatch.setattr(inference_sora, "run", must_not_build)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for extra, message in _bad_cases(paths, tmp_path):
        argv = base_argv(paths, tmp_path / "out", *extra)
        if "--upstream-dit" in extra:  # replace, not repeat
            argv = ["--mm-model", paths["inference.json"], "--upstream-vae", paths["wfvae.ckpt"], *extra]
        assert inference_sora.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert "inference_sora.py: error:" in err and message in err, (extra, err)
    # training checkpoint: missing directory, directory without a complete checkpoint
    for load, message in ((tmp_path / "nope", "does not exist"), (tmp_path, "no complete checkpoint")):
        argv = ["--mm-model", paths["inference.json"], "--load", str(load), "--upstream-vae", paths["wfvae.ckpt"]]
        assert inference_sora.main(argv) == 2
        assert message in capsys.readouterr().err
    # no DiT weights at all; a missing JSON
    assert inference_sora.main(["--mm-model", paths["inference.json"], "--upstream-vae", paths["wfvae.ckpt"]]) == 2
    assert "no DiT weights" in capsys.readouterr().err
    assert inference_sora.main(["--mm-model", str(tmp_path / "none.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
    # sequence parallel: 1x48x48 -> 9 video tokens, not divisible by TP 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = base_argv(paths, tmp_path, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--num-frames", "1",
                     "--height", "48", "--width", "48")
    assert inference_sora.main(argv) == 2
    assert "video tokens (9" in capsys.readouterr().err
    # argparse's own usage errors also exit with 2
    with pytest.raises(SystemExit) as e:
        inference_sora.main(base_argv(paths, tmp_path, "--prompt", "x", "--prompt-file", paths["prompts.txt"]))
    assert e.value.code == 2


def test_script_exit_code(paths, tmp_path):
    env = {**os.environ, "MM_BACKEND": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference_sora.py"),
                           *base_argv(paths, tmp_path, "--num-frames", "12")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "num_frames=12" in proc.stderr and "8n+1" in proc.stderr
    assert not (tmp_path / "0000_a_red_square_moving_right.mp4").exists()
