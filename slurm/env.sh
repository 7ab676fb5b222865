# shellcheck shell=bash
# Settings shared by the slurm/*.sbatch scripts (sourced, not run). Every setting is an
# environment variable with a default; export it before `sbatch` (sbatch passes the
# submitting environment on) or prefix the command: `CONFIG=configs/x.toml sbatch ...`.
#
#   REPO            repository root              default: $SLURM_SUBMIT_DIR (submit from the root)
#   VENV            virtualenv to run from       default: $REPO/.venv ("" = python on PATH)
#   CONFIG          training config (TOML)       default: configs/digits_dgnopt.toml
#   DEVICE          auto | cpu | cuda            default: auto (cpu sets ACCELERATE_USE_CPU=true,
#                                                DS_ACCELERATOR=cpu and run.device=cpu)
#   NPROC_PER_NODE  training processes per node  default: GPUs on the node, 1 without GPUs
#   MASTER_PORT     rendezvous port on the head  default: 29500
#   RUN_DIR         run directory (run.dir)      default: runs/<job name>-<job id>
#   OMP_NUM_THREADS threads per process          default: CPUs of the task / NPROC_PER_NODE
#   GLIBC_TUNABLES  glibc malloc settings        default: adds glibc.malloc.tcache_count=0
#                                                (run.cpu_allocator=retain, dgn_dist/allocator.py)
#   MIXED_PRECISION accelerate: no | bf16 | fp16 default: no
#   DS_CONFIG       deepspeed: JSON for parallel.deepspeed_config   default: none
#   DRY_RUN         1 = print the launch command instead of running it
# Script arguments are config overrides (`section.key=value`) appended after these defaults.

die() {
  echo "[slurm] error: $*" >&2
  exit 2
}

log() {
  echo "[slurm] $*"
}

# Run (or with DRY_RUN=1 print) a command, echoing it first.
run() {
  log "+ $*"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    return 0
  fi
  "$@"
}

VENV="${VENV-$REPO/.venv}"
CONFIG="${CONFIG:-configs/digits_dgnopt.toml}"
DEVICE="${DEVICE:-auto}"
MASTER_PORT="${MASTER_PORT:-29500}"
MIXED_PRECISION="${MIXED_PRECISION:-no}"
DS_CONFIG="${DS_CONFIG:-}"

cd "$REPO" || die "REPO=$REPO is not a directory; submit from the repository root or set REPO"
[ -f "$REPO/dgn_dist/train.py" ] ||
  die "REPO=$REPO is not the dgn_dist repository; submit from its root or set REPO=/path"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist (relative paths start at $REPO)"

if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/python" ] ||
    die "VENV=$VENV has no bin/python; run ./bootstrap.sh, set VENV=/path/to/venv, or VENV=''"
  export VIRTUAL_ENV="$VENV"
  export PATH="$VENV/bin:$PATH"
fi

DEVICE_OVERRIDES=()
case "$DEVICE" in
  cpu)
    export ACCELERATE_USE_CPU=true DS_ACCELERATOR=cpu
    DEVICE_OVERRIDES=(run.device=cpu)
    ;;
  cuda) DEVICE_OVERRIDES=(run.device=cuda) ;;
  auto) ;;
  *) die "DEVICE must be auto, cpu or cuda, got '$DEVICE'" ;;
esac

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=1
  if [ "$DEVICE" != cpu ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
      if [ "${gpus:-0}" -gt 0 ]; then NPROC_PER_NODE="$gpus"; fi
    fi
  fi
fi
case "$NPROC_PER_NODE" in
  '' | *[!0-9]* | 0) die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'" ;;
esac

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else  # outside SLURM (a local try of the script): this machine only
  NODES=("$(hostname -s)")
fi
HEAD_NODE="${NODES[0]}"
NNODES="${SLURM_NNODES:-${#NODES[@]}}"

# srun (Slurm >= 22.05) no longer inherits the job's --cpus-per-task: pass it on explicitly,
# or each node's launcher and all its processes would share one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
threads=$((cpus / NPROC_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
# With run.cpu_allocator=retain (the default) freed memory is reused; glibc's per-thread cache
# would otherwise keep large freed blocks from merging (dgn_dist/allocator.py).
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.tcache_count=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.tcache_count=0" ;;
esac

RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-dgn-train}-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}"
export HEAD_NODE NNODES NPROC_PER_NODE MASTER_PORT MIXED_PRECISION RUN_DIR

# TRAIN_ARGS: dgn-train's arguments, the script's own arguments last (later overrides win).
set_train_args() {
  TRAIN_ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR" "${DEVICE_OVERRIDES[@]}")
  if [ -n "$DS_CONFIG" ]; then TRAIN_ARGS+=("parallel.deepspeed_config=$DS_CONFIG"); fi
  TRAIN_ARGS+=("$@")
}

log "job ${SLURM_JOB_ID:-local} on ${NNODES} node(s) [${NODES[*]}], head $HEAD_NODE," \
    "$NPROC_PER_NODE process(es) per node, DEVICE=$DEVICE, OMP_NUM_THREADS=$OMP_NUM_THREADS," \
    "GLIBC_TUNABLES=$GLIBC_TUNABLES"
log "config $CONFIG, run dir $RUN_DIR, python $(command -v python)"
start_s=$SECONDS
report_exit() {
  log "exit status $1 after $((SECONDS - start_s)) s"
}
trap 'report_exit $?' EXIT
