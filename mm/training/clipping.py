"""Adaptive gradient clipping (spec §7.5, the v1.5 distributed-optimizer rule), with two fixes.

State: ``m`` (EMA of the global grad norm, sentinel < 0 before the first step) and ``v`` (EMA of the
squared deviation). For a global norm ``g``:

* first step: ``m = min(3g, 1.0)``, ``v = 0``, no clipping;
* ``thr = m + 3·sqrt(v)``, ``extreme = max(m + 5·sqrt(v), 5.0)``;
* ``g <= thr``: update ``m ← d·m + (1−d)·g``, ``v ← d·v + (1−d)·(m_new − g)²``, no clipping;
* ``thr < g <= extreme``: scale grads by ``1 / (g/thr + 1e-6)``; ``m``, ``v`` unchanged;
* ``g`` NaN/Inf or ``> extreme``: **skip the update** (upstream applied it, §12.14), count it; the run
  stops only after ``max_consecutive_bad`` skipped steps in a row.

The state (incl. counters) is part of the checkpoint (upstream re-initialised it on resume).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

INITIAL_NORM_CAP = 1.0


class TooManyBadSteps(RuntimeError):
    """Raised when the consecutive skipped-step limit is reached."""


@dataclass
class ClipDecision:
    action: str  # "update" | "clip" | "skip"
    coef: float  # gradient multiplier for "clip" (1.0 otherwise)
    threshold: float
    extreme: float
    grad_norm: float


@dataclass
class AdaptiveGradClipper:
    decay: float = 0.99
    max_consecutive_bad: int = 3
    m: float = -1e6
    v: float = 0.0
    num_skipped: int = 0
    num_clipped: int = 0
    consecutive_bad: int = 0

    def decide(self, grad_norm: float) -> ClipDecision:
        g = float(grad_norm)
        if not math.isfinite(g):
            return self._bad(g, math.nan, math.nan)
        if self.m < 0:
            self.m, self.v = min(3.0 * g, INITIAL_NORM_CAP), 0.0
            self.consecutive_bad = 0
            return ClipDecision("update", 1.0, math.inf, math.inf, g)
        sd = math.sqrt(self.v)
        thr = self.m + 3.0 * sd
        extreme = max(self.m + 5.0 * sd, 5.0)
        if g > extreme:
            return self._bad(g, thr, extreme)
        self.consecutive_bad = 0
        if g <= thr:
            d = self.decay
            self.m = d * self.m + (1.0 - d) * g
            self.v = d * self.v + (1.0 - d) * (self.m - g) ** 2
            return ClipDecision("update", 1.0, thr, extreme, g)
        self.num_clipped += 1
        return ClipDecision("clip", 1.0 / (g / thr + 1e-6), thr, extreme, g)

    def _bad(self, g: float, thr: float, extreme: float) -> ClipDecision:
        self.num_skipped += 1
        self.consecutive_bad += 1
        if self.consecutive_bad >= self.max_consecutive_bad:
            raise TooManyBadSteps(
                f"{self.consecutive_bad} consecutive steps skipped (last grad norm {g}, extreme threshold "
                f"{extreme}); stopping. Raise --max-bad-steps or inspect the data/learning rate."
            )
        return ClipDecision("skip", 0.0, thr, extreme, g)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
