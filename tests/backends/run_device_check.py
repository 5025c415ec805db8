"""``make device-check``: the backend test suite plus, on an accelerator, the timing table; one JSON report.

1. ``pytest tests/backends``: the CPU contract tests of the cuda/npu kernel wrappers (always run) and the
   device tests (``test_device.py``; skipped with their reason where no GPU/NPU is present);
2. on a GPU/NPU: ``device_suite.py timing`` (attention fwd+bwd TFLOP/s at 8k/32k tokens for k = 1, 4, 8;
   one mid-size SUV training step with MFU);
3. writes ``--out`` (default outputs/device_check.json): device, library versions, every test's outcome,
   each device check's measurements, the timing table. Exit 0 iff nothing failed.

Sized for one H200 in under 8 minutes (``--budget-s`` bounds each phase).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

VERSIONED = ("torch", "megatron-core", "flash-attn", "transformer-engine", "apex", "torch-npu", "mindspeed")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, reason = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (node.get("message") or node.text or "").strip()[:2000]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time", 0)), 2), **({"reason": reason} if reason else {})})
    return tests


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "device_check.json"))
    p.add_argument("--budget-s", type=int, default=420, help="time limit of each phase (tests, timing)")
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    results_dir = out.parent / "device_check"
    results_dir.mkdir(parents=True, exist_ok=True)
    junit = results_dir / "junit.xml"

    from mm.ops import registry

    device = next((b for b in ("cuda", "npu") if b in registry.available_backends()), None)
    env = {**os.environ, "MM_DEVICE_CHECK_DIR": str(results_dir)}
    tests_proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
         str(HERE)], cwd=ROOT, env={**env, "MM_BACKEND": "cpu"}, timeout=a.budget_s, capture_output=True, text=True)
    tests = _junit(junit) if junit.is_file() else []
    report = {
        "device": device or "none (cpu only)",
        "versions": _versions(),
        "tests": tests,
        "summary": {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")},
        "device_results": {f.stem: json.loads(f.read_text()) for f in sorted(results_dir.glob("*.json"))},
    }
    ok = tests_proc.returncode == 0 and bool(tests)
    if not tests:
        report["pytest_output"] = (tests_proc.stdout + tests_proc.stderr)[-4000:]
    if device is None:
        report["timing"] = {"skipped": "no accelerator: the timing table needs a CUDA GPU or an Ascend NPU"}
    else:
        timing = results_dir / "timing.json"
        proc = subprocess.run([sys.executable, str(HERE / "device_suite.py"), "timing", "--out", str(timing)],
                              cwd=ROOT, env={**env, "MM_BACKEND": device}, timeout=a.budget_s,
                              capture_output=True, text=True)
        report["timing"] = json.loads(timing.read_text()) if timing.is_file() else {"error": proc.stderr[-4000:]}
        ok = ok and proc.returncode == 0
    report["seconds"] = round(time.time() - t0, 1)
    report["ok"] = ok
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    s = report["summary"]
    print(f"device-check on {report['device']}: {s['passed']} passed, {s['failed']} failed, {s['error']} errors, "
          f"{s['skipped']} skipped; timing: {'skipped' if device is None else ('ok' if ok else 'FAILED')}; "
          f"{report['seconds']} s -> {out}")
    for t in tests:
        if t["outcome"] in ("failed", "error"):
            print(f"  {t['outcome']}: {t['test']}: {t.get('reason', '')[:300]}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
