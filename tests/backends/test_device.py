"""Device tests: each check of tests/backends/device_suite.py on the real accelerator (CUDA GPU or Ascend
NPU), in its own process with that backend. Skipped, with the reason, where no device is present; on a
GPU/NPU machine ``make device-check`` runs them and writes outputs/device_check.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm.ops import registry

SUITE = Path(__file__).resolve().parent / "device_suite.py"
ROOT = SUITE.parents[2]
DEVICE = next((b for b in ("cuda", "npu") if b in registry.available_backends()), None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no accelerator: torch sees no CUDA device and torch_npu is not installed "
                           "(device tests run on a GPU/NPU machine: make device-check)")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("device_work")  # shared by train and inference (the checkpoint)


@pytest.mark.parametrize("check", ["kernels", "suv", "train", "inference"])
def test_device(check, work):
    out_dir = Path(os.environ.get("MM_DEVICE_CHECK_DIR") or work / "results")
    out = out_dir / f"{check}.json"
    env = {**os.environ, "MM_BACKEND": DEVICE, "MM_DEVICE_CHECK_WORK": str(work / "ws")}
    proc = subprocess.run([sys.executable, str(SUITE), check, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text()) if out.is_file() else {}
    assert proc.returncode == 0, result.get("error") or proc.stderr[-4000:]
