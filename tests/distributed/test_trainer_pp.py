"""The trainer at PP > 1 (issue 14): PP = 2 logs the PP = 1 losses and grad norms (every stage gets the same
micro-batches, sigma and noise; the embedder replicated on both stages gets the PP-summed gradient and is
counted once in the norm), also with the distributed optimizer over DP = 2; a checkpoint saved at PP = 2
resumes at PP = 1 and at TP = 2 with the PP = 1 run's next loss; the torchrun entry point trains at PP = 2; so
does PP = 2 from the feature cache and with encoder-DP at TP = 2."""

from __future__ import annotations

import pytest

from harness import run_distributed
from tiny_workspace import make_workspace

ITERS = 3


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws_pp"), num=4, frames=9, cfg_rate=0.0)


def _train(rank, world, ws, par: dict, iters: int, gbs: int, save=None, load=None, distopt=False, load_rng=True,
           feature_dir=None):
    from mm.config import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig
    from mm.config_upstream import load_data_config, load_model_json
    from mm.training.trainer import Trainer

    run = RunConfig(
        parallel=ParallelConfig(**par),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-3, use_distributed_optimizer=distopt),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=gbs, train_iters=iters, seed=1234),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=2, load_rng=load_rng),
    )
    data = load_data_config(ws["data"])
    if feature_dir:  # features from the cache (the frozen encoders are not built)
        data = data.replace(load_video_features=True, load_text_features=True, feature_dir=feature_dir)
    t = Trainer(load_model_json(ws["model"]), data, run, data_num_workers=0)
    assert not feature_dir or t.encoders.vae is None
    if distopt and t.ps.pp_size > 1:  # each replicated embedder parameter alone in its bucket: same DP shards
        embedder = set(t.model.time_text_embed.parameters())  # on every stage, whatever else the stage holds
        for buffer in t.ddps[0].buffers:
            for bucket in buffer.buckets:
                assert not embedder & set(bucket.params) or len(bucket.params) == 1, bucket.params
    return [(r.loss, r.grad_norm) for r in t.train()]


def _close(a, b, rel=1e-4):
    return all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def reference(ws):
    return run_distributed(_train, 1, args=(ws, {}, ITERS, 4), timeout=240)[0]


def test_pp2_trains_like_pp1_and_resumes_at_pp1_and_tp2(ws, reference, tmp_path):
    ckpt, ckpt1 = str(tmp_path / "pp2"), str(tmp_path / "pp1")
    pp2 = run_distributed(_train, 2, args=(ws, {"pipeline_model_parallel_size": 2}, 2, 4, ckpt), timeout=240)
    assert pp2[0] == pp2[1]  # the loss is broadcast from the last stage; the norm is global
    losses, norms = zip(*pp2[0])
    ref_losses, ref_norms = zip(*reference)
    assert _close(losses, ref_losses[:2]), (losses, ref_losses)
    assert _close(norms, ref_norms[:2]), (norms, ref_norms)
    # PP 2 -> TP 2 (same world size: the per-rank RNG streams are restored too): the uninterrupted run's 3rd loss
    tp2 = run_distributed(_train, 2, args=(ws, {"tensor_model_parallel_size": 2}, ITERS, 4, None, ckpt),
                          timeout=240)[0]
    assert len(tp2) == 1 and _close([tp2[0][0]], [ref_losses[2]]), (tp2, ref_losses)
    # PP 2 -> PP 1 in one process (another world size: RNG streams restart from the seed, as for any layout
    # change), against a PP 1 checkpoint of the same step resumed the same way
    run_distributed(_train, 1, args=(ws, {}, 2, 4, ckpt1), timeout=240)
    from_pp1 = run_distributed(_train, 1, args=(ws, {}, ITERS, 4, None, ckpt1, False, False), timeout=240)[0]
    from_pp2 = run_distributed(_train, 1, args=(ws, {}, ITERS, 4, None, ckpt, False, False), timeout=240)[0]
    assert len(from_pp2) == 1 and _close(from_pp2[0], from_pp1[0]), (from_pp2, from_pp1)


@pytest.mark.parametrize("par", [{"tensor_model_parallel_size": 2, "sequence_parallel": True},
                                 {"context_parallel_size": 2}], ids=["tp2_sp", "cp2"])
