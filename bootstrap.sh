#!/usr/bin/env bash
# Create (when missing) and fill the project's virtual environment at .venv.
# Idempotent: a complete .venv is left as it is. Used by both README commands and CI.
#   ./bootstrap.sh          the package and its Python dependencies (README command 1)
#   ./bootstrap.sh --test   also the system pieces the test suite exercises for real
#                           (README command 2 and CI): see install_test_extras below
set -euo pipefail
cd "$(dirname "$0")"

WITH_TEST_EXTRAS=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST_EXTRAS=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

# System packages and tools for the test suite (FFCV's native libraries, a local SLURM, ...).
# Each installer is idempotent and fast when already done.
install_test_extras() {
  # FFCV (tests/test_ffcv.py): Debian's pkg-config, OpenCV and turbojpeg (~840 MB, once; the
  # compiled ffcv needs them at run time too), then the ffcv extra without build isolation.
  # SLURM (tests/test_slurm.py brings up a local cluster): slurm-wlm and munge (~5 s), plus
  # the shellcheck linter for the slurm/ scripts. One apt-get run installs whatever is missing.
  local ffcv_debs=(pkg-config libopencv-dev libturbojpeg0-dev) debs=(slurm-wlm munge shellcheck)
  local have_ffcv=0 apt_log
  if "$VENV/bin/python" -c "import ffcv.loader" >/dev/null 2>&1; then have_ffcv=1; fi
  if [ "$have_ffcv" = 0 ]; then debs+=("${ffcv_debs[@]}"); fi
  if dpkg -s "${debs[@]}" >/dev/null 2>&1; then
    :
  elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] skipping ${debs[*]}: installing them needs root and apt-get" \
         "(tests/test_ffcv.py and tests/test_slurm.py will skip what needs them)"
  else
    echo "[bootstrap] installing ${debs[*]} with apt-get (once)"
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends "${debs[@]}"; } >"$apt_log" 2>&1; then
      tail -n 20 "$apt_log" >&2
      echo "[bootstrap] apt-get failed (log above): the tests that need these will be skipped"
    fi
    rm -f "$apt_log"
  fi
  if [ "$have_ffcv" = 0 ] && dpkg -s "${ffcv_debs[@]}" >/dev/null 2>&1; then
    echo "[bootstrap] installing the ffcv extra"
    "$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q install \
      --no-build-isolation -e ".[ffcv]"
  fi
}

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.dgn_dist-installed"
# torch/torchvision pins: on this machine kind these lie on local disk (no multi-GB download).
TORCH_SPEC="${DGN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  if [ "$WITH_TEST_EXTRAS" = 1 ]; then install_test_extras; fi
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
if [ "$WITH_TEST_EXTRAS" = 1 ]; then install_test_extras; fi
echo "[bootstrap] ready: $VENV"
