"""Working memory of ``python -m checkpoint_tools convert`` on a synthetic SUV checkpoint.

Writes a synthetic upstream-legacy save (TP ``--tp``, ``model`` + ``ema_model``, seeded random tensors of
the SUV key set at a width chosen to reach ``--params`` parameters), then runs, each in a fresh child
process, ``convert --to released`` (the release merge: TP shards -> one safetensors file, EMA) and
``convert --to upstream-legacy --tp T`` from that file (the split back). The tool prints its peak RSS
and the RSS it started the work with (after imports and opening the source, with the peak counter
reset); their difference is the working memory, compared with the bound ``1.5 x largest input shard +
one full tensor``. Prints a table; the last line is one JSON object
``{"bench": "checkpoint_tools_memory", "params": N, "dtype": .., "cases": {name: {"working_mib": ..,
"peak_rss_mib": .., "bound_mib": .., "largest_shard_mib": .., "wall_s": ..}}}``.

    python bench/checkpoint_tools_memory.py --params 1e9 --dtype bf16 --dir /tmp/ckpt_mem
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def suv_shapes(params: float, head_dim: int = 64) -> tuple[dict, dict]:
    """Predictor config (tiny-preset structure, 7 U stages) whose width reaches ``params`` parameters, and
    its released-key-space shapes (built on the meta device: nothing allocated)."""
    from mm.models import SparseUMMDiT
    from mm.models.suv_config import tiny_suv_config

    heads = 2
    while True:
        cfg = {**tiny_suv_config(), "num_heads": heads, "head_dim": head_dim, "timestep_embed_dim": 256,
               "caption_channels": 256, "pooled_projection_dim": 128}
        shapes = {k: tuple(v.shape) for k, v in SparseUMMDiT.from_upstream(cfg, device="meta").state_dict().items()}
        n = sum(_numel(s) for s in shapes.values())
        if n >= params:
            return cfg, shapes
        heads = max(heads + 2, int(heads * (params / n) ** 0.5) // 2 * 2)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_synthetic_legacy(out: Path, shapes: dict, tp: int, dtype) -> None:
    """An upstream-legacy save with seeded random weights and EMA, generated tensor by tensor."""
    import torch

    from checkpoint_tools.keyspace import TensorInfo
    from checkpoint_tools.legacy import write_legacy

    infos = {k: TensorInfo(s, dtype) for k, s in shapes.items()}

    def read(group, key):
        g = torch.Generator().manual_seed(hash((group, key)) % 2**31)
        return torch.randn(infos[key].shape, generator=g).to(dtype)

    write_legacy(out, {"raw": infos, "ema": infos}, read, tp=tp, pp=1, iteration=100)


def run_convert(args: list[str]) -> dict:
    """One ``convert`` in a child process: its peak RSS, start-up RSS and wall time."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "checkpoint_tools", "convert", *args], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"convert {args} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"peak RSS ([\d,]+) MiB \(([\d,-]+) MiB above the ([\d,]+) MiB", r.stdout)
    peak, working, start = (float(x.replace(",", "")) for x in m.groups())
    return {"peak_rss_mib": peak, "working_mib": working, "start_rss_mib": start, "wall_s": round(time.time() - t0, 1)}


def measure(params: float, tp: int, dtype_name: str, work: Path) -> dict:
    import torch

    from checkpoint_tools.cli import DTYPES

    dtype = DTYPES[dtype_name]
    cfg, shapes = suv_shapes(params)
    if work.exists():
        shutil.rmtree(work)
    legacy = work / "legacy"
    write_synthetic_legacy(legacy, shapes, tp, dtype)
    largest_tensor = max(_numel(s) for s in shapes.values()) * dtype.itemsize / 2**20
    shard_mib = max(p.stat().st_size for p in legacy.rglob("model_optim_rng.pt")) / 2**20
    released = work / "model_ema.safetensors"
    cases = {}
    cases["legacy->released"] = run_convert(["--load", str(legacy), "--save", str(released), "--to", "released",
                                             "--ema"])
    cases["legacy->released"]["largest_shard_mib"] = shard_mib
    cases["released->legacy"] = run_convert(["--load", str(released), "--save", str(work / "back"), "--to",
                                             "upstream-legacy", "--tp", str(tp)])
    cases["released->legacy"]["largest_shard_mib"] = released.stat().st_size / 2**20
    for c in cases.values():
        c["bound_mib"] = 1.5 * c["largest_shard_mib"] + largest_tensor
    n = sum(_numel(s) for s in shapes.values())
    del torch
    return {"bench": "checkpoint_tools_memory", "params": n, "dtype": dtype_name, "tp": tp,
            "hidden": cfg["num_heads"] * cfg["head_dim"], "largest_tensor_mib": round(largest_tensor, 1),
            "cases": cases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--dir", help="scratch directory (removed and rewritten); default: a temporary directory, removed after")
    args = p.parse_args()
    from mm.ops import select_backend

    select_backend("cpu")
    with tempfile.TemporaryDirectory(prefix="mm_bench_ckpt_") as tmp:
        res = measure(args.params, args.tp, args.dtype, Path(args.dir or tmp))
    print(f"{res['params']:,} parameters ({res['dtype']}, hidden {res['hidden']}), TP {res['tp']}")
    print(f"{'case':20s} {'working MiB':>12s} {'bound MiB':>10s} {'peak RSS MiB':>13s} {'wall s':>7s}")
    for name, c in res["cases"].items():
        print(f"{name:20s} {c['working_mib']:12,.0f} {c['bound_mib']:10,.0f} {c['peak_rss_mib']:13,.0f} {c['wall_s']:7.1f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
