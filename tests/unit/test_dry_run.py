"""pretrain_sora.py --dry-run --world-size N: the released 8.5B config (stage Video-4) at 1,024 devices, validated
and built on the meta device per simulated TP rank in this process; unsupported layouts rejected."""

from __future__ import annotations

import contextlib
import io

import pytest


@pytest.fixture(scope="module")
def video4_flags(tmp_path_factory):
    """Video-4 rendered against a stand-in tree of the released files (present, never opened)."""
    from mm.tools.recipes import STAGES, render

    root = tmp_path_factory.mktemp("dry_run")
    pre = root / "pretrained"
    for d in ("wfvae", "t5-v1_1-xl", "CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        (pre / d).mkdir(parents=True)
    (pre / "wfvae/wfvae_888_dim32.ckpt").touch()
    (root / "annotation.json").write_text("[]")
    (root / "data.txt").write_text(f"{root},{root / 'annotation.json'}\n")
    flags = render(STAGES["Video-4"], 1024, str(pre), str(root / "run"), data_txt=str(root / "data.txt"))
    return flags + ["--bf16", "--use-distributed-optimizer"]


def _main(argv):
    import pretrain_sora

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pretrain_sora.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_released_model_at_1024_devices(video4_flags):
    code, out, err = _main(video4_flags + ["--dry-run", "--world-size", "1024"])
    assert code == 0, err
    assert "world 1024 = TP 4 x PP 1 x CP 1 x DP 256" in out
    assert "micro-batch 1 x DP 256 x 2 micro-batches = global batch 512" in out
    assert "SUV: 8,504,661,120 parameters" in out
    # each TP rank holds a quarter of the split weights plus every replicated one (spec §2.13)
    assert out.count(f"{8_378_849_280 // 4 + 125_811_840:,}") == 4
    assert "Ascend-910B-64GB fits" in out and "configuration valid" in out


def test_dry_run_at_pp4_prints_the_stage_cuts_and_per_stage_parameters(video4_flags):
    code, out, err = _main(video4_flags + ["--dry-run", "--world-size", "1024", "--pipeline-model-parallel-size", "4"])
    assert code == 0, err
    assert "world 1024 = TP 4 x PP 4 x CP 1 x DP 64" in out
    # 121x576x1024: the dense outer blocks cost more, so the cost model gives the outer stages fewer blocks
    assert "stage 0 (PP rank 0, chunk 0): blocks 0-5 (6), receives 0 skips" in out
    assert "stage 3 (PP rank 3, chunk 0): blocks 26-31 (6), receives 2 skips" in out
    assert out.count(": TP rank 0 ") == 4 and "the fullest pipeline stage" in out and "peak per stage: " in out
    code, out, err = _main(video4_flags + ["--dry-run", "--world-size", "1024", "--pipeline-model-parallel-size", "4",
                                           "--pipeline-stage-blocks", "8,8,8,7"])
    assert code == 2 and "--pipeline-stage-blocks 8,8,8,7 sums to 31; the SUV has 32 blocks" in err
    code, out, err = _main(video4_flags + ["--dry-run", "--world-size", "1024", "--pipeline-model-parallel-size", "4",
                                           "--virtual-pipeline-model-parallel-size", "2"])
    assert code == 0 and "stage 7 (PP rank 3, chunk 1)" in out and out.count(": TP rank 0 ") == 8, err
    code, out, err = _main(video4_flags + ["--dry-run", "--world-size", "1024", "--pipeline-model-parallel-size", "4",
                                           "--virtual-pipeline-model-parallel-size", "2", "--global-batch-size", "192"])
    assert code == 2 and "3 micro-batches per step is not a multiple" in err, err


def test_world_size_goes_with_dry_run(video4_flags):
    code, _, err = _main(video4_flags + ["--dry-run"])
    assert code == 2 and "--dry-run needs --world-size" in err
    code, _, err = _main(video4_flags + ["--world-size", "8"])
    assert code == 2 and "--world-size is only for --dry-run" in err
    code, _, err = _main(video4_flags + ["--dry-run", "--world-size", "6"])
    assert code == 2 and "error:" in err


@pytest.mark.parametrize("algo", ["megatron_cp_algo", "skiparse_cp_algo"])
def test_ring_cp_beyond_the_head_limit(video4_flags, algo):
    """TP 4 x CP 8 = 32 does not divide the 24 heads: Ulysses cannot, the ring (and skiparse CP, whose dense
    blocks then run the ring) can, with the recipe's TP 4 + SP."""
    argv = video4_flags + ["--dry-run", "--world-size", "1024", "--context-parallel-size", "8"]
    code, out, err = _main(argv + ["--context-parallel-algo", algo])
    assert code == 0, err
    assert "world 1024 = TP 4 x PP 1 x CP 8 x DP 32" in out and "configuration valid" in out
    code, _, err = _main(argv)
    assert code == 2 and "does not divide the model's 24 attention heads" in err


def test_num_layers_per_virtual_pipeline_stage_resolves_to_the_vpp_size(video4_flags):
    """megatron's --num-layers-per-virtual-pipeline-stage: 32 blocks / PP 4 = 8 per rank, 4 per virtual stage =
    --virtual-pipeline-model-parallel-size 2 (the same validated layout, printed stage by stage)."""
    pp4 = video4_flags + ["--dry-run", "--world-size", "1024", "--pipeline-model-parallel-size", "4"]
    vpp = _main(pp4 + ["--virtual-pipeline-model-parallel-size", "2"])
    per_stage = _main(pp4 + ["--num-layers-per-virtual-pipeline-stage", "4"])
    assert per_stage[0] == 0 and per_stage[:2] == vpp[:2], per_stage[2]
    assert _main(pp4 + ["--num-layers-per-virtual-pipeline-stage", "8"])[1] == _main(pp4)[1]  # 1 chunk: no VPP
    code, _, err = _main(pp4 + ["--num-layers-per-virtual-pipeline-stage", "3"])
    assert code == 2 and [line for line in err.splitlines() if "error:" in line] == [
        "pretrain_sora.py: error: --num-layers-per-virtual-pipeline-stage 3: the SUV's 32 blocks over "
        "--pipeline-model-parallel-size 4 are 8 per PP rank, not a multiple of 3"], err
    code, _, err = _main(pp4 + ["--num-layers-per-virtual-pipeline-stage", "4", "--virtual-pipeline-model-parallel-size",
                                "2"])
    assert code == 2 and err.count("error:") == 1 and "both set the interleaved pipeline: give one" in err, err
