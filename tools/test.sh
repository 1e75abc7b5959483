#!/usr/bin/env bash
# Set up and run the whole test suite on the CPU (W&B offline; DDP tests use 2 gloo processes).
# Two pytest workers (pytest-xdist), a file's tests on one worker (they share its cached runs); `-n 0` runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export WANDB_MODE=offline
# One intra-op thread per process unless the caller says otherwise: the two pytest workers, and the ranks and data
# workers their tests start, share the cores, and torch's default (a thread per core in every process) oversubscribes
# them. Measured on 2 cores under load: tests/tasks/test_tasks.py took 116-123 s with the default, 47-50 s with 1.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -ra -n 2 --dist loadfile "$@"
