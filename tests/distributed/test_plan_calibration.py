"""The planner's memory model (mm.tools.plan) against measured peaks of real CPU training steps (1 and 2 gloo
ranks: TP = 1, TP 2 + SP, PP 2 per stage, ring CP 2; mm.tools.memory_probe), within 20%; the planner CLI on the same tiny
workspace."""

from __future__ import annotations

import dataclasses

import pytest

from harness import run_distributed
from tiny_workspace import make_workspace

# a mid-size SUV: 256 wide (2 heads of 128), 8 blocks, Skiparse k=2 in the middle stage
MID = {"num_heads": 2, "head_dim": 128, "num_layers": [2, 4, 2], "sparse_n": [1, 2, 1]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("plan_ws"), num=2)


def _spec(ws, predictor):
    from mm.config_upstream import load_model_json

    spec = load_model_json(ws["model"])
    return dataclasses.replace(spec, predictor={**spec.predictor, **predictor}) if predictor else spec


def _run(tp, pp, cp, mbs, gbs, recompute):
    from mm.config import OptimizerConfig, ParallelConfig, RunConfig, TrainingConfig

    return RunConfig(parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp, sequence_parallel=tp > 1,
                                             context_parallel_algo="megatron_cp_algo" if cp > 1 else "ulysses_cp_algo"),
                     optimizer=OptimizerConfig(use_distributed_optimizer=True),
                     training=TrainingConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=2,
                                             recompute_granularity=None if recompute == "none" else recompute,
                                             recompute_num_layers=100, selective_recompute_ffn_layers=100))


def _measure(rank, world, ws, predictor, tp, pp, cp, mbs, gbs, recompute, thw, text_len):
    from mm.config_upstream import load_data_config
    from mm.tools.memory_probe import measure_training_memory

    return measure_training_memory(_spec(ws, predictor), load_data_config(ws["data"]),
                                   _run(tp, pp, cp, mbs, gbs, recompute), thw, text_len)


CASES = {  # name: (predictor changes, world, TP, PP, CP (ring), micro-batch, global batch, recompute, latent t/h/w,
    #        text tokens)
    "tiny": (None, 1, 1, 1, 1, 1, 1, "none", (2, 4, 4), 16),
    "mid": (MID, 1, 1, 1, 1, 2, 2, "none", (3, 16, 16), 16),
    "mid-tp2-sp-selective": (MID, 2, 2, 1, 1, 2, 2, "selective", (3, 16, 16), 16),
    # 1F1B with 2 micro-batches: stage 0 holds both micro-batches' activations, stage 1 one
    "mid-pp2": (MID, 2, 1, 2, 1, 2, 4, "none", (3, 16, 16), 16),
    # ring attention over CP 2: half the tokens per rank, optimizer state sharded over DP x CP
    "mid-cp2-ring": (MID, 2, 1, 1, 2, 2, 2, "none", (4, 16, 16), 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_memory_model_within_20_percent_of_measured_peak(ws, name):
    from mm.tools.plan import Layout, Workload, model_facts, peak_bytes, stage_memory

    predictor, world, tp, pp, cp, mbs, gbs, recompute, thw, text_len = CASES[name]
    measured = run_distributed(_measure, world, args=(ws, predictor, tp, pp, cp, mbs, gbs, recompute, thw, text_len),
                               timeout=240)
    facts = model_facts(_spec(ws, predictor))
    layout = Layout(tp=tp, cp=cp, dp=world // (tp * pp * cp), pp=pp, sequence_parallel=tp > 1, recompute=recompute,
                    cp_algorithm="ring" if cp > 1 else "ulysses")
    stages = stage_memory(facts, layout, Workload(latent_thw=thw, text_len=text_len, micro_batch=mbs,
                                                  global_batch=gbs, bf16=False))
    for rank, m in enumerate(measured):
        memory = stages[rank // (tp * cp * layout.dp)]  # megatron's rank order: TP fastest, PP slowest
        predicted = peak_bytes(memory)
        # above the static state: the optimizer step's working memory or the activations, whichever is larger
        dynamic = max(memory["opt_step"], memory["activations"] + memory["attention"])
        assert abs(predicted - m.peak_bytes) <= 0.2 * m.peak_bytes, (name, rank, predicted, m)
        assert abs(dynamic - m.activation_bytes) <= 0.2 * m.activation_bytes, (name, rank, memory, m)


def test_cli_table_and_bad_shape(ws, capsys):
    from mm.tools.plan import main

    assert main(["--mm-model", ws["model"], "--num-devices", "16", "--seq-shape", "9x32x32", "--text-len", "16",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "feasible layouts (fastest first; 3 shown)" in out and "weights" in out
    assert "infeasible layouts (--show-infeasible lists them)" in out
    assert main(["--mm-model", ws["model"], "--num-devices", "16", "--seq-shape", "120x576x1024"]) == 2
    assert "error: --seq-shape 120x576x1024" in capsys.readouterr().err
