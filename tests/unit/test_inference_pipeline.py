"""Inference pipeline end to end on the tiny preset (one process, released-format weights): mp4s with the
right frame count/size/fps, sidecars, PNG for T=1, determinism per seed, resume, the fp32 CFG loop."""

import json
import os

import numpy as np
import pytest
import torch

from inference_artifacts import PROMPTS, base_argv, tiny_artifacts
from mm.diffusion import sampler
from mm.diffusion.sampler import NonFinitePredictionError
from mm.inference import OpenSoraPlanPipeline, OutputOptions, SamplingConfig, generate_videos
from mm.inference.cli import parse_request, run
from mm.inference.pipeline import sha256_prefix
from mm.inference.prompts import negative_text, positive_text
from mm.inference.video_io import read_video


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: OpenMP spinning makes tiny models ~50x slower
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def paths():
    return tiny_artifacts()


@pytest.fixture(scope="module")
def request_(paths, tmp_path_factory):
    return parse_request(base_argv(paths, tmp_path_factory.mktemp("unused")), world_size=1)


@pytest.fixture(scope="module")
def pipe(request_):
    return OpenSoraPlanPipeline.from_spec(request_.spec)


def _frames(path):
    return read_video(path)[0]


def test_end_to_end_writes_videos_and_sidecars(paths, tmp_path):
    req = parse_request(base_argv(paths, tmp_path, "--fps", "6", "--seed", "100", "--negative-prompt", "Ugly"),
                        world_size=1)
    summary = run(req, None)
    assert summary.generated == [0, 1, 2] and summary.skipped == []
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["0000_a_red_square_moving_right.json", "0000_a_red_square_moving_right.mp4",
                     "0001_a_blue_circle_moving_up.json", "0001_a_blue_circle_moving_up.mp4",
                     "0002_a_green_triangle_moving_left.json", "0002_a_green_triangle_moving_left.mp4",
                     "logs", "video_grid.mp4"]  # logs/: the run's inference_summary.json/.md
    assert summary.written[-1] == str(tmp_path / "video_grid.mp4")
    for i, prompt in enumerate(PROMPTS):
        stem = tmp_path / names[2 * i][:-5]
        frames, fps = read_video(f"{stem}.mp4")
        assert frames.shape == (9, 32, 32, 3) and fps == 6
        assert frames.std() > 1  # not a constant image
        meta = json.loads(open(f"{stem}.json").read())
        assert meta["prompt"] == prompt and meta["index"] == i and meta["seed"] == 100 + i
        assert meta["positive_text"] == positive_text(prompt) and meta["negative_text"] == negative_text("Ugly")
        assert meta["negative_prompt"] == "Ugly" and meta["file"] == f"{stem.name}.mp4"
        for key, value in dict(num_frames=9, height=32, width=32, fps=6, num_inference_steps=2, guidance_scale=4.0,
                               guidance_rescale=0.7, shift=3.0, schedule="static_shift").items():
            assert meta[key] == value, key
        assert meta["weights"]["dit"] == {"kind": "released", "path": paths["dit.pt"],
                                          "sha256": sha256_prefix(paths["dit.pt"])}
        assert meta["weights"]["vae"]["sha256"] == sha256_prefix(paths["wfvae.ckpt"])
        assert meta["config"] == paths["inference.json"] and "--seed" in meta["argv"]


def test_single_frame_writes_png(pipe, request_, tmp_path):
    cfg = SamplingConfig.from_spec(request_.spec, num_frames=1, height=48, width=32)
    generate_videos(pipe, PROMPTS[:1], cfg, OutputOptions(str(tmp_path), fps=8, progress=False))
    frames, _ = read_video(tmp_path / "0000_a_red_square_moving_right.png")
    assert frames.shape == (1, 48, 32, 3)
    assert (tmp_path / "0000_a_red_square_moving_right.json").is_file()


def test_seed_determinism_and_batch_independence(pipe, request_):
    cfg = SamplingConfig.from_spec(request_.spec)
    a = pipe(PROMPTS[:2], cfg, [5, 6])
    b = pipe(PROMPTS[1:2], cfg, [6])
    c = pipe(PROMPTS[1:2], cfg, [7])
    assert a.latents.dtype == torch.float32 and a.latents.shape == (2, 32, 2, 4, 4)
    assert a.videos.shape == (2, 9, 32, 32, 3) and a.videos.dtype == torch.uint8
    torch.testing.assert_close(a.latents[1:], b.latents, rtol=0, atol=1e-5)  # batch-mates do not matter
    assert (c.latents - b.latents).abs().max() > 0.1  # the seed does
    again = pipe(PROMPTS[1:2], cfg, [6])
    assert torch.equal(again.latents, b.latents) and torch.equal(again.videos, b.videos)


