#!/usr/bin/env bash
# Create .venv and install mmlit with its test dependencies; install espeak-ng (for `--spoken` data) where it can.
# PyTorch: this pins the release that the project is tested with; set TORCH_SPEC to choose another
# (e.g. TORCH_SPEC="torch torchvision" for the newest, or a CPU-only index on a laptop).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, lightning, timm, webdataset, wandb; print(f'torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}, webdataset {webdataset.__version__}, wandb {wandb.__version__}')"
# espeak-ng: the speech of `mmlit data sort-of-clevr --spoken`, which the tests generate too. Installed where this can
# (root with apt-get, as on the Debian CI machine); elsewhere a note (training on other data works without it).
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends espeak-ng >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y --no-install-recommends espeak-ng >/dev/null; } \
      || echo "note: could not install espeak-ng; \`mmlit data sort-of-clevr --spoken\` needs it" >&2
  else
    echo "note: espeak-ng is not installed; \`mmlit data sort-of-clevr --spoken\` needs it (apt-get install espeak-ng)" >&2
  fi
fi
