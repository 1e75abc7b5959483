"""Compare the multi-task objectives on the quickstart recipe: per-task validation metrics, the multi-task delta
against single-task baselines, and each method's time per training step against static weighting.

    python tools/objectives_report.py                 # every registered objective, 5 epochs (the recipe's length)
    python tools/objectives_report.py --epochs 2 --methods static pcgrad famo
    python tools/objectives_report.py --keep          # finish a report that stopped: only the runs it lacks

Each method trains the whole recipe (``--model.objective <name>``); each task also trains alone with static weights
(the single-task baseline), for the same number of steps. Delta-m is the mean over tasks of the relative change of
the task's metric against its baseline, in percent (Maninis et al. 2019; all metrics here are higher-is-better).
The step time is measured apart from the fits, on the same cached batches for every method (data loading does not
enter it), each method in a fresh process, with static weighting timed first and last: the overhead column is
against the mean of those two, and their difference shows the noise.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The metric of each quickstart task that Delta-m compares (higher is better for all of them).
METRICS = {"vqa": "acc", "contrastive": "r@1_i2t", "captioning": "token_acc", "image_classification": "acc",
           "text_classification": "acc"}


def _recipe(base: dict, root: Path, objective: str | None, tasks: list[str] | None, epochs: int) -> dict:
    recipe = copy.deepcopy(base)
    trainer = recipe["trainer"]
    trainer.update(max_epochs=epochs, default_root_dir=str(root), enable_progress_bar=False,
                   logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "csv"}}])
    steps = epochs * recipe["data"]["steps_per_epoch"]
    scheduler = recipe["model"].get("scheduler", {}).get("init_args", {})
    if "total_steps" in scheduler:
        scheduler["total_steps"] = steps
    if tasks is not None:
        recipe["model"]["tasks"] = {name: recipe["model"]["tasks"][name] for name in tasks}
        recipe["model"]["objective"] = None
    else:
        recipe["model"]["objective"] = objective
    return recipe


def _final_metrics(root: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(next((root / "csv").glob("version_*/metrics.csv")))))
    last = {}
    for row in rows:
        last.update({k: float(v) for k, v in row.items() if v and k.startswith("val/")})
    return last


def _fit(recipe: dict, root: Path) -> dict[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmlit.cli", "fit", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="offline"))
    if result.returncode != 0:
        raise RuntimeError(f"{root.name} failed:\n{result.stderr[-3000:]}")
    print(f"  {root.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return _final_metrics(root)


def step_time(recipe_path: Path, method: str, steps: int, warmup: int = 3) -> float:
    """Seconds per training step of ``method`` on cached batches (data loading excluded), in this process."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from mmlit.cli import MMLitCLI

    class Timer(pl.Callback):
        def __init__(self):
            self.total, self.started = 0.0, 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if batch_idx >= warmup:
                self.total += time.perf_counter() - self.started

    cli = MMLitCLI(args=["--config", str(recipe_path), "--model.objective", method], run=False)
    cli.datamodule.setup("fit")
    batches = list(itertools.islice(iter(cli.datamodule.train_dataloader()), 8))
    cycle = [batches[i % len(batches)] for i in range(warmup + steps)]
    timer = Timer()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=warmup + steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], log_every_n_steps=cli.trainer.log_every_n_steps,
                         precision=cli.trainer.precision, default_root_dir=str(REPO / "runs" / "objectives_timing"))
    trainer.fit(cli.model, DataLoader(cycle, batch_size=None, collate_fn=lambda b: b))
    return timer.total / steps


