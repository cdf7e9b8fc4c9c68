#!/bin/bash
# MPI launch (rank, world and local rank from mpi4py; needs `pip install -e '.[mpi]'`):
#   NP=4 launch/mpirun.sh CONFIG [key=value ...]
# Env: NP (default 2), MPIRUN (default: mpiexec), MPI_ARGS (extra launcher arguments, e.g. a hostfile),
#      MASTER_ADDR (default: rank 0's address, sent to all ranks over MPI), MASTER_PORT (default: a free
#      port chosen by rank 0).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,6p' "$0"; exit 2; }
CONFIG=$1; shift
# shellcheck disable=SC2086
exec ${MPIRUN:-mpiexec} -n "${NP:-2}" ${MPI_ARGS:-} python -m dist_finetune.train --config "$CONFIG" "$@"
