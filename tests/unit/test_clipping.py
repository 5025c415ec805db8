import math

import pytest

from mm.training.clipping import AdaptiveGradClipper, TooManyBadSteps


def test_first_step_initialises_without_clipping():
    c = AdaptiveGradClipper()
    d = c.decide(0.2)
    assert d.action == "update" and d.coef == 1.0
    assert c.m == pytest.approx(0.6) and c.v == 0.0
    c2 = AdaptiveGradClipper()
    c2.decide(2.0)
    assert c2.m == 1.0  # min(3g, 1.0)


def test_update_branch_closed_form():
    c = AdaptiveGradClipper(decay=0.99)
    c.decide(0.2)  # m = 0.6
    d = c.decide(0.5)  # thr = 0.6 (v = 0) -> update
    m = 0.99 * 0.6 + 0.01 * 0.5
    assert d.action == "update" and d.threshold == pytest.approx(0.6) and d.extreme == 5.0
    assert c.m == pytest.approx(m)
    assert c.v == pytest.approx(0.01 * (m - 0.5) ** 2)


def test_clip_branch_scales_to_threshold_and_keeps_stats():
    c = AdaptiveGradClipper()
    c.decide(0.2)
    m, v = c.m, c.v
    d = c.decide(2.0)  # 0.6 < 2.0 <= 5.0
    assert d.action == "clip"
    assert d.coef == pytest.approx(1.0 / (2.0 / 0.6 + 1e-6))
    assert 2.0 * d.coef == pytest.approx(0.6, rel=1e-5)
    assert (c.m, c.v) == (m, v) and c.num_clipped == 1


def test_extreme_and_nonfinite_steps_are_skipped_and_stop_after_limit():
    c = AdaptiveGradClipper(max_consecutive_bad=3)
    c.decide(0.2)
    m = c.m
    assert c.decide(100.0).action == "skip"
    assert c.decide(math.nan).action == "skip"
    assert c.m == m and c.num_skipped == 2 and c.consecutive_bad == 2
    assert c.decide(0.3).action == "update"  # a good step resets the run of bad ones
    assert c.consecutive_bad == 0
    c.decide(math.inf)
    c.decide(50.0)
    with pytest.raises(TooManyBadSteps, match="3 consecutive steps skipped"):
        c.decide(60.0)


def test_state_round_trip():
    c = AdaptiveGradClipper()
    for g in (0.2, 0.3, 2.0, 100.0, 0.25):
        c.decide(g)
    c2 = AdaptiveGradClipper()
    c2.load_state_dict(c.state_dict())
    assert c2 == c
    assert c2.decide(0.4) == c.decide(0.4)
