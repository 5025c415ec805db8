"""Batch inference entry point (torchrun). Not implemented yet."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate videos with Open-Sora Plan v1.5. NOT IMPLEMENTED YET.")
    p.add_argument("--mm-model", required=True, help="upstream inference JSON (inference_t2v_model1_5.json style)")
    return p


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print("inference_sora.py: inference is not implemented yet (see the open inference issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
