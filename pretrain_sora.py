"""Training entry point (torchrun). Not implemented yet: `--help` lists the accepted launch flags."""

import argparse
import sys

from mm.config_upstream import add_megatron_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train Open-Sora Plan v1.5 (SUV) on megatron-core. NOT IMPLEMENTED YET.")
    p.add_argument("--mm-model", required=True, help="upstream model JSON (ae, text encoders, predictor, diffusion)")
    p.add_argument("--mm-data", required=True, help="upstream data JSON")
    add_megatron_flags(p)
    return p


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print("pretrain_sora.py: training is not implemented yet (see the open training issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
