"""Stage recipes (mm.tools.recipes): consistent with their reported device counts, renderable into valid
JSONs with absolute paths, feasible per the planner, inconsistent numbers refused."""

from __future__ import annotations

import json

import pytest

import plan_fixtures



def test_every_stage_of_the_report_is_present():
    from mm.tools.recipes import STAGES

    for name in ("Image-1", "Image-2", "Image-3", "Image-4", "Video-1", "Video-2", "Video-3", "Video-4", "Video-5"):
        assert name in STAGES
    reported = {"Video-1": (2, 2, 2), "Video-3": (4, 2, 4), "Video-4": (4, 4, 1)}  # TP/SP, GA, MBS (spec §11.4)
    for name, (tp, ga, mbs) in reported.items():
        s = STAGES[name]
        assert (s.tp, s.grad_accum, s.micro_batch) == (tp, ga, mbs)


@pytest.mark.parametrize("name", ["Image-1", "Image-3", "Video-1", "Video-3", "Video-4", "Video-4b", "Video-5"])
def test_grad_accumulation_matches_the_reported_devices(name):
    from mm.tools.recipes import STAGES, micro_batches

    s = STAGES[name]
    dp, ga = micro_batches(s, s.devices)
    assert ga == s.grad_accum and s.micro_batch * dp * ga == s.global_batch


def test_micro_batches_follow_the_world_size_and_refuse_what_does_not_divide():
    from mm.tools.recipes import STAGES, micro_batches

    v4 = STAGES["Video-4"]
    assert micro_batches(v4, 1024) == (256, 2)
    assert micro_batches(v4, 8) == (2, 256)
    with pytest.raises(ValueError, match="not divisible by micro-batch 1 x data-parallel size 6"):
        micro_batches(v4, 24)
    with pytest.raises(ValueError, match="not a multiple of TP x CP = 4"):
        micro_batches(v4, 6)


@pytest.fixture(scope="module")
def released_facts():
    return plan_fixtures.released_facts()


def test_every_stage_fits_its_devices_per_the_planner(released_facts):
    from mm.tools.plan import DEVICES, Layout, Workload, estimate
    from mm.tools.recipes import STAGES, micro_batches

    for s in STAGES.values():
        dp, _ = micro_batches(s, s.devices)
        work = Workload.from_pixels(released_facts, s.frames, s.height, s.width, text_len=512,
                                    micro_batch=s.micro_batch, global_batch=s.global_batch)
        layout = Layout(tp=s.tp, cp=s.cp, dp=dp, sequence_parallel=s.tp > 1, recompute="selective",
                        recompute_layers=s.recompute_ffn_layers)
        est = estimate(released_facts, layout, work, DEVICES["910b"], s.devices)
        assert est.feasible, (s.name, est.problems)


@pytest.mark.parametrize("name", ["Image-1", "Video-4"])
def test_render_writes_valid_jsons_with_absolute_paths(name, tmp_path):
    from mm.config_upstream import load_data_config, load_model_json
    from mm.tools.recipes import STAGES, render

    s = STAGES[name]
    flags = render(s, 16, str(tmp_path / "pretrained"), str(tmp_path / "run"))
    spec = load_model_json(flags[flags.index("--mm-model") + 1])
    data = load_data_config(flags[flags.index("--mm-data") + 1])
    assert spec.ae_checkpoint == str(tmp_path / "pretrained/wfvae/wfvae_888_dim32.ckpt")
    assert spec.text.t5 == str(tmp_path / "pretrained/t5-v1_1-xl")
    assert spec.suv_config().sparse1d == s.sparse
    assert (data.num_frames, data.max_height, data.max_width, data.train_fps) == (s.frames, s.height, s.width, s.fps)
    assert data.force_5_ratio == s.multi_res and data.force_resolution != s.multi_res
    ga = s.global_batch // (s.micro_batch * (16 // (s.tp * s.cp)))
    assert (data.batch_size, data.gradient_accumulation_size) == (s.micro_batch, ga)
    doc = json.loads((tmp_path / "run/data.json").read_text())["dataset_param"]
    assert doc["basic_parameters"]["data_path"].startswith("/")
    assert doc["tokenizer_config"]["from_pretrained"] == str(tmp_path / "pretrained/t5-v1_1-xl")
    assert flags[flags.index("--global-batch-size") + 1] == str(s.global_batch)
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == str(s.tp)


def test_cli_refuses_inconsistent_numbers(tmp_path, capsys):
    from mm.tools.recipes import main

    assert main(["render", "Video-4", "--world-size", "24", "--pretrained", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: stage Video-4: global batch 512 is not divisible")
    assert main(["render", "Video-9", "--world-size", "8", "--pretrained", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "unknown stage 'Video-9'" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "Video-4b" in capsys.readouterr().out
