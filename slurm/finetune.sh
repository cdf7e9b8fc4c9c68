#!/bin/bash
# Finetune on a SLURM cluster:   mkdir -p logs && sbatch slurm/finetune.sh [CONFIG] [key=value ...]
#
# Every #SBATCH default below can be overridden on the sbatch line, e.g.
#   sbatch --nodes=4 --time=12:00:00 slurm/finetune.sh configs/gpt2_xl_spam.yaml train.lr=1e-5
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/finetune.sh configs/quickstart.yaml   # CPU nodes
#
# CPU nodes: say --cpus-per-task too. The default 16 suits GPU nodes; a job asking for more CPUs than a
# node has pends forever (squeue reason PartitionConfig). Each node runs DIST_FINETUNE_CPU_RANKS gloo ranks
# (default 2) sharing the task's CPUs: --cpus-per-task=32 gives each of 2 ranks 16 threads
# (OMP_NUM_THREADS, unless you set it). GPU ranks run one thread each.
#
# Two launch styles, picked from the allocation:
#   --ntasks-per-node=1 (default): one srun task per node runs torchrun, which starts one rank per GPU
#                                  (c10d rendezvous on the first node of the allocation).
#   --ntasks-per-node=G (G > 1):   srun starts one task per GPU running python directly; rank, world and
#                                  local rank come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID.
#
# Preemption: SLURM sends USR1 to this script 300 s before the time limit (--signal), and so can you
# (scancel --signal=USR1 --batch JOB). The script forwards it to the training ranks, which agree at the
# next optimizer step, save a checkpoint and exit; the job then requeues itself and resumes from it
# (resume=auto is always passed).
#
# NCCL settings people commonly need (export them before sbatch, or add them below):
#   NCCL_SOCKET_IFNAME=ib0|eth0   the interface for bootstrap traffic when nodes have several
#   NCCL_IB_DISABLE=1             clusters without InfiniBand, or to rule it out while debugging
#   NCCL_DEBUG=INFO               print the topology and the transport NCCL picked
#   NCCL_ASYNC_ERROR_HANDLING=1   (TORCH_NCCL_ASYNC_ERROR_HANDLING on newer torch) fail instead of hang
#SBATCH --job-name=dist_finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -uo pipefail

CONFIG=${1:-configs/gpt2_small_spam.yaml}
shift $(( $# > 0 ? 1 : 0 ))

gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}                         # "gpu:8" -> "8"
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
tasks_per_node=${tasks_per_node%%(*}     # "2(x3)" -> "2"

export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}   # two jobs on a node never collide
cpu_ranks=${DIST_FINETUNE_CPU_RANKS:-2}
if [[ -z ${OMP_NUM_THREADS:-} ]]; then   # threads per rank: 1 beside a GPU; on CPU nodes, the task's share
  ranks_per_task=1
  (( gpus == 0 && tasks_per_node == 1 )) && ranks_per_task=$cpu_ranks
  threads=$(( gpus > 0 ? 1 : ${SLURM_CPUS_PER_TASK:-1} / ranks_per_task ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

preempted=0
forward_signal() {
  if [[ $preempted == 0 ]]; then
    preempted=1
    echo "[finetune.sh] $(date -Is) preemption signal: telling the ranks to checkpoint and exit"
    scancel --signal=USR1 "$SLURM_JOB_ID"
  fi
}
trap forward_signal USR1 TERM

echo "[finetune.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: nodes=$SLURM_JOB_NUM_NODES" \
     "gpus/node=$gpus tasks/node=$tasks_per_node threads/rank=$OMP_NUM_THREADS" \
     "master=$MASTER_ADDR:$MASTER_PORT config=$CONFIG"

train_args=(-m dist_finetune.train --config "$CONFIG" resume=auto "$@")
if (( tasks_per_node > 1 )); then
  # One task per GPU (or per CPU rank): python directly, rank from SLURM_PROCID.
  srun --kill-on-bad-exit=1 python "${train_args[@]}" &
else
  nproc=$gpus
  (( nproc > 0 )) || nproc=$cpu_ranks
  local_addr=()   # a loopback master (one-node tests) keeps every rank on loopback too
  [[ $MASTER_ADDR == 127.* || $MASTER_ADDR == localhost ]] && local_addr=(--local_addr=127.0.0.1)
  # The torchrun agent ignores USR1 (it would die of it); its workers handle it.
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'trap "" USR1; exec "$@"' torchrun \
    python -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$nproc" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    "${local_addr[@]}" "${train_args[@]}" &
fi
step=$!
status=0
while kill -0 "$step" 2>/dev/null; do
  wait "$step"; status=$?      # a trapped signal interrupts wait: wait again
done

if [[ $preempted == 1 ]]; then
  echo "[finetune.sh] $(date -Is) ranks stopped (status $status); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $status
