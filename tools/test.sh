#!/usr/bin/env bash
# Set up and run the whole test suite on the CPU (W&B offline; DDP tests use 2 gloo processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=offline
.venv/bin/python -m pytest -ra "$@"
