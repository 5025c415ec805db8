#!/usr/bin/env bash
# Train the released 8.5B SUV (spec §7.8 values) on one node; set NNODES/NODE_RANK/MASTER_ADDR for more.
# Data/model paths are the JSONs next to this script; edit them to point at your data and weights.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SAVE=${SAVE:-checkpoints/opensoraplan1_5}

torchrun --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pretrain_sora.py \
  --mm-model examples/opensoraplan1.5/model_opensoraplan1_5.json \
  --mm-data examples/opensoraplan1.5/data.json \
  --tensor-model-parallel-size 8 --sequence-parallel \
  --micro-batch-size 1 --global-batch-size "$((NPROC_PER_NODE * NNODES / 8))" \
  --lr 1e-5 --min-lr 1e-5 --lr-decay-style constant --lr-warmup-iters 0 \
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-15 --weight-decay 1e-4 \
  --clip-grad 1.0 --clip_grad_ema_decay 0.99 \
  --selective_recom --recom_ffn_layers 32 \
  --bf16 --use-distributed-optimizer \
  --train-iters 100000 --seed 1024 \
  --save "$SAVE" --load "$SAVE" --save-interval 1000 --log-interval 1 "$@"
