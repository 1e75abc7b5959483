#!/usr/bin/env bash
# Set up and run the whole test suite on the CPU (W&B offline; DDP tests use 2 gloo processes).
# Two pytest workers (pytest-xdist), a file's tests on one worker (they share its cached runs); `-n 0` runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=offline
.venv/bin/python -m pytest -ra -n 2 --dist loadfile "$@"