def test_resume_skips_finished_prompts(pipe, request_, tmp_path):
    cfg = SamplingConfig.from_spec(request_.spec)
    out = OutputOptions(str(tmp_path), fps=8, batch_size=2, progress=False)
    first = generate_videos(pipe, PROMPTS[:2], cfg, out)
    assert first.generated == [0, 1]
    stems = sorted(p.stem for p in tmp_path.glob("0*.mp4"))
    # the samples stay untouched; the grid and the run summary (logs/) are rewritten by every run that adds samples
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir() if not p.name.startswith("video_grid")
              and p.name != "logs"}
    video0 = _frames(tmp_path / f"{stems[0]}.mp4")

    second = generate_videos(pipe, PROMPTS, cfg, out)  # one more prompt: only it runs
    assert second.skipped == [0, 1] and second.generated == [2]
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())

    (tmp_path / f"{stems[0]}.json").unlink()  # interrupted between the video and its sidecar
    third = generate_videos(pipe, PROMPTS, cfg, out)
    assert third.generated == [0] and third.skipped == [1, 2]
    assert np.array_equal(_frames(tmp_path / f"{stems[0]}.mp4"), video0)  # same seed, same video
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files


def test_spatial_tiling_decode(paths, tmp_path):
    req = parse_request(base_argv(paths, tmp_path, "--prompt", "a red square", "--spatial-tiling",
                                  "--spatial-tile-size", "16", "--spatial-tile-overlap", "8"), world_size=1)
    run(req, None)
    frames, _ = read_video(tmp_path / "0000_a_red_square.mp4")
    assert frames.shape == (9, 32, 32, 3)
    assert json.loads((tmp_path / "0000_a_red_square.json").read_text())["vae_spatial_tiling"] == {"tile": 16,
                                                                                                  "overlap": 8}


class FakeDiT(torch.nn.Module):
    """v = latents * (mean of the first text token), in fp16 like a half-precision DiT; records its inputs."""

    def __init__(self, in_channels=32, fail_at=None):
        super().__init__()
        self.suv_config = type("C", (), {"in_channels": in_channels, "conditioning": None})()  # a T2V DiT
        self.params_dtype = torch.float16
        self.calls = []
        self.fail_at = fail_at

    def forward(self, latents, timestep, hidden, mask, pooled):
        assert latents.dtype == torch.float16
        self.calls.append((timestep.clone(), hidden[:, 0].mean(-1).clone()))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            return torch.full_like(latents, float("nan"))
        return (latents.float() * hidden[:, 0].mean(-1).view(-1, 1, 1, 1, 1).float()).half()


def test_cfg_loop_negative_first_fp32(pipe, request_):
    fake = FakeDiT()
    p = OpenSoraPlanPipeline(fake, None, pipe.t5, pipe.clip)
    cfg = SamplingConfig.from_spec(request_.spec, num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.5)
    uncond, cond = p.conditioning(PROMPTS[:2], cfg)
    noise = p.initial_noise([1, 2], cfg)
    assert torch.equal(noise[1], torch.randn(noise.shape[1:], generator=torch.Generator().manual_seed(2)))
    out = p.denoise(noise, uncond, cond, cfg)
    # the batch fed to the DiT is [uncond; cond] and the timesteps are 1000 * sigma_i
    s_u, s_c = uncond.hidden[:, 0].mean(-1), cond.hidden[:, 0].mean(-1)
    grid = cfg.sigmas()
    for i, (t, s) in enumerate(fake.calls):
        torch.testing.assert_close(s, torch.cat([s_u, s_c]))
        torch.testing.assert_close(t, torch.full((4,), 1000 * grid[i].item()))
    # reference: the same loop by hand, fp32 between steps
    x = noise.clone()
    for i in range(3):
        xh = x.half().float()
        v_u = (xh * s_u.view(-1, 1, 1, 1, 1)).half().float()
        v_c = (xh * s_c.view(-1, 1, 1, 1, 1)).half().float()
        x = x + (grid[i + 1] - grid[i]) * sampler.cfg(v_u, v_c, 5.0, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_non_finite_prediction_aborts(pipe, request_):
    p = OpenSoraPlanPipeline(FakeDiT(fail_at=1), None, pipe.t5, pipe.clip)
    cfg = SamplingConfig.from_spec(request_.spec, num_inference_steps=3)
    with pytest.raises(NonFinitePredictionError, match="step 1"):
        p(PROMPTS[:1], cfg, [0], decode=False)
