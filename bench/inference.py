"""Batch-inference throughput of each parallel mode vs one process (issue: batch inference at scale).

For a config (``tiny``: the test preset, 9x32x32, 2 heads; ``mid``: 4 heads x 32, 17x64x64) it samples the
same prompts with one process and with 2 ranks in each mode — DP 2 (prompts split), TP 2 + SP,
``--cfg-parallel``, CP 2 Ulysses, ring and skiparse, and TP 2 with ``--parallel-vae-decode`` — on the current
backend (gloo + CPU here; the same script on GPUs), and reports seconds per sample (sampling + decode,
per replica's throughput: for DP the wall time of all prompts / their number), seconds per DiT step and
the speed-up of each mode vs one process (one process's seconds per sample / the mode's). One warm-up
sample per mode is not timed. Prints a table; the last line is one JSON object:
``{"bench": "inference", "configs": {"tiny": {"speedup": {"dp2": .., "tp2": .., "cfg2": .., ...}}, ...}}``.

    python bench/inference.py [--configs tiny mid] [--prompts 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny artefacts and the gloo launcher of the tests

MODES = {  # name: (ranks, ParallelConfig kwargs, cfg_parallel, parallel_vae_decode)
    "one": (1, {}, False, False),
    "dp2": (2, {}, False, False),
    "tp2": (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, False, False),
    "cfg2": (2, {}, True, False),
    "cp2_ulysses": (2, {"context_parallel_size": 2}, False, False),
    "cp2_ring": (2, {"context_parallel_size": 2, "context_parallel_algo": "megatron_cp_algo"}, False, False),
    "cp2_skiparse": (2, {"context_parallel_size": 2, "context_parallel_algo": "skiparse_cp_algo"}, False, False),
    "tp2_vae2": (2, {"tensor_model_parallel_size": 2}, False, True),
}
SIZES = {"tiny": (9, 32, 32), "mid": (17, 64, 64)}


def _config(paths: dict, name: str) -> tuple[str, str]:
    """The inference JSON and DiT weights of a bench config (``mid``: a wider DiT, its own random weights)."""
    if name == "tiny":
        return paths["inference.json"], paths["dit.pt"]
    import torch

    from mm.models.sparse_ummdit import SparseUMMDiT

    root = Path(paths["root"])
    spec = json.loads(Path(paths["inference.json"]).read_text())
    spec["predictor"].update(num_heads=4, head_dim=32, timestep_embed_dim=128)
    spec["pipeline_config"]["input_size"] = list(SIZES[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = SparseUMMDiT.from_upstream({k: v for k, v in spec["predictor"].items() if k != "from_pretrained"})
    torch.save(dit.state_dict(), root / f"dit_{name}.pt")
    path = root / f"inference_{name}.json"
    path.write_text(json.dumps(spec, indent=1))
    return str(path), str(root / f"dit_{name}.pt")


def _run_mode(rank, world, spec_path, dit_path, paths, mode, num_prompts, steps):
    import torch

    from mm.config import ParallelConfig
    from mm.distributed.cfg_parallel import init_replicas
    from mm.distributed.init import init_parallel
    from mm.distributed.parallel_decode import apply_parallel_decode
    from mm.inference import OpenSoraPlanPipeline, SamplingConfig
    from mm.inference.cli import parse_request
    from mm.inference.prompts import shard

    _, kwargs, cfg_parallel, vae_parallel = MODES[mode]
    extra = ["--spatial-tiling", "--spatial-tile-size", "16", "--spatial-tile-overlap", "8"] if vae_parallel else []
    argv = ["--mm-model", spec_path, "--upstream-dit", dit_path, "--upstream-vae", paths["wfvae.ckpt"], "--save-path", "unused",
            "--num-inference-steps", str(steps), *extra]
    spec = parse_request(argv, world_size=world).spec
    cfg = SamplingConfig.from_spec(spec)
    parallel = init_parallel(ParallelConfig(**kwargs))
    replicas = init_replicas(parallel, cfg_parallel)
    pipe = OpenSoraPlanPipeline.from_spec(spec, parallel=parallel, replicas=replicas)
    if vae_parallel:
        apply_parallel_decode(pipe.vae, replicas)
    decode = replicas.is_writer or vae_parallel
    from inference_artifacts import PROMPTS

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
    pipe(prompts[:1], cfg, [0], decode=decode)  # warm-up
    mine = [i for batch in shard(num_prompts, 1, replicas.dp_rank, replicas.dp_size) for i in batch]
    step_times = []
    torch.distributed.barrier()
    start = time.perf_counter()
    for i in mine:
        t0 = time.perf_counter()
        latents = pipe.denoise(pipe.initial_noise([i], cfg), *pipe.conditioning([prompts[i]], cfg), cfg)
        step_times.append((time.perf_counter() - t0) / cfg.num_inference_steps)
        if decode:
            pipe.decode(latents)
    torch.distributed.barrier()
    total = time.perf_counter() - start
    return {"s_per_sample": total / num_prompts, "s_per_step": sum(step_times) / len(step_times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--prompts", type=int, default=2, help="prompts per mode (an even number spreads over DP 2)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per prompt")
    args = ap.parse_args()
    os.environ.setdefault("MM_BACKEND", "cpu")
    from harness import run_distributed
    from inference_artifacts import tiny_artifacts

    paths = tiny_artifacts()
    summary = {"bench": "inference", "prompts": args.prompts, "steps": args.steps, "configs": {}}
    rows = []
    for name in args.configs:
        spec_path, dit_path = _config(paths, name)
        results = {}
        for mode in ["one", *[m for m in args.modes if m != "one"]]:
            ranks = MODES[mode][0]
            results[mode] = run_distributed(_run_mode, ranks, args=(spec_path, dit_path, paths, mode, args.prompts, args.steps),
                                            timeout=1800)[0]
        base = results["one"]["s_per_sample"]
        speedup = {m: round(base / r["s_per_sample"], 3) for m, r in results.items() if m != "one"}
        summary["configs"][name] = {"size": SIZES[name], "s_per_sample": {m: round(r["s_per_sample"], 4)
                                                                          for m, r in results.items()},
                                    "s_per_step": {m: round(r["s_per_step"], 4) for m, r in results.items()},
                                    "speedup": speedup}
        rows += [(name, m, MODES[m][0], r["s_per_sample"], r["s_per_step"], speedup.get(m, 1.0))
                 for m, r in results.items()]
    print(f"{'config':<6} {'mode':<12} {'ranks':>5} {'s/sample':>9} {'s/step':>8} {'speed-up':>8}")
    for name, mode, ranks, per_sample, per_step, up in rows:
        print(f"{name:<6} {mode:<12} {ranks:>5} {per_sample:>9.3f} {per_step:>8.4f} {up:>8.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
