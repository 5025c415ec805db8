"""Export the SUV of one of our training checkpoints as one flat file in the released key space.

    python checkpoint_tools/export_dit.py --mm-model model.json --load CKPT --out model_ema.safetensors

The EMA weights are exported by default (``--raw`` for the trained weights). The checkpoint may have been
written at any TP/DP size (megatron dist_checkpointing reshards to TP=1 on load). The output (``.pt`` or
``.safetensors``) loads with ``SparseUMMDiT.from_upstream(config, checkpoint=OUT)`` and with the
upstream inference code (``predictor.from_pretrained``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mm-model", required=True, help="model JSON the checkpoint was trained with (its predictor block)")
    p.add_argument("--load", required=True, help="our checkpoint directory (pretrain_sora.py --save)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest complete)")
    p.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--out", required=True, help="output file, .pt or .safetensors")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="stored dtype (default fp32)")
    return p


def export(mm_model: str, load: str, out: str, *, iteration: int | None = None, raw: bool = False,
           dtype: str = "fp32") -> dict:
    from mm.ops import select_backend

    select_backend()
    from mm.builders import build_suv, torch_dtype
    from mm.config import ParallelConfig
    from mm.config_upstream import load_model_json
    from mm.distributed.init import init_parallel
    from mm.training.checkpointing import load_checkpoint

    if not out.endswith((".pt", ".pth", ".safetensors")):
        raise ValueError(f"--out must end in .pt, .pth or .safetensors, got {out!r}")
    ps = init_parallel(ParallelConfig())
    if ps.world_size != 1:
        raise ValueError(f"run export in one process (got world size {ps.world_size})")
    model = build_suv(load_model_json(mm_model), ps)
    it, _ = load_checkpoint(load, model, None, iteration=iteration, load_rng=False, use_ema=not raw)
    dt = torch_dtype(dtype)
    state = {k: v.detach().to(dt).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, out, metadata={"source": os.path.abspath(load), "iteration": str(it),
                                        "weights": "raw" if raw else "ema"})
    else:
        import torch

        torch.save(state, out)
    logging.getLogger(__name__).info("exported %s weights of %s (iteration %d): %d tensors -> %s",
                                     "raw" if raw else "EMA", load, it, len(state), out)
    return state


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.mm_model, args.load, args.out, iteration=args.iteration, raw=args.raw, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"export_dit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
