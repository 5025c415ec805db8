"""SparseUMMDiT: config, released key space, loading, run-time sparsity, masks, precision, train/eval."""

import json

import pytest
import torch

from mm.models import SparseUMMDiT
from mm.models.sparse_ummdit import (
    SUVConfig,
    load_upstream_checkpoint,
    merge_tp_state_dicts,
    split_tp_state_dict,
    tp_split_dim,
)
from mm.models.suv_config import released_suv_config, tiny_suv_config
from suv_testing import random_inputs, random_state_dict, tiny_config

RELEASED_JSON = "examples/opensoraplan1.5/model_opensoraplan1_5.json"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """(config, model with random weights, its state dict, inputs, eval output)."""
    cfg = tiny_config()
    model = SparseUMMDiT.from_upstream(cfg)
    sd = random_state_dict(model, seed=3)
    model.load_state_dict(sd)
    inputs = random_inputs(cfg, seed=4)
    with torch.no_grad():
        out = model(*inputs)
    return cfg, model, sd, inputs, out


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,match", [
    ("num_layers", [2, 2], "odd length"),
    ("num_layers", [2, 3, 2], "even"),
    ("sparse_n", [1, 2], "entries"),
    ("sparse_n", [1, 0, 1, 1, 1, 1, 1], "integers >= 1"),
    ("head_dim", 24, "multiple of 16"),
    ("activation_fn", "relu", "activation_fn"),
    ("patch_size_t", 2, "patch_size_t"),
    ("dropout", 1.5, "dropout"),
])
def test_config_validation_names_field(field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny_config(**{field: value})
    assert field in str(e.value)


def test_config_from_upstream_json_and_dict(tmp_path):
    cfg = SUVConfig.from_upstream(RELEASED_JSON)
    assert cfg == released_suv_config()
    assert cfg.hidden_size == 3072 and cfg.num_blocks == 32
    assert SUVConfig.from_upstream(cfg.to_upstream()) == cfg
    with pytest.raises(ValueError, match="unknown upstream predictor key 'bogus'"):
        SUVConfig.from_upstream({**tiny_suv_config(), "bogus": 1})
    with pytest.raises(ValueError, match="model_id"):
        SUVConfig.from_upstream({**tiny_suv_config(), "model_id": "OpenSoraT2V"})
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"predictor": tiny_suv_config()}))
    assert SUVConfig.from_upstream(path) == tiny_config()


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="divisor of num_heads=2"):
        tiny_config().validate_tp(3)


# ---------------------------------------------------------------------------------------------- key space
def test_released_model_on_meta_has_released_key_space():
    model = SparseUMMDiT.from_upstream(RELEASED_JSON, device="meta")
    sd = model.state_dict()
    assert len(sd) == 1178
    assert sum(t.numel() for t in sd.values()) == 8_504_661_120
    assert all(t.is_meta for t in sd.values())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    P = "transformer_blocks.3.7."
    assert shapes[P + "norm1.linear.weight"] == (18432, 1024)
    assert shapes[P + "attn1.to_out.0.weight"] == (3072, 3072)
    assert shapes[P + "attn1.norm_added_k.weight"] == (128,)
    assert shapes[P + "ff.net.0.proj.weight"] == (12288, 3072)
    assert shapes[P + "ff_enc.net.2.weight"] == (3072, 12288)
    assert shapes["skip_norm_linear_enc.2.1.weight"] == (3072, 6144)
    assert shapes["norm_out.linear.weight"] == (6144, 1024)
    assert shapes["proj_out.weight"] == (128, 3072)
    assert shapes["patch_embed.proj.weight"] == (3072, 32, 2, 2)
    last = "transformer_blocks.6.1."
    assert not any(k.startswith((last + "attn1.to_add_out", last + "norm2.norm_enc", last + "ff_enc")) for k in sd)
    assert last + "attn1.add_q_proj.weight" in sd and last + "norm1.norm_enc.weight" in sd
    assert not any(k.endswith("_extra_state") for k in sd)


