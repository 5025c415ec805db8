#!/usr/bin/env bash
# The released 8.5B setup at its final resolution: train.sh with the Video-5 stage (121x576x1024, lr 1e-5,
# TP/SP 4; python -m mm.tools.recipes list). Same environment as train.sh (MASTER_ADDR, NNODES, NODE_RANK,
# NPROC_PER_NODE, PRETRAINED, RUN_DIR); STAGE picks another stage.
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train.sh" "${STAGE:-Video-5}" "$@"
