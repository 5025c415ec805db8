"""Observability of a training run (issue 22): one torchrun run at 2 ranks on the tiny preset with W&B offline,
TensorBoard every step and a console line every 2 steps; the sinks agree, upstream's awk extraction reads the
step time of megatron's iteration line, per-rank memory is present, the run summary says it finished; a
missing wandb package with --wandb-project is one error line (exit 2)."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tiny_workspace import ROOT, make_workspace
from torchrun_training import torchrun_losses

ITERS = 4
UPSTREAM_FPS_AWK = """grep "elapsed time per iteration" "$1" | awk -F ':' '{print$5}' | awk -F '|' '{print$1}'"""


def _wandb_records(run_file: str) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file (W&B's LevelDB-log framing: a 7-byte file header,
    32 KiB blocks, each chunk with a 7-byte header: CRC32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("wandb")  # in requirements.txt; optional only at run time
    tmp = tmp_path_factory.mktemp("obs")
    ws = make_workspace(tmp / "ws", num=2, cfg_rate=0.0)
    save = tmp / "c"
    os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"] = "offline", "true"
    try:
        _, out = torchrun_losses(ws, 2, ["--wandb-project", "osp", "--wandb-exp-name", "tiny", "--wandb-save-dir",
                                         str(tmp / "wb"), "--tensorboard-log-interval", "1"],
                                 save, ITERS, 2, log_interval=2)
    finally:
        del os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"]
    (tmp / "log.txt").write_text(out)
    return {"tmp": tmp, "save": save, "out": out, "ws": ws}


def test_megatron_line_read_by_upstreams_awk(run):
    ms = subprocess.run(["bash", "-c", UPSTREAM_FPS_AWK, "awk", str(run["tmp"] / "log.txt")], capture_output=True,
                        text=True, check=True).stdout.split()
    log = [json.loads(ln) for ln in (run["save"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4]  # --log-interval 2
    assert [float(v) for v in ms] == [round(1000 * r["step_time"], 1) for r in log]
    line = next(ln for ln in run["out"].splitlines() if "iteration        4/       4 |" in ln)
    fields = [f.split(":")[0].strip() for f in line.split(" mm.train ")[1].split("|")[1:8]]
    assert fields == ["consumed samples", "elapsed time per iteration (ms)", "learning rate", "global batch size",
                      "lm loss", "grad norm", "number of skipped iterations"]  # megatron's names and order
    assert "consumed samples:            8 |" in line and "global batch size:     2 |" in line
    assert "memory GiB min/max over ranks: rss " in line and "slowest rank: " in line and "ETA: " in line


def test_tensorboard_every_step_and_console_averages_over_the_interval(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["save"] / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(loss) == [1, 2, 3, 4]  # --tensorboard-log-interval 1
    log = {r["iteration"]: r for r in map(json.loads, (run["save"] / "train_log.jsonl").read_text().splitlines())}
    for it in (2, 4):  # megatron's averaging: the line's loss is the mean of the interval's steps
        assert log[it]["loss"] == pytest.approx((loss[it - 1] + loss[it]) / 2, rel=1e-5)
    for rank in (0, 1):  # every rank's memory in the sinks, plausible for a tiny CPU run
        rss = [e.value for e in events.Scalars(f"memory/rank{rank}/rss_gib")]
        assert len(rss) == ITERS and all(0.05 < v < 64 for v in rss)
    for tag in ("train/grad_norm", "train/lr", "train/samples_per_s", "train/step_time_s", "train/steps_update",
                "train/tflops_per_device", "data/bad_samples", "train/skipped_steps", "ranks/slow_rank"):
        assert len(events.Scalars(tag)) == ITERS, tag


def test_wandb_offline_run_has_the_tensorboard_scalars_and_the_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(run["tmp"] / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files  # rank 0 only
    records = _wandb_records(files[0])
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history[r.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                           for i in r.history.item}
    assert sorted(history) == [1, 2, 3, 4]
    events = EventAccumulator(str(run["save"] / "tensorboard"))
    events.Reload()
    for tag in events.Tags()["scalars"]:  # the same scalars from the one logging function
        for e in events.Scalars(tag):
            assert history[e.step][tag] == pytest.approx(e.value, rel=1e-6), (tag, e.step)
    config = [r.run.config for r in records if r.WhichOneof("record_type") == "run" and r.run.config.update]
    keys = {i.key for c in config for i in c.update}
    assert {"run", "model", "data"} <= keys
    run_cfg = json.loads(next(i.value_json for c in config for i in c.update if i.key == "run"))
    assert run_cfg["training"]["train_iters"] == ITERS and run_cfg["training"]["global_batch_size"] == 2


def test_summary_of_a_finished_run(run):
    s = json.loads((run["save"] / "run_summary.json").read_text())
    assert s["ended"] == "finished" and s["reason"] is None
    assert s["iterations"] == {"first": 0, "last": ITERS, "of": ITERS, "this_run": ITERS}
    assert s["checkpoints_written"] == [ITERS] and s["skipped_steps"] == 0 and s["bad_samples"] == {}
    assert len(s["peak_memory_gib_per_rank"]) == 2 and all(0.05 < m["rss_gib"] < 64
                                                           for m in s["peak_memory_gib_per_rank"])
    st, t = s["step_time_s"], s["wall_time_s"]
    assert 0 < st["p50"] <= st["p90"] <= st["max"] and st["mean"] * ITERS == pytest.approx(t["training"])
    assert t["training"] < t["total"] and s["samples_per_s"] == pytest.approx(2 / st["mean"])
    md = (run["save"] / "run_summary.md").read_text()
    assert "ended: **finished**" in md and "| 1 |" in md


def test_wandb_flag_without_the_package_is_one_error(run, tmp_path):
    # the package hidden from the finder, as on a cluster image without it
    code = ("import importlib.util as u, sys; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a); "
            f"sys.path.insert(0, {str(ROOT)!r}); import pretrain_sora; "
            "raise SystemExit(pretrain_sora.main(sys.argv[1:]))")
    ws = run["ws"]
    out = subprocess.run([sys.executable, "-c", code, "--mm-model", ws["model"], "--mm-data", ws["data"],
                          "--train-iters", "1", "--global-batch-size", "1", "--wandb-project", "osp"],
                         env=dict(os.environ, MM_BACKEND="cpu"), capture_output=True, text=True, timeout=120)
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and len(errors) == 1 and "wandb package is not installed" in errors[0], out.stderr
