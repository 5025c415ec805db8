"""Runs that stop instead of hanging or lingering: a progress watchdog, an orphan check, stop requests.

* ``ProgressWatchdog``: the trainer names each phase of a step as it enters it (``beat``); a rank that
  makes no progress for the timeout (``--distributed-timeout-minutes``) logs its rank, iteration and
  the phase / collective it is stuck in, and exits with ``EXIT_HANG``. Every rank has one: the rank
  that hangs names what it was doing, the ranks that wait for it name the collective they wait in, and
  the launcher then tears the job down instead of it hanging until the job's time limit.
* ``watch_parent``: under torchrun a worker exits (``EXIT_ORPHAN``) as soon as its agent is gone, so a
  SIGKILLed agent does not leave workers training and writing checkpoints.
* ``StopRequests``: SIGTERM / SIGUSR1 (SLURM ``--signal``) only set a flag; the trainer checks it at a
  step boundary, agrees on it over all ranks, saves and exits 0 (megatron's ``--exit-signal-handler``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger("mm.watchdog")

EXIT_HANG = 4
EXIT_ORPHAN = 5


def _fail(code: int, message: str) -> None:
    """Log, flush and leave the process at once (a thread cannot raise into a rank blocked in C++).

    The exit happens whatever the log sinks do: a handler whose stream was closed (a test's captured
    stream, a rotated file) raises on ``flush``, and a watchdog that dies of that leaves the rank hanging.
    """
    try:
        logger.error("%s", message)
        for h in logging.getLogger().handlers + logger.handlers:
            try:
                h.flush()
            except (OSError, ValueError):
                continue  # this sink is gone; the others and stderr still get the message
        print(f"error: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


class ProgressWatchdog:
    """Exit this rank when no ``beat`` came for ``timeout_s`` seconds while armed."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.rank = timeout_s, rank
        self.poll_s = poll_s if poll_s is not None else min(10.0, timeout_s / 4)
        self.phase: str | None = None  # None: disarmed
        self.iteration = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mm-progress-watchdog", daemon=True)
        self._thread.start()

    def beat(self, phase: str | None, iteration: int | None = None) -> None:
        """Entering ``phase`` (None disarms: e.g. after the loop); resets the clock."""
        self.phase = phase
        if iteration is not None:
            self.iteration = iteration
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if self.phase is not None and idle > self.timeout_s:
                _fail(EXIT_HANG, f"rank {self.rank}: no progress for {idle:.0f} s (--distributed-timeout-minutes "
                                 f"{self.timeout_s / 60:g}) at iteration {self.iteration} in {self.phase}; exiting so "
                                 "the job stops instead of hanging (the rank that hangs names its own phase; the "
                                 "others name the collective they wait in)")


def watch_parent(rank: int, poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), exit when the agent that started this worker is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # started by hand or by a test: the parent is a shell, which may legitimately go away
    parent = os.getppid()

    def run():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the agent died (SIGKILL leaves us no other sign)
                _fail(EXIT_ORPHAN, f"rank {rank}: the torchrun agent (pid {parent}) is gone; exiting instead of "
                                   "training on as an orphan")

    t = threading.Thread(target=run, name="mm-parent-watch", daemon=True)
    t.start()
    return t


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequests:
    """SIGTERM / SIGUSR1 -> a flag read at the next step boundary (installed from the main thread)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
