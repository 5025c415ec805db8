"""mm.tools.preflight on 2 gloo ranks: a launch that passes, and one with three missing inputs listed together."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from harness import run_distributed
from tiny_workspace import make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("preflight_ws"), num=2)


def _preflight(rank, world, argv):
    from mm.tools.preflight import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _argv(model, data, save):
    return ["--mm-model", model, "--mm-data", data, "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--save", save, "--sample-videos", "2",
            "--comm-mb", "0.25"]


def test_preflight_passes_on_a_good_launch(ws, tmp_path):
    (code0, out0), (code1, out1) = run_distributed(_preflight, 2, args=(_argv(ws["model"], ws["data"],
                                                                               str(tmp_path / "ckpt")),), timeout=180)
    assert (code0, code1) == (0, 0), out0
    assert "all checks passed on 2 ranks" in out0 and out1 == ""  # rank 0 prints the one table
    for check in ("megatron-core", "devices", "config + inputs", "layout vs sequence", "data sample",
                  "checkpoint disk", "shared checkpoint fs", "all-reduce world", "all-to-all world", "all-reduce TP",
                  "all-to-all TP"):
        assert check in out0, check
    assert "FAIL" not in out0
    assert not list((tmp_path / "ckpt").iterdir())  # the token file is removed


def test_preflight_lists_three_missing_paths_at_once(ws, tmp_path):
    model = json.load(open(ws["model"]))
    model["ae"]["from_pretrained"] = str(tmp_path / "missing_vae.ckpt")
    model["text_encoder"]["from_pretrained"] = str(tmp_path / "missing_t5")
    (tmp_path / "model.json").write_text(json.dumps(model))
    data = json.load(open(ws["data"]))
    (tmp_path / "data.txt").write_text(f"{ws['data_dir']},{tmp_path / 'missing_annotation.json'}\n")
    data["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "data.txt")
    (tmp_path / "data.json").write_text(json.dumps(data))
    argv = _argv(str(tmp_path / "model.json"), str(tmp_path / "data.json"), str(tmp_path / "ckpt"))
    (code0, out0), (code1, _) = run_distributed(_preflight, 2, args=(argv,), timeout=180)
    assert (code0, code1) == (1, 1)
    fails = [line for line in out0.splitlines() if " FAIL " in line]
    assert len(fails) == 3, out0
    for missing in ("missing_vae.ckpt", "missing_t5", "missing_annotation.json"):
        assert sum(missing in line for line in fails) == 1, (missing, out0)
    assert "3 problem(s) on 2 ranks" in out0
