"""Merge an upstream (MindSpeed-MM / Open-Sora Plan) TP-sharded megatron checkpoint into one flat file
(spec §10.1): what the released ``model.pt`` / ``model_ema.pt`` are.

    python checkpoint_tools/merge_upstream_tp.py --load UPSTREAM_SAVE_DIR [--ema] --out model_ema.pt

Finds ``iter_NNNNNNN`` (from ``latest_checkpointed_iteration.txt``) or ``release``, reads every
``mp_rank_TT/model_optim_rng.pt`` (key ``model``, or ``ema_model`` with ``--ema``), concatenates the
column-parallel keys along dim 0 and the row-parallel ones along dim 1, takes replicated tensors from
rank 0 and drops ``_extra_state`` entries. Pipeline-parallel upstream checkpoints (``mp_rank_TT_PPP``)
are rejected: v1.5 trained with PP = 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def find_iteration_dir(load: Path) -> Path:
    latest = load / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        text = latest.read_text().strip()
        return load / ("release" if text == "release" else f"iter_{int(text):07d}")
    return load


def merge(load: str | os.PathLike, *, ema: bool = False) -> dict:
    import torch

    from mm.models.sparse_ummdit import merge_tp_state_dicts

    d = find_iteration_dir(Path(load))
    ranks = sorted(p for p in d.glob("mp_rank_*") if p.is_dir())
    if not ranks:
        raise FileNotFoundError(f"no mp_rank_* directories under {d}")
    if any(re.fullmatch(r"mp_rank_\d+_\d+", p.name) for p in ranks):
        raise ValueError(f"{d} holds a pipeline-parallel checkpoint (mp_rank_TT_PPP); only PP = 1 is supported")
    key = "ema_model" if ema else "model"
    shards = []
    for p in ranks:
        obj = torch.load(p / "model_optim_rng.pt", map_location="cpu", weights_only=False)
        if key not in obj:
            raise KeyError(f"{p / 'model_optim_rng.pt'} has no {key!r} entry (keys: {sorted(obj)})")
        shards.append({k: v for k, v in obj[key].items() if not k.endswith("_extra_state")})
    return merge_tp_state_dicts(shards)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="upstream --save directory")
    p.add_argument("--ema", action="store_true", help="merge the EMA weights (ema_model)")
    p.add_argument("--out", required=True, help="output .pt file")
    args = p.parse_args(argv)
    import torch

    try:
        state = merge(args.load, ema=args.ema)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"merge_upstream_tp: error: {e}", file=sys.stderr)
        return 2
    torch.save(state, args.out)
    print(f"merged {len(state)} tensors -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
