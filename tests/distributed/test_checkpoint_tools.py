"""checkpoint_tools: the round-trip chain over every layout (bitwise for fp32), an upstream legacy save built
by hand from spec §10.1, EMA/raw selection, and bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools import cli
from checkpoint_tools.keyspace import CheckpointError
from harness import run_distributed
from tiny_workspace import ROOT


def _predictor():
    """The tiny preset with 4 heads, so TP = 4 splits whole heads."""
    from mm.models.suv_config import tiny_suv_config

    return {**tiny_suv_config(), "num_heads": 4}


def _random_full_state(seed=0):
    """A full released-key-space state dict with every tensor random (skip linears too, not [I|0])."""
    from mm.models import SparseUMMDiT

    torch.manual_seed(seed)
    full = SparseUMMDiT.from_upstream(_predictor()).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in full.items()}


def _save_ours_tp2(rank, world, root, raw, ema):
    from mm.builders import build_suv
    from mm.config import ParallelConfig
    from mm.config_upstream import load_model_json
    from mm.distributed.init import init_parallel
    from mm.models.sparse_ummdit import load_upstream_state_dict, split_tp_state_dict
    from mm.training.checkpointing import save_checkpoint

    ps = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    model = build_suv(load_model_json({"ae": {}, "predictor": _predictor()}), ps)
    load_upstream_state_dict(model, raw)
    ema_local = split_tp_state_dict(ema, 2, ps.tp_rank)
    save_checkpoint(root, 7, model, None, {"iteration": 7, "samples_seen": 28}, ema_weights=ema_local)
    return True


@pytest.fixture(scope="module")
def ours_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ours") / "ckpt"
    raw, ema = _random_full_state(0), _random_full_state(1)
    assert run_distributed(_save_ours_tp2, 2, args=(str(root), raw, ema), timeout=180) == [True, True]
    return root, raw, ema


def _assert_diff_equal(a, b, **kw):
    equal, lines = cli.diff(str(a), str(b), **kw)
    assert equal, "\n".join(lines)


def test_round_trip_chain_every_layout(ours_tp2, tmp_path):
    """ours TP2 -> upstream-legacy TP4 PP2 -> ours TP1 -> released -> diffusers -> ours, diff equal at every
    step (bitwise, fp32), and the end loads into the model."""
    root, raw, ema = ours_tp2
    src = cli.open_checkpoint(root)
    assert (src.format, src.iteration, src.layout) == ("ours", 7, {"tp": 2, "pp": 1, "dp": 1})
    for k in ("transformer_blocks.6.1.attn1.to_q.weight", "skip_norm_linear.0.1.weight"):
        assert torch.equal(src.read("raw", k), raw[k]) and torch.equal(src.read("ema", k), ema[k])

    legacy = tmp_path / "legacy"
    cli.convert(str(root), str(legacy), "upstream-legacy", tp=4, pp=2)
    ranks = sorted(p.name for p in (legacy / "iter_0000007").iterdir() if p.is_dir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}" for t in range(4) for p in range(2)]
    shard = torch.load(legacy / "iter_0000007" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    # PP rank 1 holds U stages 4..6 renumbered from 0: the last block is stage 2 there, with its dead text
    # modules (TP > 1) and megatron's _extra_state entries
    assert shard["model"]["transformer_blocks.2.1.ff_enc.net.2.weight"].shape == (64, 64)
    assert "transformer_blocks.2.1.attn1.to_q._extra_state" in shard["model"]
    assert shard["model"]["transformer_blocks.0.0.attn1.to_q.weight"].shape == (16, 64)
    assert "patch_embed.proj.weight" not in shard["model"] and "proj_out.weight" in shard["model"]
    _assert_diff_equal(root, legacy, all_groups=True)  # weights and EMA

    ours1 = tmp_path / "ours1"
    cli.convert(str(legacy), str(ours1), "ours")
    assert cli.open_checkpoint(ours1).layout == {"tp": 1, "pp": 1, "dp": 1}
    _assert_diff_equal(legacy, ours1, all_groups=True)
    assert cli.verify(str(ours1)) == []

    released = tmp_path / "model_ema.safetensors"
    cli.convert(str(ours1), str(released), "released")  # the EMA by default
    _assert_diff_equal(ours1, released, ema=True)
    raw_file = tmp_path / "model.safetensors"
    cli.convert(str(ours1), str(raw_file), "released", ema=False)
    assert not cli.diff(str(raw_file), str(released))[0]  # --raw took the raw weights, not the EMA

    hf = tmp_path / "diffusers"
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps({"predictor": _predictor()}))
    cli.convert(str(released), str(hf), "diffusers", mm_model=str(model_json), max_shard_size_gb=20e3 / 2**30)
    assert len(list(hf.glob("*.safetensors"))) > 1
    _assert_diff_equal(released, hf)

    back = tmp_path / "ours_back"
    cli.convert(str(hf), str(back), "ours")
    _assert_diff_equal(hf, back)

    from mm.models import SparseUMMDiT

    model = SparseUMMDiT.from_upstream(str(hf / "config.json"), checkpoint=released)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    run_distributed(_load_ours, 1, args=(str(back), ema), timeout=120)  # the end of the chain == the start's EMA


def _load_ours(rank, world, root, ema):
    """The trainer's loader reads a converted checkpoint (raw weights = the EMA it was made from)."""
    from mm.builders import build_suv
    from mm.config import ParallelConfig
    from mm.config_upstream import load_model_json
    from mm.distributed.init import init_parallel
    from mm.training.checkpointing import load_checkpoint

    ps = init_parallel(ParallelConfig())
    model = build_suv(load_model_json({"ae": {}, "predictor": _predictor()}), ps)
    load_checkpoint(root, model, None, load_rng=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_legacy_written_by_hand_from_the_spec_merges(tmp_path):
    """A TP2 x PP2 upstream save built with spec §10.1's rules directly (not with our split function)."""
    full = _random_full_state(3)
    save = tmp_path / "save"
    it = save / "iter_0000012"
    column = tuple(f"{m}.{p}" for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.add_q_proj",
                                         "attn1.add_k_proj", "attn1.add_v_proj", "net.0.proj", "linear")
                   for p in ("weight", "bias"))
    row = ("attn1.to_out.0.weight", "attn1.to_add_out.weight", "net.2.weight")
    stages_of = {0: [0, 1, 2], 1: [3, 4, 5, 6]}  # any contiguous split; the reader renumbers by counts
    for p, stages in stages_of.items():
        for t in range(2):
            model = {}
            for k, v in full.items():
                parts = k.split(".")
                if parts[0] == "transformer_blocks":
                    s = int(parts[1])
                    if s not in stages:
                        continue
                    parts[1] = str(s - stages[0])
                elif p == 1 and parts[0] in ("patch_embed", "caption_projection"):
                    continue
                local = ".".join(parts)
                if k.endswith(column):
                    v = v[t * v.shape[0] // 2:(t + 1) * v.shape[0] // 2]
                elif k.endswith(row):
                    v = v[:, t * v.shape[1] // 2:(t + 1) * v.shape[1] // 2]
                model[local] = v.clone()
                if k.endswith(".weight") and k.endswith(column + row):
                    model[local[: -len(".weight")] + "._extra_state"] = None
            if p == 1:  # the last block's dead text modules, as TP > 1 upstream saves hold them
                model["transformer_blocks.3.1.ff_enc.net.0.proj.weight"] = torch.zeros(128, 64)
                model["transformer_blocks.3.1.norm2.norm_enc.weight"] = torch.ones(64)
            d = it / f"mp_rank_{t:02d}_{p:03d}"
            d.mkdir(parents=True)
            torch.save({"model": model, "iteration": 12, "checkpoint_version": 3.0}, d / "model_optim_rng.pt")
    (save / "latest_checkpointed_iteration.txt").write_text("12")
    src = cli.open_checkpoint(save)
    assert (src.format, src.iteration, src.layout) == ("upstream-legacy", 12, {"tp": 2, "pp": 2})
    assert set(src.keys("raw")) == set(full)
    for k, v in full.items():
        assert torch.equal(src.read("raw", k), v), k
    out = tmp_path / "model.pt"
    cli.convert(str(save), str(out), "released", ema=False)
    assert set(torch.load(out)) == set(full)


def test_mindspeed_key_space_round_trip(ours_tp2, tmp_path):
    root, raw, _ = ours_tp2
    ms = tmp_path / "ms"
    cli.convert(str(root), str(ms), "mindspeed-mm", tp=2, ema=False)
    shard = torch.load(ms / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    assert set(shard) == {"model"}
    keys = shard["model"]
    assert "transformer_blocks.0.0.attn1.proj_q.weight" in keys
    assert "transformer_blocks.0.0.attn1.added_proj_out.weight" in keys
    assert "transformer_blocks.0.0.attn1.norm_added_proj_k.weight" in keys
    assert not any("to_q" in k or k.endswith("_extra_state") for k in keys)
    assert cli.open_checkpoint(ms).format == "mindspeed-mm"
    _assert_diff_equal(root, ms, ema=False)
    half = tmp_path / "model_bf16.safetensors"
    cli.convert(str(ms), str(half), "released", dtype="bf16")
    assert {i.dtype for i in cli.open_checkpoint(half).keys("raw").values()} == {torch.bfloat16}
    assert not cli.diff(str(root), str(half), ema=False)[0]  # bitwise: bf16 rounding shows
    _assert_diff_equal(root, half, ema=False, rtol=2**-8)  # bf16 keeps 8 significant bits


def test_cli_help_inspect_and_bad_inputs(ours_tp2, tmp_path, capsys):
    root, _, _ = ours_tp2
    r = subprocess.run([sys.executable, "-m", "checkpoint_tools", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and all(c in r.stdout for c in ("inspect", "convert", "diff", "verify"))

    assert cli.main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "format:       ours (SUV)" in out and "TP 2 x PP 1 x DP 1" in out and "EMA yes" in out
    assert "consumed samples: 28" in out and "iteration:    7" in out

    def error(*args):
        assert cli.main(list(args)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "--to 'onnx': unknown format" in error("convert", "--load", str(root), "--save", str(tmp_path / "x"),
                                                  "--to", "onnx")
    assert "not a checkpoint of a known layout" in error("inspect", str(tmp_path))
    assert "does not exist" in error("inspect", str(tmp_path / "nope"))
    assert "has no EMA weights" in error("convert", "--load", str(_raw_only(tmp_path)), "--save",
                                         str(tmp_path / "o.pt"), "--to", "released", "--ema")
    assert "--tp/--pp apply to upstream-legacy" in error("convert", "--load", str(root), "--save",
                                                         str(tmp_path / "o"), "--to", "ours", "--tp", "2")

    # mixed TP/PP directory forms, truncated file, missing shard
    legacy = tmp_path / "legacy"
    cli.convert(str(root), str(legacy), "upstream-legacy", tp=2)
    it = legacy / "iter_0000007"
    f = it / "mp_rank_01" / "model_optim_rng.pt"
    data = f.read_bytes()
    (it / "mp_rank_00_001").mkdir()
    assert "mixes mp_rank_TT and mp_rank_TT_PPP" in error("inspect", str(legacy))
    (it / "mp_rank_00_001").rmdir()
    assert cli.main(["verify", str(legacy)]) == 0
    capsys.readouterr()
    f.write_bytes(data[: len(data) // 2])
    assert cli.main(["verify", str(legacy)]) == 1
    assert "mp_rank_01/model_optim_rng.pt: size" in capsys.readouterr().out
    assert "mp_rank_01/model_optim_rng.pt: unreadable (truncated or corrupt" in error("diff", str(root), str(legacy))
    f.unlink()
    f.parent.rmdir()
    assert "saved with TP 2 x PP 1 (its args) but holds shards for TP 1 x PP 1" in error("inspect", str(legacy))
    (it / "mp_rank_01").mkdir()
    assert "missing shard file" in error("inspect", str(legacy))


def _raw_only(tmp_path):
    from checkpoint_tools.flat import write_released
    from checkpoint_tools.keyspace import TensorInfo

    full = _random_full_state(5)
    path = tmp_path / "model.safetensors"
    write_released(path, {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in full.items()}, full.__getitem__,
                   weights="raw", iteration=None, config=None)
    return path


def test_conversion_memory_stays_within_one_shard_and_a_tensor(tmp_path):
    """TP2 legacy -> released in a child process: the memory the work uses (peak RSS above the start-up RSS)
    stays under 1.5 x the largest input shard + one full tensor (bench/checkpoint_tools_memory.py runs the
    same at 1B parameters)."""
    from bench.checkpoint_tools_memory import run_convert, suv_shapes, write_synthetic_legacy

    _, shapes = suv_shapes(8e6)
    legacy = tmp_path / "legacy"
    write_synthetic_legacy(legacy, shapes, 2, torch.float32)
    shard_mib = max(p.stat().st_size for p in legacy.rglob("model_optim_rng.pt")) / 2**20
    tensor_mib = max(torch.Size(s).numel() for s in shapes.values()) * 4 / 2**20
    r = run_convert(["--load", str(legacy), "--save", str(tmp_path / "model_ema.safetensors"), "--to", "released"])
    assert 0 < r["working_mib"] <= 1.5 * shard_mib + tensor_mib, (r, shard_mib, tensor_mib)


def test_wfvae_released_layouts_and_diffusers(tmp_path, capsys):
    """The WFVAE .ckpt layout (EMA under ema_state_dict with 'module.', weights under state_dict.gen_model):
    EMA -> diffusers folder and raw -> .ckpt, both loaded back by WFVAE.from_upstream."""
    from mm.models.sparse_ummdit import load_upstream_checkpoint
    from mm.models.wfvae import WFVAE, tiny_wfvae_config

    ae = tiny_wfvae_config()
    g = torch.Generator().manual_seed(0)
    sd = WFVAE.from_upstream(ae).state_dict()
    raw = {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
    ema = {k: v * 0.5 for k, v in raw.items()}
    ckpt = tmp_path / "wfvae.ckpt"
    torch.save({"ema_state_dict": {"module." + k: v for k, v in ema.items()}, "state_dict": {"gen_model": raw}}, ckpt)
    assert cli.main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "released (WFVAE)" in out and "raw yes, EMA yes" in out

    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps({"ae": ae}))
    hf = tmp_path / "vae"
    cli.convert(str(ckpt), str(hf), "diffusers", mm_model=str(model_json))
    cfg = {k: v for k, v in json.loads((hf / "config.json").read_text()).items() if not k.startswith("_")}
    loaded = WFVAE.from_upstream(cfg, checkpoint=load_upstream_checkpoint(hf)).state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert cli.verify(str(hf)) == []
    cli.convert(str(ckpt), str(tmp_path / "raw.ckpt"), "released", ema=False)
    loaded = WFVAE.from_upstream(ae, checkpoint=tmp_path / "raw.ckpt").state_dict()
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)
    _assert_diff_equal(ckpt, hf, ema=True)
    with pytest.raises(CheckpointError, match="only the SUV is trained with megatron"):
        cli.convert(str(ckpt), str(tmp_path / "o"), "ours")
