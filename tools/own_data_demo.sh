#!/usr/bin/env bash
# A user's own data end to end, on the synthetic Shapes files (no download): an image folder and COCO captions are
# written in their original layouts, converted to shards with `mmlit data convert`, a tokenizer is trained on their
# text, recipes/image_folder.yaml and recipes/coco_captions.yaml train on them (the second also classifies the
# folder's classes zero-shot), `mmlit predict` writes their predictions and `mmlit plot` their curves.
#   bash tools/own_data_demo.sh                 # after tools/setup.sh; any argument goes to both fits
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
D=data/shapes
mmlit data shapes --out $D/raw/folder --layout folder --images 300
mmlit data convert folder --images $D/raw/folder --out $D/folder --val-fraction 0.2 --overwrite
for split in train val; do
  n=$([ $split = train ] && echo 2000 || echo 250)
  mmlit data shapes --out $D/raw/coco --layout coco --images $n --split $split
  mmlit data convert coco --annotations $D/raw/coco/captions_$split.json --images $D/raw/coco/$split --out $D/coco \
    --split $split --overwrite
done
mmlit data tokenizer --shards "$D/coco/train-*.tar" --shards "$D/folder/train-*.tar" --out $D/tokenizer.json
for recipe in image_folder coco_captions; do
  start=$(date +%s)
  mmlit fit --config recipes/$recipe.yaml "$@"
  echo "$recipe: fit took $(( $(date +%s) - start )) s"
  mmlit predict --config recipes/$recipe.yaml --ckpt_path runs/$recipe/checkpoints/last.ckpt --trainer.logger false
  mmlit plot runs/$recipe
done
