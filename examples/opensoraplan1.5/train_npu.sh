#!/usr/bin/env bash
# Ascend NPU variant of train.sh (same arguments and environment): loads the CANN environment, selects the
# npu backend (torch_npu + MindSpeed), makes NPUs 0..NPROC_PER_NODE-1 visible and sets the HCCL defaults of
# common.sh (link/exec timeouts, async error handling, CANN log level). Set HCCL_SOCKET_IFNAME and
# HCCL_IF_BASE_PORT for your network.
#
#   MASTER_ADDR=node0 NNODES=64 NODE_RANK=$i NPROC_PER_NODE=8 PRETRAINED=/shared/pretrained \
#   RUN_DIR=/shared/runs/video4 examples/opensoraplan1.5/train_npu.sh Video-4
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
osp_require_env NPROC_PER_NODE
osp_require_int NPROC_PER_NODE
ASCEND_SET_ENV="${ASCEND_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
[[ -f "$ASCEND_SET_ENV" ]] || osp_die "CANN environment script not found: $ASCEND_SET_ENV (set ASCEND_SET_ENV)"
set +u  # the CANN script reads unset variables
# shellcheck disable=SC1090
source "$ASCEND_SET_ENV"
set -u
export MM_BACKEND=npu
export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((NPROC_PER_NODE - 1)))}"
exec "$HERE/train.sh" "$@"
