#!/usr/bin/env bash
# One node's launcher, started once per node by `srun` from slurm/accelerate.sbatch and
# slurm/deepspeed.sbatch (not submitted by itself):
#   node_launch.sh accelerate|deepspeed DGN_TRAIN_ARGS...
# Reads what the batch script exported (HEAD_NODE, NNODES, NPROC_PER_NODE, MASTER_PORT,
# MIXED_PRECISION, DS_HOSTFILE; optional ACCELERATE_CONFIG) and this task's SLURM_NODEID.
set -euo pipefail

die() {
  echo "[slurm] error: $*" >&2
  exit 2
}

[ "$#" -ge 1 ] || die "usage: $0 accelerate|deepspeed DGN_TRAIN_ARGS..."
launcher="$1"
shift
for var in HEAD_NODE NNODES NPROC_PER_NODE MASTER_PORT; do
  [ -n "${!var:-}" ] || die "$var is not set; start this through slurm/accelerate.sbatch or slurm/deepspeed.sbatch"
done
node_rank="${SLURM_NODEID:-0}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$launcher" in
  accelerate)
    cmd=(accelerate launch)
    if [ -n "${ACCELERATE_CONFIG:-}" ]; then cmd+=(--config_file "$ACCELERATE_CONFIG"); fi
    cmd+=(--multi_gpu --num_machines "$NNODES" --machine_rank "$node_rank"
      --num_processes "$((NNODES * NPROC_PER_NODE))"
      --main_process_ip "$HEAD_NODE" --main_process_port "$MASTER_PORT"
      --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no
      -m dgn_dist.train "$@")
    ;;
  deepspeed)
    [ -f "${DS_HOSTFILE:-}" ] || die "DS_HOSTFILE='${DS_HOSTFILE:-}' is not a file"
    cmd=(deepspeed --hostfile "$DS_HOSTFILE" --no_ssh --node_rank "$node_rank"
      --master_addr "$HEAD_NODE" --master_port "$MASTER_PORT"
      "$repo/launch/train.py" "$@")
    ;;
  *) die "unknown launcher '$launcher'; use accelerate or deepspeed" ;;
esac

echo "[slurm] node $node_rank ($(hostname -s)): ${cmd[*]}"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${cmd[@]}"
