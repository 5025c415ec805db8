"""The trainer under context parallelism on the tiny preset with 17-frame clips (3 latent frames, which no CP
size > 1 divides: the flattened sequences are padded and split): Ulysses (CP 2), the ring (CP 2, through the
``pretrain_sora.py`` entry point under torchrun), the hybrid 2 x 2 and skiparse CP 2 (also with PP 2: padded
chunks and re-sharded layouts cross the stage boundary) log the one-process losses and grad norms."""

from __future__ import annotations

import pytest

from harness import run_distributed
from tiny_workspace import make_workspace, tiny_trainer
from torchrun_training import torchrun_losses

ITERS = 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws_cp"), num=2, frames=17, cfg_rate=0.0)


def _train(rank, world, ws, par: dict):
    t = tiny_trainer(ws, gbs=1, iters=ITERS, distopt=False, parallel=par)
    assert t.ps.dp_size == 1
    return [(r.loss, r.grad_norm) for r in t.train()]


def _close(a, b, rel=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(ws):
    return run_distributed(_train, 1, args=(ws, {}), timeout=240)[0]


@pytest.mark.parametrize("par", [
    {"context_parallel_size": 2},
    {"context_parallel_size": 4, "context_parallel_algo": "hybrid_cp_algo", "ulysses_degree_in_cp": 2},
    {"context_parallel_size": 2, "context_parallel_algo": "skiparse_cp_algo"},
    {"context_parallel_size": 2, "context_parallel_algo": "skiparse_cp_algo", "pipeline_model_parallel_size": 2},
], ids=["ulysses2", "hybrid2x2", "skiparse2", "skiparse2_pp2"])
def test_cp_trains_like_one_process(ws, reference, par):
    world = par["context_parallel_size"] * par.get("pipeline_model_parallel_size", 1)
    runs = run_distributed(_train, world, args=(ws, par), timeout=300)
    assert all(r == runs[0] for r in runs)  # every CP rank computes the loss on the full output
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*reference)
    assert _close(losses, ref_losses) and _close(norms, ref_norms), (runs[0], reference)


def test_torchrun_ring_cp2_logs_the_cp1_losses(ws, reference, tmp_path):
    flags = ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"]
    logged, console = torchrun_losses(ws, 2, flags, tmp_path / "run", ITERS, 1)
    assert "megatron_cp_algo, Ulysses 1 x ring 2" in console
    assert _close(logged, [loss for loss, _ in reference]), (logged, reference)


@pytest.mark.parametrize("extra, world, words", [
    (["--context-parallel-size", "2", "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "3"],
     2, "ulysses_degree_in_cp=3"),
    (["--context-parallel-size", "8"], 8, "--context-parallel-size 8 = 8 does not divide the model's 4 attention heads"),
    (["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo", "--ulysses-degree-in-cp", "2"],
     2, "unset unless context_parallel_algo is hybrid_cp_algo"),
])
def test_bad_cp_flags_are_one_error_line(ws, capsys, monkeypatch, extra, world, words):
    import pretrain_sora

    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert pretrain_sora.main(["--mm-model", ws["model"], "--mm-data", ws["data"], *extra]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err and len(lines) == 1 and words in lines[0], lines


def test_ring_on_a_backend_without_the_block_kernel_is_an_error(ws, capsys, monkeypatch):
    import types

    import pretrain_sora
    from mm.ops import registry, reference

    no_block = {k: v for k, v in reference.kernels().items() if k not in registry.OPTIONAL_KERNELS}
    monkeypatch.setattr(registry, "resolve_backend_name", lambda name: "cuda")
    monkeypatch.setattr(registry, "backend_module", lambda name: types.SimpleNamespace(kernels=lambda: no_block))
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--mm-model", ws["model"], "--mm-data", ws["data"], "--context-parallel-size", "2"]
    assert pretrain_sora.main([*argv, "--context-parallel-algo", "megatron_cp_algo"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "block kernel (attention_block) the cuda backend does not have" in lines[0], lines



def _train_dp2(rank, world, ws, par: dict, recompute: str | None):
    t = tiny_trainer(ws, gbs=2, iters=ITERS, distopt=True, parallel=par, recompute=recompute)
    assert t.ps.dp_size == 2
    return [(r.loss, r.grad_norm) for r in t.train()]


@pytest.mark.parametrize("algo", ["megatron_cp_algo", "skiparse_cp_algo"])
def test_cp2_x_dp2_with_distributed_optimizer_and_recompute_trains_like_dp2(ws, algo):
    """CP composed with DP and the distributed optimizer (grads reduced over DP x CP) and full recompute."""
    ref = run_distributed(_train_dp2, 2, args=(ws, {}, None), timeout=300)
    runs = run_distributed(_train_dp2, 4, args=(ws, {"context_parallel_size": 2, "context_parallel_algo": algo},
                                                "full"), timeout=300)
    assert runs[0] == runs[1] and runs[2] == runs[3]  # the CP ranks of a replica log the same
    losses, norms = zip(*runs[0])
    ref_losses, ref_norms = zip(*ref[0])
    assert _close(losses, ref_losses) and _close(norms, ref_norms), (runs[0], ref[0])