def step_times(recipe_path: Path, methods: list[str], steps: int) -> dict[str, float]:
    """Each method timed in a fresh process; static first and last (``static`` is their mean, ``static_drift``
    their relative difference)."""
    times, statics = {}, []
    for method in ["static", *[m for m in methods if m != "static"], "static"]:
        result = subprocess.run([sys.executable, __file__, "--time-one", method, "--recipe", str(recipe_path),
                                 "--timing-steps", str(steps)], cwd=REPO, capture_output=True, text=True,
                                env=dict(os.environ, WANDB_MODE="offline"))
        if result.returncode != 0:
            raise RuntimeError(f"timing {method} failed:\n{result.stderr[-3000:]}")
        seconds = float(result.stdout.strip().splitlines()[-1])
        print(f"  {method}: {seconds * 1000:.0f} ms per step", flush=True)
        if method == "static":
            statics.append(seconds)
        else:
            times[method] = seconds
    times["static"] = sum(statics) / len(statics)
    times["static_drift"] = abs(statics[0] - statics[1]) / times["static"]
    return times


def main(argv: list[str] | None = None) -> int:
    from mmlit.registry import list_objectives

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--methods", nargs="+", default=None, help="registered objective names (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's)")
    parser.add_argument("--timing-steps", type=int, default=20, help="timed steps per method (0: no timing)")
    parser.add_argument("--skip-fits", action="store_true", help="only time the steps")
    parser.add_argument("--keep", action="store_true",
                        help="fit only the runs that --out's results.json lacks (to finish a report that stopped)")
    parser.add_argument("--out", default=str(REPO / "runs" / "objectives"))
    parser.add_argument("--time-one", default=None, help=argparse.SUPPRESS)  # a child of step_times
    args = parser.parse_args(argv)
    if args.time_one:
        print(step_time(Path(args.recipe), args.time_one, args.timing_steps))
        return 0
    methods = args.methods or list_objectives()
    base = yaml.safe_load(Path(args.recipe).read_text())
    epochs = args.epochs or base["trainer"]["max_epochs"]
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    tasks = list(base["model"]["tasks"])
    if not args.skip_fits:
        print(f"single-task baselines and {len(methods)} methods, {epochs} epochs each:", flush=True)
        runs = [(f"alone:{task}", f"alone_{task}", None, [task]) for task in tasks]
        runs += [(method, method, method, None) for method in methods]
        for name, folder, objective, only in runs:
            if args.keep and name in results:
                continue
            if (out / folder).exists():  # a fit that stopped: its logs would mix with the new run's
                shutil.rmtree(out / folder)
            results[name] = _fit(_recipe(base, out / folder, objective, only, epochs), out / folder)
            results_path.write_text(json.dumps(results, indent=1))
    times = {}
    if args.timing_steps:
        print(f"time per step ({args.timing_steps} steps each, cached batches):", flush=True)
        times = step_times(Path(args.recipe), methods, args.timing_steps)
        results["step_seconds"] = times
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    print(_table(results, methods, tasks, times or results.get("step_seconds", {})))
    if "static_drift" in (times or {}):
        print(f"static timed first and last differed by {100 * times['static_drift']:.0f}% (timing noise)")
    return 0


def _table(results: dict, methods: list[str], tasks: list[str], times: dict[str, float]) -> str:
    def metric(run: str, task: str) -> float | None:
        return results.get(run, {}).get(f"val/{task}/{METRICS.get(task, 'acc')}")

    header = "| method | " + " | ".join(f"{t} {METRICS.get(t, 'acc')}" for t in tasks) + " | Delta-m | ms/step | overhead |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    baseline = {t: metric(f"alone:{t}", t) for t in tasks}
    lines.append("| single-task | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in baseline.values())
                 + " | 0 | | |")
    for method in methods:
        values = {t: metric(method, t) for t in tasks}
        deltas = [(values[t] - baseline[t]) / baseline[t] for t in tasks
                  if values[t] is not None and baseline[t]]
        delta = f"{100 * sum(deltas) / len(deltas):+.1f}%" if len(deltas) == len(tasks) else "-"
        ms = f"{1000 * times[method]:.0f}" if method in times else "-"
        overhead = f"{100 * (times[method] / times['static'] - 1):+.0f}%" if method in times and "static" in times else "-"
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in values.values())
                     + f" | {delta} | {ms} | {overhead} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
