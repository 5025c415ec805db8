import argparse
import json

import pytest

from mm.config_upstream import (
    DiffusionConfig,
    add_megatron_flags,
    load_inference_json,
    load_model_json,
    run_config_from_args,
    warn_inert_flags,
)

EX = "examples/opensoraplan1.5"


def test_released_model_json_loads():
    spec = load_model_json(f"{EX}/model_opensoraplan1_5.json")
    assert spec.predictor["num_layers"] == [2, 4, 6, 8, 6, 4, 2]
    assert spec.ae["latent_dim"] == 32 and spec.ae_dtype == "fp32" and spec.weight_dtype == "bf16"
    assert spec.diffusion.use_dynamic_shifting and spec.diffusion.weighting_scheme == "logit_normal"
    assert spec.text.t5.endswith("t5-v1_1-xl") and spec.text.t5_tokenizer == spec.text.t5


def test_released_inference_json_loads():
    spec = load_inference_json(f"{EX}/inference_t2v_model1_5.json")
    assert (spec.num_frames, spec.height, spec.width, spec.fps) == (121, 576, 1024, 24)
    d = spec.diffusion
    assert (d.num_inference_steps, d.guidance_scale, d.guidance_rescale, d.shift) == (50, 8.0, 0.7, 7.0)
    assert spec.prompt.endswith("prompts.txt")  # an existing relative file resolves against the JSON dir
    assert spec.predictor_checkpoint.endswith("model_ema.pt")


def test_unknown_key_is_named(tmp_path):
    cfg = json.load(open(f"{EX}/model_opensoraplan1_5.json"))
    cfg["enable_text_preprocessing_typo"] = True
    p = tmp_path / "m.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="enable_text_preprocessing_typo"):
        load_model_json(p)


def test_missing_block_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="'predictor'"):
        load_model_json({"ae": {}})
    cfg = json.load(open(f"{EX}/inference_t2v_model1_5.json"))
    cfg["pipeline_config"]["input_size"] = [120, 576, 1024]
    with pytest.raises(ValueError, match=r"num_frames=120.*8n\+1"):
        load_inference_json(cfg)
    cfg["pipeline_config"]["input_size"] = [121, 570, 1024]
    with pytest.raises(ValueError, match="height=570"):
        load_inference_json(cfg)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_model_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="guidance_rescale"):
        DiffusionConfig(guidance_rescale=1.5)
    with pytest.raises(ValueError, match="diffusion.model_id"):
        DiffusionConfig.from_upstream({"model_id": "DDPM"})


def _parse(argv):
    p = argparse.ArgumentParser()
    add_megatron_flags(p)
    return p.parse_args(argv)


def test_megatron_flags_map_to_run_config(caplog):
    args = _parse("--tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 1 --global-batch-size 4 "
                  "--lr 2e-5 --lr-decay-style cosine --min-lr 1e-6 --clip_grad_ema_decay 0.9 --selective_recom "
                  "--recom_ffn_layers 8 --swiglu --num-layers 32 --use-distributed-optimizer".split())
    assert warn_inert_flags(args) == ["--num-layers", "--swiglu"]
    assert "inert" in caplog.text
    rc = run_config_from_args(args, world_size=4)
    assert rc.parallel.tensor_model_parallel_size == 2 and rc.parallel.sequence_parallel
    assert rc.parallel.data_parallel_size(4) == 2
    assert rc.training.num_microbatches(2) == 2
    assert rc.optimizer.lr_decay_style == "cosine" and rc.optimizer.clip_grad_ema_decay == 0.9
    assert rc.training.recompute_granularity == "selective" and rc.training.selective_recompute_ffn_layers == 8


def test_bad_flags_rejected():
    with pytest.raises(SystemExit):
        _parse(["--no-such-flag"])
    args = _parse("--tensor-model-parallel-size 3".split())
    with pytest.raises(ValueError, match="not divisible by TP"):
        run_config_from_args(args, world_size=4)
    args = _parse("--global-batch-size 3 --micro-batch-size 2".split())
    with pytest.raises(ValueError, match="global_batch_size 3"):
        run_config_from_args(args, world_size=1).training.num_microbatches(1)
