#!/usr/bin/env bash
# One prepared GPU check (about 4 minutes on one H100): float64 parity of the optimizers on
# the device against the CPU, step time and memory of SGD / EKFAC / DGNOpt-FNE / DGNOpt-GR (and
# of DGNOpt with other per-sample chunk budgets), the most expensive CUDA kernels of a DGNOpt
# ResNet-18 step, the cost floor of DGNOpt's passes (dgn-bench floor), a bf16 DGNOpt training
# run, and NCCL initialisation under torchrun.
#
#   OUT=/some/dir bash launch/gpu_check.sh
#   OUT=/tmp/x DEVICE=cpu MODELS=digits_resnet STEPS=20 bash launch/gpu_check.sh  # plumbing only
#
# Uses the machine's own python3 with PyTorch (no install: the package is imported from the
# checkout through PYTHONPATH). Each section has its own time limit and a failing section
# does not stop the next; the exit status is that of the first failure. Writes into $OUT:
#   env.txt          GPU, driver, torch version
#   parity.txt       dgn-bench parity: device vs CPU parameters after 3 float64 steps
#   bench_gpu.txt    dgn-bench on the device: ms/step and peak MiB per optimizer
#   bench_gpu.json   the same, raw
#   profile.txt      torch.profiler: the most expensive kernels of a DGNOpt ResNet-18 step
#   floor.json       dgn-bench floor: forward/backward pass times, EKFAC and DGNOpt steps, the
#                    floor B + 3F of DGNOpt's extra passes against the 1.2x budget
#   train_bf16.json  summary.json of a DGNOpt run on DIGITS under bf16 autocast
#   train_nccl.json  summary.json of the same run under torchrun (NCCL process group)
#   log.txt          everything the commands printed
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-digits_resnet,mnist_resnet,resnet18}
PROFILE_MODEL=${PROFILE_MODEL:-resnet18}
STEPS=${STEPS:-300}
work=$(mktemp -d)
log="$OUT/log.txt"
status=0

section() {  # section NAME LIMIT_S COMMAND...: run with a time limit, log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

{
  nvidia-smi -L || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1

section "parity on $DEVICE (float64)" 90 bash -c "
  '$PY' -m dgn_dist.bench parity --device '$DEVICE' --model digits_resnet; a=\$?
  '$PY' -m dgn_dist.bench parity --device '$DEVICE' --model mnist_resnet \
      --optimizers ekfac,dgnopt,dgnopt-gr --steps 2; exit \$((a | \$?))"
grep -v '^==' "$log" | grep -A20 '^parity' > "$OUT/parity.txt" || true

section "optimizers on $DEVICE" 200 "$PY" -m dgn_dist.bench --device "$DEVICE" \
    --models "$MODELS" --optimizers sgd,ekfac,dgnopt,dgnopt-gr --batch-size 128 --steps 10 \
    --warmup 3 --json "$OUT/bench_gpu.json"
sed -n '/^dgn-bench on/,$p' "$log" > "$OUT/bench_gpu.txt"

# DGNOpt with the CPU's per-sample chunk budget and a larger one (curvature.chunk_mb; auto = 256
# MiB on a GPU): fewer kernel launches against more memory.
for mb in 64 1024; do
  section "DGNOpt with chunk_mb=$mb on $DEVICE" 90 "$PY" -m dgn_dist.bench --device "$DEVICE" \
      --models "$MODELS" --optimizers dgnopt,dgnopt-gr --batch-size 128 --steps 10 --warmup 3 \
      --chunk-mb "$mb"
done

section "profile of DGNOpt on $PROFILE_MODEL" 75 bash -c "
  '$PY' -m dgn_dist.bench --device '$DEVICE' --models '$PROFILE_MODEL' --optimizers dgnopt \
      --batch-size 128 --steps 1 --warmup 2 --profile 25 > '$OUT/profile.txt' 2>&1"

# The cost floor of the passes Alg. 1 adds to EKFAC (B + 3F) against the 1.2x budget.
section "floor of DGNOpt's passes on $PROFILE_MODEL" 90 "$PY" -m dgn_dist.bench floor \
    --device "$DEVICE" --models "$PROFILE_MODEL" --batch-size 128 --repeats 5 --steps 5 \
    --warmup 2 --json "$OUT/floor.json"

section "DGNOpt on DIGITS, $DEVICE, bf16 autocast" 75 "$PY" -m dgn_dist.train \
    --config configs/digits_dgnopt.toml run.device="$DEVICE" run.max_steps="$STEPS" \
    parallel.precision=bf16 run.quiet=true run.dir="$work/bf16"
cp "$work/bf16/summary.json" "$OUT/train_bf16.json" || status=${status/#0/1}

section "the same under torchrun (NCCL, one process)" 75 "$PY" -m torch.distributed.run \
    --nproc_per_node 1 -m dgn_dist.train --config configs/digits_dgnopt.toml \
    run.device="$DEVICE" run.max_steps="$STEPS" run.quiet=true run.dir="$work/nccl"
cp "$work/nccl/summary.json" "$OUT/train_nccl.json" || status=${status/#0/1}
echo "done: $OUT (exit $status)" | tee -a "$log"
exit "$status"
