"""inference_sora.py's run summary (issue 22 item 6): prompts generated and skipped over the replicas, seconds
per sample and per denoising step, peak memory of every rank, in <save-path>/logs/inference_summary.json/.md."""

import json
import os


from harness import run_distributed
from inference_artifacts import base_argv, tiny_artifacts


def _cli(rank, world, argv):
    from mm.distributed.init import init_parallel
    from mm.inference.cli import parse_request, run

    req = parse_request(argv, world_size=world)
    return run(req, init_parallel(req.parallel)).generated


def test_inference_summary_counts_timings_and_memory(tmp_path):
    paths = tiny_artifacts()
    out = tmp_path / "out"
    argv = base_argv(paths, out, "--prompt-file", paths["prompts.txt"], "--no-grid")
    run_distributed(_cli, 2, args=(argv,), timeout=180)
    first = json.loads((out / "logs" / "inference_summary.json").read_text())
    assert (first["prompts"], first["generated"], first["skipped_already_complete"], first["replicas"]) == (3, 3, 0, 2)
    assert 0 < first["seconds_per_denoising_step"] < first["seconds_per_sample"] < first["generation_wall_s"]
    assert len(first["peak_memory_gib_per_rank"]) == 2
    assert all(0.05 < m["rss_gib"] < 64 for m in first["peak_memory_gib_per_rank"])
    sidecars = sorted(p for p in os.listdir(out) if p.endswith(".json"))
    assert len(sidecars) == 3  # the summary is not among the samples' sidecars
    os.remove(out / sidecars[1])  # one sample to redo; the other two are skipped
    run_distributed(_cli, 1, args=(argv,), timeout=180)
    again = json.loads((out / "logs" / "inference_summary.json").read_text())
    assert (again["generated"], again["skipped_already_complete"], again["replicas"]) == (1, 2, 1)
    md = (out / "logs" / "inference_summary.md").read_text()
    assert "generated 1, skipped (already complete) 2" in md and "| 0 |" in md
