#!/usr/bin/env bash
# The main job on a fresh machine: install, make the Sort-of-CLEVR shards and the tokenizer, train
# recipes/quickstart.yaml on the CPU (a progress bar on a terminal, a line per epoch otherwise), test it, and draw
# its curves; it says where the logs, the checkpoint, the W&B run and the pictures are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source .venv/bin/activate
DATA=data/sort_of_clevr
if [ ! -f "$DATA/tokenizer.json" ]; then
  mmlit data sort-of-clevr --out "$DATA" --preset quickstart
  mmlit data tokenizer --shards "$DATA/train-{000000..000007}.tar" --out "$DATA/tokenizer.json"
fi
mmlit fit --config recipes/quickstart.yaml "$@"
mmlit test --config recipes/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt --trainer.logger false
mmlit plot runs/quickstart
echo "curves of the run: runs/quickstart/plots/*.png (losses, metrics, objective weights, gradient cosines)"
