#!/bin/bash
# Several nodes with torchrun and a c10d rendezvous; run this once on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi_node.sh CONFIG [key=value ...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi_node.sh CONFIG [key=value ...]
# Env: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (required); NPROC (default: GPUs per node, else 2);
#      RDZV_ID (default: dist_finetune). Optional NCCL settings: see slurm/finetune.sh.
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,6p' "$0"; exit 2; }
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:?set MASTER_PORT}"
CONFIG=$1; shift
gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
local_addr=()   # all nodes on one machine (testing): keep every rank on loopback
[[ $MASTER_ADDR == 127.* || $MASTER_ADDR == localhost ]] && local_addr=(--local_addr=127.0.0.1)
trap '' USR1    # the torchrun agent ignores USR1 (it would die of it); the ranks handle it
exec python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_id="${RDZV_ID:-dist_finetune}" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  "${local_addr[@]}" -m dist_finetune.train --config "$CONFIG" "$@"
