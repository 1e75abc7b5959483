"""Train the architecture recipes on the quickstart data and print their final validation metrics.

    python tools/recipes_report.py                          # every run below, in order
    python tools/recipes_report.py --runs vqa_relation_network vqa_transformer --epochs 5

Each run is ``mmlit fit`` on a recipe as shipped (the Sort-of-CLEVR shards of ``tools/quickstart.sh``), with CSV
logging into ``runs/report/<run>``; the table has the last validation value of every metric and the wall time of
the fit. ``clip_to_vqa`` starts from the ``clip`` run's checkpoint, so ``clip`` runs first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from objectives_report import _final_metrics  # tools/ is on sys.path when a tool runs as a script

REPO = Path(__file__).resolve().parents[1]
_FUSION = "--model.backbone.init_args.fusion"
# run name -> (recipe, extra command-line arguments)
RUNS = {
    "clip": ("clip", []),
    "clip_to_vqa": ("clip_to_vqa", ["--model.pretrained", "runs/report/clip/checkpoints/last.ckpt"]),
    "vqa_relation_network": ("vqa_relation_network", []),
    "vqa_lstm_cnn": ("vqa_lstm_cnn", []),
    "vqa_transformer": ("vqa_transformer", []),
    "vqa_bert_vit": ("vqa_bert_vit", []),
    "captioning": ("captioning", []),
    "prefix_lm": ("prefix_lm", []),
    "vqa_transformer_early": ("vqa_transformer", [_FUSION, json.dumps(
        {"class_path": "mmlit.models.EarlyFusion", "init_args": {"dim": 128, "depth": 2, "heads": 4}})]),
    "vqa_transformer_hybrid": ("vqa_transformer", [_FUSION, json.dumps(
        {"class_path": "mmlit.models.HybridFusion", "init_args": {"fusions": [
            {"class_path": "mmlit.models.CrossAttentionFusion", "init_args": {"dim": 128, "depth": 2, "heads": 4}},
            {"class_path": "mmlit.models.LateFusion", "init_args": {"dim": 128, "mode": "gated"}}]}})]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, help="train this many epochs of 50 steps instead of the recipe's")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        recipe, extra = RUNS[name]
        root = REPO / "runs" / "report" / name
        command = [sys.executable, "-m", "mmlit.cli", "fit", "--config", f"recipes/{recipe}.yaml", *extra,
                   "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                   "init_args": {"save_dir": str(root), "name": "csv"}})]
        if args.epochs:
            command += ["--trainer.max_epochs", str(args.epochs), "--model.scheduler.init_args.total_steps",
                        str(50 * args.epochs)]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True)
        seconds = time.perf_counter() - start
        metrics = {k: v for k, v in _final_metrics(root).items() if not k.endswith("/loss")}
        rows.append((name, seconds, metrics))
        print(f"| {name} | {seconds:.0f} s | " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(metrics.items())) + " |",
              flush=True)
    print("\n| run | fit time | final validation metrics |\n|---|---|---|")
    for name, seconds, metrics in rows:
        print(f"| {name} | {seconds:.0f} s | " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(metrics.items())) + " |")


if __name__ == "__main__":
    main()
