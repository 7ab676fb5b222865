#!/usr/bin/env bash
# One prepared GPU check (about 5 minutes on one H100): the CUDA paths of the optimizers,
# a bf16 DGNOpt training run, and NCCL initialisation under torchrun, with the timings.
#
#   OUT=/some/dir bash launch/gpu_check.sh
#   OUT=/tmp/x DEVICE=cpu MODELS=digits_resnet STEPS=20 bash launch/gpu_check.sh  # plumbing only
#
# Uses the machine's own python3 with PyTorch (no install: the package is imported from the
# checkout through PYTHONPATH). Writes at most 6 files into $OUT:
#   env.txt          GPU, driver, torch version
#   bench_gpu.txt    dgn-bench on cuda: ms/step and peak MiB of SGD / EKFAC / DGNOpt-FNE
#   bench_gpu.json   the same, raw
#   train_bf16.json  summary.json of a DGNOpt run on DIGITS under bf16 autocast
#   train_nccl.json  summary.json of the same run under torchrun (NCCL process group)
#   log.txt          everything the commands printed
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-digits_resnet,mnist_resnet,resnet18}
STEPS=${STEPS:-300}
work=$(mktemp -d)
log="$OUT/log.txt"

{
  nvidia-smi -L || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1

echo "== optimizers on cuda" | tee -a "$log"
"$PY" -m dgn_dist.bench --device "$DEVICE" --models "$MODELS" \
    --optimizers sgd,ekfac,dgnopt --batch-size 128 --steps 10 --warmup 3 \
    --json "$OUT/bench_gpu.json" 2>&1 | tee -a "$log" | tee "$OUT/bench_gpu.txt"

echo "== DGNOpt on DIGITS, cuda, bf16 autocast" | tee -a "$log"
"$PY" -m dgn_dist.train --config configs/digits_dgnopt.toml run.device="$DEVICE" \
    run.max_steps="$STEPS" parallel.precision=bf16 run.quiet=true run.dir="$work/bf16" \
    2>&1 | tee -a "$log"
cp "$work/bf16/summary.json" "$OUT/train_bf16.json"

echo "== the same under torchrun (NCCL, one process)" | tee -a "$log"
"$PY" -m torch.distributed.run --nproc_per_node 1 -m dgn_dist.train \
    --config configs/digits_dgnopt.toml run.device="$DEVICE" run.max_steps="$STEPS" run.quiet=true \
    run.dir="$work/nccl" 2>&1 | tee -a "$log"
cp "$work/nccl/summary.json" "$OUT/train_nccl.json"
echo "done: $OUT" | tee -a "$log"
