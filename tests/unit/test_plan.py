"""The planner (mm.tools.plan) on the released 8.5B model: the report's Video-4 layout feasible, a layout upstream
could not run infeasible, unsupported layouts listed. The calibration against measured memory is in
tests/distributed/test_plan_calibration.py."""

from __future__ import annotations

import pytest

import plan_fixtures


@pytest.fixture(scope="module")
def released():
    return plan_fixtures.released_facts()


def _video4(facts, layout):
    from mm.tools.plan import DEVICES, Workload, estimate

    work = Workload.from_pixels(facts, 121, 576, 1024, text_len=512, micro_batch=1, global_batch=512)
    return estimate(facts, layout, work, DEVICES["910b"], 512)


def test_released_param_count(released):
    assert released.total_params == 8_504_661_120  # spec §2.13, last block's dead text modules omitted


def test_report_video4_layout_is_feasible(released):
    from mm.tools.plan import GB, Layout, peak_bytes

    e = _video4(released, Layout(tp=4, cp=1, dp=128, recompute="selective"))  # 512 910B, TP/SP 4, GA 4, MBS 1
    assert e.feasible, e.problems
    assert e.micro_batches == 4
    assert peak_bytes(e.memory) < 0.9 * 64 * GB


def test_layout_upstream_could_not_run_is_infeasible(released):
    from mm.tools.plan import Layout

    # plain data parallelism holds bf16 weights + fp32 grads of all 8.5B parameters (51 GB) on every NPU:
    # 121x576x1024 does not fit in 64 GB even with full recompute
    e = _video4(released, Layout(tp=1, cp=1, dp=512, sequence_parallel=False, recompute="full"))
    assert not e.feasible and "GB usable of 64 GB" in e.problems[0]


def test_ring_cp_needs_no_head_split_and_ulysses_does(released):
    from mm.tools.plan import Layout

    # TP 4 x CP 4 = 16 does not divide the 24 heads: Ulysses cannot split them, ring attention keeps them whole
    # and hybrid splits them over TP 4 x Ulysses 2 only
    ulysses = _video4(released, Layout(tp=4, cp=4, dp=32, recompute="selective"))
    assert "heads 24 not divisible by TP x Ulysses CP = 16" in ulysses.problems
    ring = _video4(released, Layout(tp=4, cp=4, dp=32, recompute="selective", cp_algorithm="ring"))
    hybrid = _video4(released, Layout(tp=4, cp=4, dp=32, recompute="selective", cp_algorithm="hybrid",
                                      ulysses_degree=2))
    assert not [p for p in ring.problems + hybrid.problems if "heads" in p]
    assert ring.memory == ulysses.memory  # the same tokens per rank; only the communication differs
    assert ring.comm_seconds["cp"] > ulysses.comm_seconds["cp"] > 0


def test_pipeline_stages_split_weights_and_keep_1f1b_activations(released):
    from mm.tools.plan import Layout, peak_bytes

    pp1 = _video4(released, Layout(tp=4, cp=1, dp=128, recompute="selective"))
    pp4 = _video4(released, Layout(tp=4, cp=1, dp=32, pp=4, recompute="selective"))
    assert pp4.micro_batches == 16 and len(pp4.stage_peaks) == 4
    assert pp4.memory["weights"] < pp1.memory["weights"] / 2  # the fullest stage holds well under half the weights
    assert max(pp4.stage_peaks) == peak_bytes(pp4.memory)
    assert pp4.stage_peaks[-1] < pp4.stage_peaks[0]  # the last stage holds one micro-batch in flight, the first four
