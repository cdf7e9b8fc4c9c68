#!/bin/bash
# DeepSpeed's own launcher (pdsh/ssh to the hosts of a hostfile, "node0 slots=8" per line):
#   HOSTFILE=hostfile launch/deepspeed_launcher.sh CONFIG [key=value ...]
# Env: HOSTFILE (default: /job/hostfile), NUM_GPUS (per node, default: all), MASTER_PORT (default 29500).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,4p' "$0"; exit 2; }
CONFIG=$1; shift
args=(--hostfile "${HOSTFILE:-/job/hostfile}" --master_port "${MASTER_PORT:-29500}")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
exec deepspeed "${args[@]}" --no_local_rank --module dist_finetune.train --config "$CONFIG" "$@"
