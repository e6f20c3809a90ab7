#!/bin/bash
# Build one ARRA dataset with every GPU of several nodes: one builder process per GPU under
# torchrun. Run the same command on every node (or through examples/scripts/build_dataset_slurm.sbatch).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 examples/scripts/build_dataset_multinode.sh \
#       --input '/data/laion_coco/{00000..59999}.tar' --output-prefix /data/laion_coco_t2i \
#       --text-tokenizer /models/llamagen_t5 --image-tokenizer /models/vq_ds16_t2i --image-size 256 \
#       --max-seq-length 1055 --encoder open_clip:local-dir:/models/clip_vit_l14 --device cuda
#
# The processes share nothing but the output directory (it must be on a file system every
# node sees): each claims parts (P.parts/part-NNNNN.claim), builds them on its own GPU
# (LOCAL_RANK), and the one that finishes the last part merges. The result is byte-identical
# to a one-process build. If a node dies, run the same command again: finished parts are
# kept, parts claimed by dead processes are taken over (at once on the same host, after
# 10 minutes without a heartbeat from another one), and the merge follows.
# A second submission of the same command on the same prefix joins the build.

set -euo pipefail

REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PYTHON=${PYTHON:-${REPO_ROOT}/.venv/bin/python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
GPUS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29600}

# --workers 1: one process per GPU already; raise it to overlap JPEG decoding on the CPU.
exec "${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}" --node-rank "${NODE_RANK}" \
    --nproc-per-node "${GPUS_PER_NODE}" --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    --max-restarts 0 "${REPO_ROOT}/tools/build_indexed_dataset.py" "$@"
