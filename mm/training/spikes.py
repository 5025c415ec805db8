"""Loss-spike detection for ``--rollback-on-spike FACTOR``: a step whose loss exceeds FACTOR x the running
mean of the recent accepted losses is a spike; the trainer then reloads the last checkpoint and skips the
offending batch (what users of Open-Sora Plan and Open-Sora do by hand after a divergence)."""

from __future__ import annotations

import math
from collections import deque


class SpikeDetector:
    """Running mean over the last ``window`` accepted (finite, non-spike) losses; armed after ``warmup`` of them."""

    def __init__(self, factor: float, window: int = 20, warmup: int = 3):
        if not factor > 1.0:
            raise ValueError(f"spike factor must be > 1, got {factor}")
        if not 1 <= warmup <= window:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup} window={window}")
        self.factor, self.warmup = factor, warmup
        self.losses: deque[float] = deque(maxlen=window)

    @property
    def mean(self) -> float | None:
        return sum(self.losses) / len(self.losses) if len(self.losses) >= self.warmup else None

    def is_spike(self, loss: float) -> bool:
        mean = self.mean
        return mean is not None and math.isfinite(loss) and loss > self.factor * mean

    def accept(self, loss: float) -> None:
        if math.isfinite(loss):  # non-finite steps are skipped by the clipper, not averaged
            self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
