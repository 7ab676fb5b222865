#!/usr/bin/env bash
# Create (when missing) and fill the project's virtual environment at .venv.
# Idempotent: a complete .venv is left as it is. Used by both README commands and CI.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.dgn_dist-installed"
# torch/torchvision pins: on this machine kind these lie on local disk (no multi-GB download).
TORCH_SPEC="${DGN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q)

echo "[bootstrap] installing torch ($TORCH_SPEC)"
# shellcheck disable=SC2086
"${PIP[@]}" install $TORCH_SPEC
"${PIP[@]}" install setuptools wheel
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  echo "[bootstrap] installing deepspeed (no ops prebuilt; its sdist imports torch at build time)"
  DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed>=0.16"
fi
echo "[bootstrap] installing dgn_dist with the dev extra"
"${PIP[@]}" install -e ".[dev]"
touch "$STAMP"
echo "[bootstrap] ready: $VENV"
