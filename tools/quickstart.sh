#!/usr/bin/env bash
# The main job on a fresh machine: install, make the Sort-of-CLEVR shards and the tokenizer, train
# recipes/quickstart.yaml on the CPU, and say where the logs, the checkpoint and the W&B run are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source .venv/bin/activate
DATA=data/sort_of_clevr
if [ ! -f "$DATA/tokenizer.json" ]; then
  mmlit data sort-of-clevr --out "$DATA" --preset quickstart
  mmlit data tokenizer --shards "$DATA/train-{000000..000007}.tar" --out "$DATA/tokenizer.json"
fi
mmlit fit --config recipes/quickstart.yaml --trainer.enable_progress_bar false "$@"
mmlit test --config recipes/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt \
  --trainer.enable_progress_bar false --trainer.logger false
