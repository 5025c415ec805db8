# shellcheck shell=bash
# Shared by the launch scripts of this directory (sourced, not run). Every failure is one "error:" line, exit 2.
#
# Communication knobs (set them in your environment before launching; the defaults below are only set when
# you have not set them):
#   NCCL (GPUs)
#     NCCL_SOCKET_IFNAME=ib0|eth0     interface for NCCL's bootstrap and socket transport (also GLOO_SOCKET_IFNAME)
#     NCCL_IB_HCA=mlx5_0,mlx5_1       InfiniBand/RoCE adapters to use;  NCCL_IB_DISABLE=1 forces sockets
#     NCCL_IB_GID_INDEX=3             RoCE v2 GID;  NCCL_IB_TIMEOUT=22, NCCL_IB_RETRY_CNT=7 for large fabrics
#     NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET   to see which transport each ring uses (default WARN)
#     TORCH_NCCL_ASYNC_ERROR_HANDLING=3  a timed-out collective tears the process down (default here)
#     TORCH_NCCL_DUMP_ON_TIMEOUT=1    flight-recorder dump of the last collectives on a timeout
#     collective timeout: pretrain_sora.py --distributed-timeout-minutes N
#   HCCL (Ascend NPUs, train_npu.sh)
#     HCCL_SOCKET_IFNAME=eth0         host interface for HCCL's rendezvous;  HCCL_IF_BASE_PORT=60000 port range
#     HCCL_CONNECT_TIMEOUT=1200       seconds to build links (large clusters need more than the default 120)
#     HCCL_EXEC_TIMEOUT=1800          seconds a collective may wait;  HCCL_BUFFSIZE=200 MB per link buffer
#     HCCL_ASYNC_ERROR_HANDLING=1     a failed collective tears the process down
#     ASCEND_GLOBAL_LOG_LEVEL=3       (0 debug .. 3 error) CANN plog verbosity;  ASCEND_RT_VISIBLE_DEVICES=0,..,7

osp_die() {
  echo "error: $*" >&2
  exit 2
}

osp_require_env() {  # NAME...: each must be set and non-empty
  local v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || osp_die "$v is not set (this script needs: $*)"
  done
}

osp_require_int() {  # NAME...: each a positive integer
  local v
  for v in "$@"; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || osp_die "$v must be a positive integer, got '${!v}'"
  done
}

osp_require_abs() {  # NAME...: each an absolute path (shared storage is mounted at the same path on every node)
  local v
  for v in "$@"; do
    [[ "${!v}" == /* ]] || osp_die "$v must be an absolute path (on storage shared by all nodes), got '${!v}'"
  done
}

osp_comm_env() {  # the defaults of the knobs above, per backend
  if [[ "${MM_BACKEND:-auto}" == npu ]]; then
    export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
    export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
    export HCCL_ASYNC_ERROR_HANDLING="${HCCL_ASYNC_ERROR_HANDLING:-1}"
    export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"
    export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
    export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
  else
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then
      export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}"
    fi
  fi
}

osp_run() {  # run the command, or with ECHO_ONLY=1 print it (one argument per line) and stop
  if [[ "${ECHO_ONLY:-0}" == 1 ]]; then
    printf '%s\n' "$@"
    exit 0
  fi
  exec "$@"
}
