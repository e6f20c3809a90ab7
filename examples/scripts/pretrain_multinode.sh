#!/usr/bin/env bash
# Multi-node ARRA pretraining: one torchrun per node, c10d rendezvous.
#
# Run the same command on every node (only NODE_RANK differs):
#
#   # node 0 (its address is MASTER_ADDR)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=examples/configs/llamagen_b_c2i_imagenet256.yaml \
#       examples/scripts/pretrain_multinode.sh --data-path /data/imagenet256/train --save /ckpt/llamagen_b
#   # node 1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 CONFIG=examples/configs/llamagen_b_c2i_imagenet256.yaml \
#       examples/scripts/pretrain_multinode.sh --data-path /data/imagenet256/train --save /ckpt/llamagen_b
#
# Extra arguments are passed to examples/pretrain_arra.py after --config, so they
# override the YAML (the command line wins). On SLURM use pretrain_slurm.sbatch,
# which calls this script once per node.
#
# Environment (defaults in brackets):
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's rank, 0..NNODES-1 [0]; node 0 hosts the rendezvous store.
#                   With c10d the global ranks follow the join order, not NODE_RANK.
#   GPUS_PER_NODE   processes per node [number of GPUs nvidia-smi lists, else 1]
#   MASTER_ADDR     address of node 0, reachable from every node [127.0.0.1]
#   MASTER_PORT     rendezvous TCP port on MASTER_ADDR [29500]
#   RDZV_ID         job id shared by all nodes of one job [SLURM_JOB_ID, else "arra"]
#   CONFIG          YAML recipe (examples/configs/*.yaml); empty: flags only []
#   PYTHON          interpreter [.venv/bin/python of this checkout if present, else python3]
#   LOG_DIR         if set, this node's output is also written to LOG_DIR/node<NODE_RANK>.log
#
# A rank that dies (crash, OOM, node loss) ends the whole job: --max-restarts 0
# makes this node's torchrun stop its other workers and exit non-zero; ranks on
# other nodes then fail on their next collective (at the latest after
# --distributed-timeout-minutes) and their torchrun exits non-zero too.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "${SCRIPT_DIR}/../.." && pwd)

detect_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ "${n}" -gt 0 ]]; then echo "${n}"; else echo 1; fi
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(detect_gpus)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-arra}}
CONFIG=${CONFIG:-}
LOG_DIR=${LOG_DIR:-}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
    echo "error: NODE_RANK=${NODE_RANK} is outside 0..$((NNODES - 1)) (NNODES=${NNODES})" >&2
    exit 2
fi

config_args=()
if [[ -n "${CONFIG}" ]]; then
    if [[ ! -f "${CONFIG}" ]]; then
        echo "error: CONFIG=${CONFIG}: no such file" >&2
        exit 2
    fi
    config_args=(--config "$(cd -- "$(dirname -- "${CONFIG}")" && pwd)/$(basename -- "${CONFIG}")")
fi

# Node 0 hosts the c10d store; the others connect to MASTER_ADDR:MASTER_PORT.
if [[ "${NODE_RANK}" -eq 0 ]]; then is_host=1; else is_host=0; fi

# One OpenMP thread per rank unless asked otherwise (torchrun would warn and pick 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Abort a collective that waits on a dead peer instead of hanging (the watchdog
# fires after --distributed-timeout-minutes).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Megatron's usual setting: keeps TP / sequence-parallel communication kernels ordered
# ahead of the compute that depends on them.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

cmd=(
    "${PYTHON}" -m torch.distributed.run
    --nnodes "${NNODES}"
    --nproc-per-node "${GPUS_PER_NODE}"
    --rdzv-backend c10d
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"
    --rdzv-id "${RDZV_ID}"
    --rdzv-conf "is_host=${is_host}"
    --max-restarts 0
    "${REPO_ROOT}/examples/pretrain_arra.py"
    ${config_args[@]+"${config_args[@]}"}
    "$@"
)

echo "[node ${NODE_RANK}/${NNODES}] $(hostname): ${GPUS_PER_NODE} processes, rendezvous ${MASTER_ADDR}:${MASTER_PORT} id ${RDZV_ID}" >&2
if [[ -n "${LOG_DIR}" ]]; then
    mkdir -p "${LOG_DIR}"
    # pipefail: the exit status is torchrun's, not tee's.
    "${cmd[@]}" 2>&1 | tee -a "${LOG_DIR}/node${NODE_RANK}.log"
else
    exec "${cmd[@]}"
fi
