#!/usr/bin/env bash
# Generate videos with the released weights (spec §9.1: TP 4 + SP per replica; prompts sharded over replicas).
# Point --upstream-dit/--upstream-vae/--t5/--clip at your local copies of the released files.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nproc_per_node "${NPROC_PER_NODE:-8}" inference_sora.py \
  --mm-model examples/opensoraplan1.5/inference_t2v_model1_5.json \
  --prompt-file examples/opensoraplan1.5/prompts.txt \
  --tensor-model-parallel-size 4 --sequence-parallel \
  --upstream-dit pretrained/MindSpeed/model_ema.pt --upstream-vae pretrained/wfvae/wfvae_888_dim32.ckpt \
  --t5 pretrained/t5-v1_1-xl --clip pretrained/CLIP-ViT-bigG-14-laion2B-39B-b160k \
  --seed 1235 --save-path samples/osp15 "$@"
