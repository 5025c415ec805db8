"""One validation pass before anything is built (issue 13 items 3, 4, 6): every problem is one
``error:`` line, exit 2, no traceback, driven through the real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_workspace import ROOT


def _train(ws, *extra, world=1, monkeypatch=None):
    import pretrain_sora

    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    return pretrain_sora.main(["--mm-model", ws["model"], "--mm-data", ws["data"], "--train-iters", "2", *extra])


def _errors(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if "error:" in ln]


@pytest.mark.parametrize("extra, world, words", [
    (["--train-iters", "-1"], 1, "train_iters=-1"),
    (["--micro-batch-size", "0"], 1, "micro_batch_size=0"),
    (["--ema-decay", "1.5"], 1, "ema_decay=1.5"),
    (["--global-batch-size", "3"], 2, "global_batch_size 3 is not divisible"),
    (["--tensor-model-parallel-size", "3"], 3, "does not divide the model's 4 attention heads"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--load", "/no/such/ckpt"], 1, "--load /no/such/ckpt: no such directory"),
    (["--rollback-on-spike", "0.5"], 1, "rollback_on_spike=0.5"),
])
def test_each_bad_flag_is_one_error_line(ws, capsys, monkeypatch, extra, world, words):
    assert _train(ws, *extra, world=world, monkeypatch=monkeypatch) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and words in lines[0], lines


def test_finetune_into_a_directory_with_checkpoints(ws, tmp_path, capsys, monkeypatch):
    from mm.training.checkpointing import LATEST

    (tmp_path / "iter_0000010").mkdir()
    (tmp_path / LATEST).write_text("10\n")
    assert _train(ws, "--finetune", "--load", str(tmp_path), "--save", str(tmp_path), monkeypatch=monkeypatch) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "--finetune restarts at iteration 0" in lines[0], lines


def test_all_problems_reported_at_once(ws, tmp_path, capsys, monkeypatch):
    model = json.loads(Path(ws["model"]).read_text())
    model["text_encoder"]["from_pretrained"] = str(tmp_path / "no_t5")
    (tmp_path / "model.json").write_text(json.dumps(model))
    data = json.loads(Path(ws["data"]).read_text())
    data["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "data.txt")
    (tmp_path / "data.txt").write_text(f"{tmp_path}/clips,{tmp_path}/ann1.json\n{tmp_path},{tmp_path}/ann2.json\n")
    (tmp_path / "data.json").write_text(json.dumps(data))
    import pretrain_sora

    monkeypatch.setenv("WORLD_SIZE", "1")
    code = pretrain_sora.main(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
                               "--train-iters", "0", "--micro-batch-size", "0", "--load", str(tmp_path / "typo")])
    lines = _errors(capsys)
    assert code == 2
    for words in ("T5 directory", "ann1.json", "ann2.json", "data folder not found", "train_iters=0",
                  "micro_batch_size=0", "typo: no such directory"):
        assert sum(words in ln for ln in lines) == 1, (words, lines)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["dataset_param"]["preprocess_parameters"].update(num_frame=17), "num_frame: unknown key (did you mean 'num_frames'"),
    (lambda d: d["dataloader_param"].update(batch_sise=2), "dataloader_param.batch_sise: unknown key"),
    (lambda d: d["dataset_param"]["preprocess_parameters"].update(num_frames="17"), "must be an integer, got '17'"),
])
def test_data_json_mistakes(ws, tmp_path, capsys, monkeypatch, mutate, words):
    data = json.loads(Path(ws["data"]).read_text())
    data["dataset_param"]["basic_parameters"]["data_path"] = str(Path(ws["data"]).parent / data["dataset_param"][
        "basic_parameters"]["data_path"])
    mutate(data)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    assert _train({"model": ws["model"], "data": str(path)}, monkeypatch=monkeypatch) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and words in lines[0], lines


def test_missing_mm_model_and_missing_files_in_tools(ws, tmp_path, capsys):
    import pretrain_sora
    from mm.data import extract_features, inspect

    with pytest.raises(SystemExit) as e:
        pretrain_sora.main(["--mm-data", ws["data"]])
    assert e.value.code == 2 and "--mm-model" in _errors(capsys)[0]
    for main, argv in ((inspect.main, ["--data", str(tmp_path / "nope.json")]),
                       (extract_features.main, ["--data", str(tmp_path / "nope.json"), "--vae-config",
                                                str(tmp_path / "vae.json")])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        lines = _errors(capsys)
        assert e.value.code == 2 and len(lines) == 1 and "nope.json" in lines[0], lines


def test_torchrun_prints_each_problem_once(ws, tmp_path):
    """Under torchrun only rank 0 prints: one line per problem, not one per worker, and no traceback of ours."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", str(ROOT / "pretrain_sora.py"), "--mm-model", ws["model"],
           "--mm-data", ws["data"], "--global-batch-size", "3", "--ema-decay", "1.5"]
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, MM_BACKEND="cpu", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert text.count("pretrain_sora.py: error:") == 2, text[-3000:]
    assert "global_batch_size 3" in text and "ema_decay=1.5" in text
    assert 'pretrain_sora.py", line' not in text  # no traceback through our entry point
