#!/bin/bash
# One node, one rank per GPU (or NPROC CPU ranks with gloo):
#   launch/torchrun_single_node.sh CONFIG [key=value ...]
#   NPROC=2 launch/torchrun_single_node.sh configs/quickstart.yaml     # CPU ranks on a laptop
# Env: NPROC (default: number of GPUs, else 2), MASTER_PORT (default: a free port chosen by torchrun).
# Everything stays on 127.0.0.1.
# SIGUSR1 sent to the ranks (pkill -USR1 -f dist_finetune.train) checkpoints and exits; rerun with resume=auto.
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,6p' "$0"; exit 2; }
CONFIG=$1; shift
gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 2 ))}
trap '' USR1   # the torchrun agent ignores USR1; the ranks handle it
exec python -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_id="single-$$" --rdzv_endpoint="127.0.0.1:${MASTER_PORT:-0}" --local_addr=127.0.0.1 \
  -m dist_finetune.train --config "$CONFIG" "$@"
