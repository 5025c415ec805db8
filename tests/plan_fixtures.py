"""The planner's facts of the released 8.5B model, computed once per test session (meta-device builds)."""

from __future__ import annotations

import functools

from tiny_workspace import ROOT

RELEASED = str(ROOT / "examples/opensoraplan1.5/model_opensoraplan1_5.json")


@functools.lru_cache(maxsize=None)
def released_facts():
    from mm.config_upstream import load_model_json
    from mm.tools.plan import model_facts

    return model_facts(load_model_json(RELEASED))