def test_pp2_composed_with_tp_sp_or_cp_trains_like_pp1(ws, reference, par):
    """TP and CP ranks share the samples and noise of their DP rank: the one-process losses and norms (SP and
    pipeline grad reductions, the embedder counted once over TP and PP)."""
    runs = run_distributed(_train, 4, args=(ws, {"pipeline_model_parallel_size": 2, **par}, 2, 4), timeout=300)
    assert all(r == runs[0] for r in runs)
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*reference)
    assert _close(losses, ref_losses[:2]) and _close(norms, ref_norms[:2]), (runs[0], reference)


def test_pp2_dp2_distributed_optimizer_matches_pp1_dp2(ws):
    """DP = 2 reads other samples and noise than one process: the reference is PP = 1 x DP = 2, both with the
    distributed optimizer (the embedder's shards must match across the two stages' DDP buckets)."""
    ref = run_distributed(_train, 2, args=(ws, {}, ITERS, 4, None, None, True), timeout=240)[0]
    runs = run_distributed(_train, 4, args=(ws, {"pipeline_model_parallel_size": 2}, ITERS, 4, None, None, True),
                           timeout=300)
    assert all(r == runs[0] for r in runs)
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*ref)
    assert _close(losses, ref_losses) and _close(norms, ref_norms), (runs[0], ref)


def test_torchrun_pp2_logs_the_pp1_losses(ws, reference, tmp_path):
    from torchrun_training import torchrun_losses

    logged, console = torchrun_losses(ws, 2, ["--pipeline-model-parallel-size", "2"], tmp_path / "run", ITERS, 4)
    assert "pipeline stages" in console
    assert _close(logged, [loss for loss, _ in reference]), (logged, reference)


def test_pp2_vpp2_trains_like_pp1_and_its_checkpoint_resumes_at_pp1(ws, reference, tmp_path):
    """Interleaved 1F1B (2 chunks per rank, one noise draw per micro-batch shared by the chunks); the
    checkpoint of the chunk group (one key space, the embedder copies as replicas) resumes at PP = 1."""
    ckpt = str(tmp_path / "vpp")
    par = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
    runs = run_distributed(_train, 2, args=(ws, par, 2, 4, ckpt), timeout=240)
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*reference)
    assert _close(losses, ref_losses[:2]) and _close(norms, ref_norms[:2]), (runs[0], reference)
    resumed = run_distributed(_train, 2, args=(ws, {"tensor_model_parallel_size": 2}, ITERS, 4, None, ckpt),
                              timeout=240)[0]
    assert len(resumed) == 1 and _close([resumed[0][0]], [ref_losses[2]]), (resumed, ref_losses)


def _extract_features(rank, world, ws, feature_dir):
    from mm.builders import build_text_encoders, build_vae
    from mm.config_upstream import load_data_config, load_model_json
    from mm.data.extract_features import extract_features

    spec = load_model_json(ws["model"])
    t5, clip = build_text_encoders(spec)
    return extract_features(load_data_config(ws["data"]), feature_dir, vae=build_vae(spec), t5=t5, clip=clip)


def test_pp2_trains_from_the_feature_cache_like_pp1(ws, tmp_path):
    """Every stage reads the same cached micro-batches (latents and text features, no encoders)."""
    feature_dir = str(tmp_path / "features")
    assert run_distributed(_extract_features, 1, args=(ws, feature_dir), timeout=180)[0] == 4
    ref = run_distributed(_train, 1, args=(ws, {}, 2, 4, None, None, False, True, feature_dir), timeout=240)[0]
    runs = run_distributed(_train, 2, args=(ws, {"pipeline_model_parallel_size": 2}, 2, 4, None, None, False, True,
                                            feature_dir), timeout=240)
    assert runs[0] == runs[1]
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*ref)
    assert _close(losses, ref_losses) and _close(norms, ref_norms), (runs[0], ref)


def test_pp2_tp2_encoder_dp_trains_like_pp1_tp2_encoder_dp(ws):
    """Encoder-DP per pipeline stage: both stages read the same samples (the loader shards over DP x TP x CP)
    and each TP group encodes and shares its own features: the PP 1 x TP 2 encoder-DP losses and norms."""
    par = {"tensor_model_parallel_size": 2, "encoder_data_parallel": True}
    ref = run_distributed(_train, 2, args=(ws, par, 2, 4), timeout=240)[0]
    runs = run_distributed(_train, 4, args=(ws, {**par, "pipeline_model_parallel_size": 2}, 2, 4), timeout=300)
    assert all(r == runs[0] for r in runs)
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*ref)
    assert _close(losses, ref_losses) and _close(norms, ref_norms), (runs[0], ref)
