import sys
from pathlib import Path

import pytest
import torch

from harness import run_distributed
from tiny_workspace import ROOT

sys.path.insert(0, str(ROOT / "checkpoint_tools"))

import export_dit  # noqa: E402
import merge_upstream_tp  # noqa: E402


def _tiny_predictor():
    from mm.models.suv_config import tiny_suv_config

    return tiny_suv_config()


def _write_training_checkpoint(rank, world, model_json, root):
    """A TP=2 training-format checkpoint whose EMA differs from the weights."""
    from mm.builders import build_suv
    from mm.config import ParallelConfig
    from mm.config_upstream import load_model_json
    from mm.distributed.init import init_parallel
    from mm.models.sparse_ummdit import gather_upstream_state_dict
    from mm.training.checkpointing import save_checkpoint

    ps = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    torch.manual_seed(0)
    model = build_suv(load_model_json(model_json), ps)
    ema = {n: p.detach() * 0.5 for n, p in model.named_parameters()}
    save_checkpoint(root, 3, model, None, {"iteration": 3}, ema_weights=ema)
    return gather_upstream_state_dict(model)


def test_export_ema_and_raw_from_tp2_checkpoint(tmp_path):
    import json

    from mm.models import SparseUMMDiT

    model_json = tmp_path / "m.json"
    model_json.write_text(json.dumps({"ae": {}, "predictor": _tiny_predictor()}))
    full = run_distributed(_write_training_checkpoint, 2, args=(str(model_json), str(tmp_path / "ck")), timeout=120)[0]
    for raw, out in ((False, tmp_path / "ema.safetensors"), (True, tmp_path / "raw.pt")):
        res = run_distributed(_export, 1, args=(str(model_json), str(tmp_path / "ck"), str(out), raw), timeout=120)
        assert res == [True]
        loaded = SparseUMMDiT.from_upstream(_tiny_predictor(), checkpoint=out).state_dict()
        assert loaded.keys() == full.keys()
        for k, v in full.items():
            torch.testing.assert_close(loaded[k], v if raw else v * 0.5, rtol=0, atol=0, msg=k)


def _export(rank, world, model_json, load, out, raw):
    export_dit.export(model_json, load, out, raw=raw)
    return True


def test_export_rejects_bad_output_name(tmp_path):
    assert export_dit.main(["--mm-model", "x.json", "--load", str(tmp_path), "--out", "model.bin"]) == 2


def test_merge_upstream_tp_shards(tmp_path):
    from mm.models import SparseUMMDiT
    from mm.models.sparse_ummdit import split_tp_state_dict

    torch.manual_seed(0)
    full = SparseUMMDiT.from_upstream(_tiny_predictor()).state_dict()
    it = tmp_path / "save" / "iter_0000010"
    for r in range(2):
        shard = split_tp_state_dict(full, 2, r)
        shard["transformer_blocks.0.0.attn1.to_q._extra_state"] = None
        (it / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save({"model": shard, "ema_model": {k: v * 2 for k, v in shard.items() if v is not None}},
                   it / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("10")
    merged = merge_upstream_tp.merge(tmp_path / "save")
    assert merged.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(merged[k], full[k], rtol=0, atol=0)
    ema = merge_upstream_tp.merge(tmp_path / "save", ema=True)
    torch.testing.assert_close(ema["proj_out.weight"], 2 * full["proj_out.weight"])
    (it / "mp_rank_00_001").mkdir()
    with pytest.raises(ValueError, match="pipeline-parallel"):
        merge_upstream_tp.merge(tmp_path / "save")
    with pytest.raises(FileNotFoundError, match="no mp_rank"):
        merge_upstream_tp.merge(tmp_path / "nothing")
