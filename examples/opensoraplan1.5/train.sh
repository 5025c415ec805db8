#!/usr/bin/env bash
# Launch one Open-Sora Plan v1.5 training stage on THIS node: one torchrun per node, c10d rendezvous.
# Run it on every node (train.slurm does that under SLURM).
#
#   MASTER_ADDR=node0 NNODES=64 NODE_RANK=$i NPROC_PER_NODE=8 PRETRAINED=/shared/pretrained \
#   RUN_DIR=/shared/runs/video4 DATA=/shared/data/data.txt  examples/opensoraplan1.5/train.sh Video-4 [flags]
#
# Stages: python -m mm.tools.recipes list (spec §11.4). The stage's shape, fps, LR, batch, TP/SP and
# micro-batch come from mm/tools/recipes.py; the number of micro-batches per step is computed from the global
# batch, the data-parallel size of NNODES x NPROC_PER_NODE and the micro-batch, and refused when it does not
# divide. Extra flags go to pretrain_sora.py (and win over the stage's).
#
# Required: MASTER_ADDR (the rendezvous host, reachable from every node), NNODES, NODE_RANK, NPROC_PER_NODE,
#   PRETRAINED (absolute: wfvae/wfvae_888_dim32.ckpt, t5-v1_1-xl/, CLIP-ViT-bigG-14-laion2B-39B-b160k/),
#   RUN_DIR (absolute, shared by all nodes: config/, ckpt/, logs/, tensorboard/).
# Optional: MASTER_PORT (29500), DATA (data.txt, default the released data.json's), INIT_WEIGHTS (released-layout
#   SUV weights to start from), GLOBAL_BATCH (override), SAVE_INTERVAL (1000), KEEP_LAST (3), MM_BACKEND (auto),
#   PYTHON (python), ECHO_ONLY=1 (print the command instead of running it),
#   MODE=train|preflight|dry-run (preflight: python -m mm.tools.preflight on every node with the same flags;
#   dry-run: pretrain_sora.py --dry-run --world-size NNODES x NPROC_PER_NODE in this process, no torchrun).
# Logs: RUN_DIR/logs/node-<NODE_RANK>/ holds one file per local rank (torchrun --log-dir/--tee); the console shows
#   local rank 0 only, and only global rank 0 logs progress. Communication knobs: see common.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

[[ $# -ge 1 ]] || osp_die "usage: train.sh STAGE [pretrain_sora.py flags] (stages: python -m mm.tools.recipes list)"
STAGE="$1"
shift
MODE="${MODE:-train}"
PYTHON="${PYTHON:-python}"
case "$MODE" in
  train | preflight) osp_require_env MASTER_ADDR NNODES NODE_RANK NPROC_PER_NODE PRETRAINED RUN_DIR ;;
  dry-run) osp_require_env NNODES NPROC_PER_NODE PRETRAINED RUN_DIR; NODE_RANK="${NODE_RANK:-0}" ;;
  *) osp_die "MODE must be train, preflight or dry-run, got '$MODE'" ;;
esac
osp_require_int NNODES NPROC_PER_NODE
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || osp_die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
osp_require_abs PRETRAINED RUN_DIR
MASTER_PORT="${MASTER_PORT:-29500}"
WORLD=$((NNODES * NPROC_PER_NODE))
cd "$REPO"

# the stage's JSONs (absolute paths inside) and flags; each node writes its own identical copy
RENDER=("$PYTHON" -m mm.tools.recipes render "$STAGE" --world-size "$WORLD" --pretrained "$PRETRAINED"
        --out "$RUN_DIR/config/node-$NODE_RANK")
[[ -n "${DATA:-}" ]] && RENDER+=(--data "$DATA")
[[ -n "${INIT_WEIGHTS:-}" ]] && RENDER+=(--init-weights "$INIT_WEIGHTS")
[[ -n "${GLOBAL_BATCH:-}" ]] && RENDER+=(--global-batch-size "$GLOBAL_BATCH")
STAGE_TEXT="$("${RENDER[@]}")"
mapfile -t STAGE_FLAGS <<<"$STAGE_TEXT"

# spec §7.8: the released optimizer and precision settings
FLAGS=("${STAGE_FLAGS[@]}"
  --lr-decay-style constant --lr-warmup-iters 0
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-15 --weight-decay 1e-4
  --clip-grad 1.0 --clip_grad_ema_decay 0.99
  --bf16 --use-distributed-optimizer --seed 1024
  --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval "${SAVE_INTERVAL:-1000}" --keep-last "${KEEP_LAST:-3}"
  --tensorboard-dir "$RUN_DIR/tensorboard" --log-interval 1)

osp_comm_env
if [[ "$MODE" == dry-run ]]; then
  osp_run "$PYTHON" pretrain_sora.py --dry-run --world-size "$WORLD" "${FLAGS[@]}" "$@"
fi

# SIGUSR1 (SLURM --signal) and SIGTERM reach the workers through torchrun, which then waits SHUTDOWN_TIMEOUT
# seconds for their preemption save before killing them
LAUNCH=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-osp15-$STAGE}"
  --max-restarts 0 --log-dir "$RUN_DIR/logs/node-$NODE_RANK" --tee 3 --local-ranks-filter 0
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}")
if [[ "$MODE" == preflight ]]; then
  osp_run "${LAUNCH[@]}" -m mm.tools.preflight "${FLAGS[@]}" "$@"
fi
osp_run "${LAUNCH[@]}" pretrain_sora.py "${FLAGS[@]}" "$@"
