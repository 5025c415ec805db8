"""Inference across ranks (gloo): TP=2 (+SP) == one process, training-checkpoint loading (EMA / raw) at
another TP size, DP-size independence of the outputs, and a real torchrun TP=2 run of inference_sora.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import run_distributed
from inference_artifacts import PROMPTS, base_argv, tiny_artifacts
from mm.inference.video_io import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def paths():
    return tiny_artifacts()


def _tp_latents(rank, world, paths):
    import dataclasses

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.inference import OpenSoraPlanPipeline, SamplingConfig
    from mm.inference.cli import parse_request

    spec = parse_request(base_argv(paths, "unused"), world_size=world).spec
    cfg = SamplingConfig.from_spec(spec)
    prompts = PROMPTS[:2]

    def latents(parallel, **kw):
        pipe = OpenSoraPlanPipeline.from_spec(kw.pop("spec", spec), parallel=parallel, **kw)
        return pipe(prompts, cfg, SEEDS, decode=False).latents, pipe.weights

    out = {}
    st = init_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    out["released_tp2_sp"], _ = latents(st)
    out["ema_tp2_sp"], out["ema_weights"] = latents(st, load=paths["ckpt"])
    st = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    out["raw_tp2"], out["raw_weights"] = latents(st, load=paths["ckpt"], use_ema=False)
    # one-process references (no process group involved)
    out["ref"], _ = latents(None)
    out["ref_half"], _ = latents(None, spec=dataclasses.replace(spec, predictor_checkpoint=paths["dit_half.pt"]))
    return out


def test_tp2_equals_one_process_and_checkpoint_loading(paths):
    r0, r1 = run_distributed(_tp_latents, 2, args=(paths,), timeout=120)
    for r in (r0, r1):  # both TP ranks hold the full result
        torch.testing.assert_close(r["released_tp2_sp"], r["ref"], rtol=0, atol=1e-5)
        # training checkpoint saved at TP=1 (raw = dit.pt, EMA = 0.5 x dit.pt), loaded at TP=2
        torch.testing.assert_close(r["ema_tp2_sp"], r["ref_half"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["raw_tp2"], r["ref"], rtol=0, atol=1e-5)
    assert (r0["ref"] - r0["ref_half"]).abs().max() > 0.01
    assert r0["ema_weights"]["dit"] == {"kind": "training_checkpoint", "path": paths["ckpt"], "weights": "ema",
                                        "iteration": 7}
    assert r0["raw_weights"]["dit"]["weights"] == "raw"


def _cli(rank, world, argv):
    from mm.distributed.init import init_parallel
    from mm.inference.cli import parse_request, run

    req = parse_request(argv, world_size=world)
    summary = run(req, init_parallel(req.parallel))
    return summary.generated


def _outputs(directory):
    out = {}
    for p in sorted(os.listdir(directory)):
        if p.endswith(".mp4"):
            out[p] = read_video(os.path.join(directory, p))[0]
            out[p + ":bytes"] = open(os.path.join(directory, p), "rb").read()
        elif p.endswith(".json"):
            meta = json.loads(open(os.path.join(directory, p)).read())
            out[p] = {k: v for k, v in meta.items() if k not in ("created", "argv")}
    return out


def test_outputs_do_not_depend_on_dp_size(paths, tmp_path):
    one = run_distributed(_cli, 1, args=(base_argv(paths, tmp_path / "dp1"),), timeout=120)
    two = run_distributed(_cli, 2, args=(base_argv(paths, tmp_path / "dp2"),), timeout=120)
    assert one == [[0, 1, 2]] and two == [[0, 2], [1]]  # batch b on replica b % DP
    a, b = _outputs(tmp_path / "dp1"), _outputs(tmp_path / "dp2")
    assert sorted(a) == sorted(b) and len(a) == 11  # 3 x (mp4, its bytes, sidecar) + the grid (mp4, bytes)
    for name in a:  # same frames, same mp4 bytes, same sidecars
        if name.endswith(".mp4"):
            assert np.array_equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


def test_torchrun_tp2_smoke(paths, tmp_path):
    """The real launcher: 2 processes, TP=2 + SP, batch of 2; the videos match a one-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MM_BACKEND": "cpu", "PYTHONPATH": ROOT}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    argv = base_argv(paths, tmp_path / "tp2", "--prompt-file", paths["prompts.txt"], "--batch-size", "2",
                     "--seed", "11")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "inference_sora.py"), *argv, "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = _outputs(tmp_path / "tp2")
    assert len(tp2) == 11  # with the grid

    from mm.inference.cli import parse_request, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(parse_request(base_argv(paths, tmp_path / "tp1", "--batch-size", "2", "--seed", "11"), world_size=1), None)
    finally:
        torch.set_num_threads(threads)
    tp1 = _outputs(tmp_path / "tp1")
    assert sorted(tp1) == sorted(tp2)
    for name in tp1:
        if name.endswith(":bytes"):
            continue
        if name.endswith(".mp4"):
            assert tp2[name].shape == ((9, 68, 68, 3) if name.startswith("video_grid") else (9, 32, 32, 3))
            # latents agree to ~1e-6 (README: reproducibility); a pixel that rounds the other way before
            # H.264 encoding changes the encoder's choices for its block, so frames agree to a mean of < 0.5
            # grey levels (as the CFG-parallel test), far below what a wrong sample gives (tens)
            assert np.abs(tp1[name].astype(int) - tp2[name].astype(int)).mean() < 0.5, name
        else:
            assert tp1[name] == tp2[name], name
