#!/usr/bin/env bash
# Generate videos with the released weights (spec §9.1: TP 4 + SP per replica; prompts sharded over replicas).
#
#   PRETRAINED=/shared/pretrained NPROC_PER_NODE=8 examples/opensoraplan1.5/inference_t2v_1_5.sh [flags]
#
# PRETRAINED (absolute) holds the released files in the same layout train.sh uses: MindSpeed/model_ema.pt,
# wfvae/wfvae_888_dim32.ckpt, t5-v1_1-xl/, CLIP-ViT-bigG-14-laion2B-39B-b160k/. SAVE_PATH (default
# ./samples/osp15) and PROMPTS (default this directory's prompts.txt) are resolved against the directory you
# run the script from. ECHO_ONLY=1 prints the command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
osp_require_env PRETRAINED
osp_require_abs PRETRAINED
SAVE_PATH="$(realpath -m "${SAVE_PATH:-samples/osp15}")"
PROMPTS="$(realpath -m "${PROMPTS:-$HERE/prompts.txt}")"
cd "$HERE/../.."
osp_comm_env
osp_run "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" inference_sora.py \
  --mm-model "$HERE/inference_t2v_model1_5.json" --prompt-file "$PROMPTS" \
  --tensor-model-parallel-size 4 --sequence-parallel \
  --upstream-dit "$PRETRAINED/MindSpeed/model_ema.pt" --upstream-vae "$PRETRAINED/wfvae/wfvae_888_dim32.ckpt" \
  --t5 "$PRETRAINED/t5-v1_1-xl" --clip "$PRETRAINED/CLIP-ViT-bigG-14-laion2B-39B-b160k" \
  --seed 1235 --save-path "$SAVE_PATH" "$@"
