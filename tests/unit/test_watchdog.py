"""The hang watchdog's exit path survives broken log sinks (a closed captured stream made a rank hang)."""

import subprocess
import sys

from tiny_workspace import ROOT

_CHILD = r"""
import logging, tempfile
from mm.training import watchdog

closed = tempfile.TemporaryFile('w+')  # a file stream, as pytest's capture uses
logging.getLogger().addHandler(logging.StreamHandler(closed))
closed.close()  # flush() on this handler now raises ValueError, as pytest's closed capture streams do
watchdog._fail(watchdog.EXIT_HANG, "rank 1: no progress for 3 s")
"""


def test_fail_exits_with_its_code_even_when_a_handler_cannot_flush():
    r = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert "error: rank 1: no progress for 3 s" in r.stderr