def test_split_rules_match_module_classes():
    """The §10.1 key-suffix rules agree with which megatron class each parameter lives in."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    model = SparseUMMDiT(tiny_config(), device="meta")
    expected = {}
    for name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            key = f"{name}.{pname}"
            if isinstance(mod, ColumnParallelLinear):
                expected[key] = 0
            elif isinstance(mod, RowParallelLinear):
                expected[key] = 1 if pname == "weight" else None
            else:
                expected[key] = None
    assert {k: tp_split_dim(k) for k in expected} == expected


def test_split_merge_round_trip(tiny):
    cfg, model, sd, *_ = tiny
    shards = [split_tp_state_dict(sd, 2, r) for r in range(2)]
    assert shards[0]["transformer_blocks.0.0.attn1.to_q.weight"].shape == (16, 32)
    assert shards[1]["transformer_blocks.0.0.attn1.to_out.0.weight"].shape == (32, 16)
    merged = merge_tp_state_dicts(shards)
    assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- loading
def _tp_style_dict(sd, cfg):
    """What a TP>1-trained, merged upstream checkpoint looks like: + the 6 dead tensors, + _extra_state."""
    out = dict(sd)
    D = cfg.hidden_size
    last = "transformer_blocks.6.1."
    out[last + "attn1.to_add_out.weight"] = torch.randn(D, D)
    out[last + "attn1.to_add_out.bias"] = torch.randn(D)
    out[last + "norm2.norm_enc.weight"] = torch.randn(D)
    out[last + "norm2.norm_enc.bias"] = torch.randn(D)
    out[last + "ff_enc.net.0.proj.weight"] = torch.randn(4 * D, D)
    out[last + "ff_enc.net.2.weight"] = torch.randn(D, 4 * D)
    for k in list(sd):
        if any(s in k for s in (".to_q.", ".to_out.0.", ".net.0.proj.", ".net.2.", ".linear.")) and k.endswith("weight"):
            out[k.rsplit(".", 1)[0] + "._extra_state"] = None
    return out


def test_tp_style_merged_checkpoint_loads_like_clean(tiny, tmp_path):
    cfg, _, sd, inputs, out = tiny
    messy = _tp_style_dict(sd, cfg)
    assert len(messy) > len(sd) + 6
    path = tmp_path / "model_ema.pt"
    torch.save({k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in messy.items()}, path)
    model = SparseUMMDiT.from_upstream(tiny_suv_config(), checkpoint=path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    clean = SparseUMMDiT.from_upstream(tiny_suv_config())
    clean.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), clean(*inputs), rtol=0, atol=0)
    # and the bf16-rounded weights are close to the original output
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), out, rtol=0.1, atol=0.1)


def test_safetensors_and_wrapped_checkpoints(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg, _, sd, inputs, out = tiny
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    torch.save({"ema_model": sd}, tmp_path / "wrapped.pt")
    for name in ("m.safetensors", "wrapped.pt"):
        model = SparseUMMDiT.from_upstream(tiny_suv_config(), checkpoint=tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(*inputs), out, rtol=0, atol=0)
    torch.save({"weights": sd}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="no SUV predictor state dict"):
        load_upstream_checkpoint(tmp_path / "bad.pt")


def test_bad_keys_raise_naming_them(tiny):
    cfg, model, sd, *_ = tiny
    fresh = SparseUMMDiT(cfg)
    missing = dict(sd)
    del missing["transformer_blocks.2.1.attn1.norm_k.weight"]
    with pytest.raises(RuntimeError, match=r"missing keys: \['transformer_blocks\.2\.1\.attn1\.norm_k\.weight'\]"):
        fresh.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r"unexpected keys: \['transformer_blocks\.0\.0\.attn1\.to_qq\.weight'\]"):
        fresh.load_state_dict({**sd, "transformer_blocks.0.0.attn1.to_qq.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"proj_out\.weight: checkpoint \(3, 32\)"):
        fresh.load_state_dict({**sd, "proj_out.weight": torch.zeros(3, 32)})


# ---------------------------------------------------------------------------------------------- behaviour
def test_forward_backward_tiny(tiny):
    cfg, _, sd, inputs, _ = tiny
    model = SparseUMMDiT(cfg)
    model.load_state_dict(sd)
    model.train()
    out = model(*inputs)
    assert out.shape == inputs[0].shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    # only the last block's text-query path is dead (its text output is unused)
    assert no_grad == frozen == ["transformer_blocks.6.1.attn1.add_q_proj.bias", "transformer_blocks.6.1.attn1.add_q_proj.weight",
                                 "transformer_blocks.6.1.attn1.norm_added_q.weight"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_upstream_shaped_inputs_accepted(tiny):
    cfg, model, _, (lat, ts, text, tmask, pooled, vmask), out = tiny
    with torch.no_grad():
        got = model(lat, ts, text[:, None], tmask[:, None], pooled[:, None], vmask)
    torch.testing.assert_close(got, out, rtol=0, atol=0)


def test_fresh_init_zero_init_skips_are_identity():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg)
    D = cfg.hidden_size
    for mods in (model.skip_norm_linear, model.skip_norm_linear_enc):
        assert len(mods) == 3
        for m in mods:
            assert isinstance(m[0], torch.nn.Identity)
            x, xs = torch.randn(5, 2, D), torch.randn(5, 2, D)
            torch.testing.assert_close(m(torch.cat([x, xs], -1)), x, rtol=0, atol=0)
    # megatron init N(0, 0.02) for the TP linears, zero biases
    w = model.transformer_blocks[3][0].attn1.to_q.weight
    assert abs(w.std().item() - 0.02) < 0.004 and model.transformer_blocks[3][0].attn1.to_q.bias.abs().max() == 0
    # inside a forward pass every long-skip merge returns the current stream unchanged
    checked = []

    def hook(mod, args, output):
        torch.testing.assert_close(output, args[0][..., :D], rtol=0, atol=0)
        checked.append(mod)

    handles = [m.register_forward_hook(hook) for m in (*model.skip_norm_linear, *model.skip_norm_linear_enc)]
    with torch.no_grad():
        model(*random_inputs(cfg, seed=5))
    for h in handles:
        h.remove()
    assert len(checked) == 6


def test_meta_then_to_empty_keeps_megatron_param_tags(tiny):
    cfg, _, sd, inputs, out = tiny
    model = SparseUMMDiT(cfg, device="meta")
    model.to_empty(device="cpu")
    w = model.transformer_blocks[0][0].attn1.to_q.weight
    assert w.device.type == "cpu" and w.tensor_model_parallel and w.partition_dim == 0
    assert model.transformer_blocks[0][0].attn1.to_out[0].weight.partition_dim == 1
    assert hasattr(model.norm_final.weight, "sequence_parallel")
    assert not model.transformer_blocks[6][1].attn1.add_q_proj.weight.requires_grad
    model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), out, rtol=0, atol=0)


def test_zero_init_false_has_norm_before_skip_linear():
    model = SparseUMMDiT(tiny_config(skip_connection_zero_init=False), device="meta")
    keys = model.state_dict().keys()
    assert "skip_norm_linear.0.0.weight" in keys and "skip_norm_linear.0.1.weight" in keys


def test_runtime_sparsity(tiny):
    cfg, model, sd, inputs, out = tiny
    try:
        with torch.no_grad():
            model.set_sparsity([1, 2, 4, 8, 4, 2, 1])
            sparse8 = model(*inputs)
            model.set_sparsity(dense=True)
            assert model.sparse_n == [1] * 7
            dense = model(*inputs)
            model.set_sparsity()
            torch.testing.assert_close(model(*inputs), out, rtol=0, atol=0)
        assert (sparse8 - out).abs().max() > 1e-3 and (dense - out).abs().max() > 1e-3
        # dense mode == a model configured with sparse1d = false (same weights)
        dense_model = SparseUMMDiT(tiny_config(sparse1d=False))
        dense_model.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(dense_model(*inputs), dense, rtol=0, atol=0)
        with pytest.raises(ValueError, match="sparsity"):
            model.set_sparsity([1, 2, 3])
    finally:
        model.set_sparsity()


def test_masked_tokens_do_not_leak(tiny):
    """Key-padding: content of invalid text tokens / fully invalid patches never reaches valid outputs."""
    cfg, model, _, (lat, ts, text, tmask, pooled, vmask), out = tiny
    text2, lat2 = text.clone(), lat.clone()
    text2[1, tmask[1] == 0] += 5.0
    lat2[1, :, :, :, -4:] += 5.0  # the invalid columns of sample 1 (whole patches)
    with torch.no_grad():
        got = model(lat2, ts, text2, tmask, pooled, vmask)
    torch.testing.assert_close(got[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1, :, :, :, :-4], out[1, :, :, :, :-4], rtol=1e-5, atol=1e-5)
    # an all-ones video mask is the same as no mask
    with torch.no_grad():
        torch.testing.assert_close(model(lat, ts, text, tmask, pooled, torch.ones_like(vmask))[0],
                                   model(lat, ts, text, tmask, pooled, None)[0], rtol=0, atol=0)


def test_train_eval_and_dropout(tiny):
    cfg, _, sd, inputs, out = tiny
    model = SparseUMMDiT(tiny_config(dropout=0.5))
    model.load_state_dict(sd)
    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), out, rtol=0, atol=0)  # eval: dropout off
        model.train()
        assert all(m.training for m in model.modules())
        a, b = model(*inputs), model(*inputs)
        assert (a - b).abs().max() > 1e-4
        model.train(False)
        torch.testing.assert_close(model(*inputs), out, rtol=0, atol=0)


def test_bf16_params_and_residual_stream(tiny):
    cfg, _, sd, inputs, out = tiny
    model = SparseUMMDiT(cfg, params_dtype=torch.bfloat16)
    model.load_state_dict(sd)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    seen = []
    hook = model.transformer_blocks[2][0].register_forward_hook(lambda m, i, o: seen.append((o[0].dtype, o[1].dtype)))
    with torch.no_grad():
        got = model(*inputs)
    hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert got.dtype == torch.float32
    assert (got - out).abs().mean() < 0.05 * out.abs().mean()


def test_gather_and_load_at_tp1_are_identity(tiny):
    from mm.models.sparse_ummdit import gather_upstream_state_dict, load_upstream_state_dict

    cfg, model, sd, *_ = tiny
    full = gather_upstream_state_dict(model)
    assert full.keys() == sd.keys() and all(torch.equal(full[k], sd[k]) for k in sd)
    fresh = SparseUMMDiT(cfg)
    load_upstream_state_dict(fresh, _tp_style_dict(sd, cfg))
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())
