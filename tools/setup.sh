#!/usr/bin/env bash
# Create .venv and install mmlit with its test dependencies.
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
