"""``mmlit plot RUN_DIR``: PNG curves of a run from its CSV log, for a look at a run without W&B.

Reads every ``metrics.csv`` under the run folder (Lightning's ``CSVLogger``; a resumed run adds a ``version_N``, and a
later version's value of a step wins) and draws, into ``RUN_DIR/plots/``:

* ``losses.png``: each task's training loss (raw and a moving average) and validation loss, against the step;
* ``metrics.png``: each task's validation metrics;
* ``objective.png``: the objective's weight per task, and the total loss;
* ``gradients.png``: the cosines between the tasks' gradients, and each task's gradient norm;
* ``throughput.png``: examples per second.

A figure whose values the run did not log is not drawn.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["figure", "main", "plot_run", "read_metrics"]

Series = dict[str, list[tuple[int, float]]]  # key -> [(step, value)] sorted by step


def read_metrics(run_dir: str | Path) -> Series:
    """Every logged value of the run's CSV logs, by key, in step order (a later log's value of a step wins)."""
    files = sorted((p for p in Path(run_dir).rglob("metrics.csv") if "wandb" not in p.parts),
                   key=lambda p: (p.parent.parent, _version(p.parent.name)))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv below it (a run logs one with "
                                f"lightning.pytorch.loggers.CSVLogger in trainer.logger)")
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    if math.isfinite(number):
                        values[key][int(float(step))] = number
    return {key: sorted(points.items()) for key, points in values.items()}


def _version(name: str) -> int:
    return int(name.split("_")[-1]) if name.startswith("version_") and name.split("_")[-1].isdigit() else -1


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def figure(panels: dict[str, dict[str, list[tuple[float, float]]]], title: str, path: Path, smooth: bool = False,
           xlabel: str = "step") -> bool:
    """One subplot per panel, one line per series of (x, value) points; False (nothing written) when there is nothing
    to draw."""
    panels = {name: lines for name, lines in panels.items() if lines}
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, sorted(panels.items())):
        for label, points in sorted(lines.items()):
            steps, values = zip(*points)
            if smooth and label.startswith("train") and len(values) > 20:
                ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(list(values), max(len(values) // 25, 5)), label=f"{label} (mean)",
                        color=ax.lines[-1].get_color())
            else:
                ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the run's figures into ``out`` (default ``RUN_DIR/plots``); returns the files written."""
    series = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "plots"
    losses, metrics, objective, gradients = defaultdict(dict), defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for key, points in series.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in ("train", "val", "test") and parts[2] == "loss":
            losses[parts[1]][f"{parts[0]} loss"] = points
        elif len(parts) >= 3 and parts[0] in ("val", "test") and parts[1] not in ("perf",):
            metrics[parts[1]]["/".join([parts[0], *parts[2:]])] = points
        elif key.startswith("train/objective/weight/"):
            objective["weight per task"][parts[-1]] = points
        elif key == "train/loss":
            objective["objective's total loss"]["train/loss"] = points
        elif key.startswith("train/objective/cosine/"):
            gradients["gradient cosine between tasks"][parts[-1]] = points
        elif key.startswith("train/objective/grad_norm/"):
            gradients["gradient norm on the backbone"][parts[-1]] = points
    name = Path(run_dir).resolve().name
    figures = {
        "losses.png": (losses, f"{name}: losses", True),
        "metrics.png": (metrics, f"{name}: evaluation metrics", False),
        "objective.png": (objective, f"{name}: multi-task objective", True),
        "gradients.png": (gradients, f"{name}: task gradients", False),
        "throughput.png": ({"examples per second": {k: v for k, v in series.items() if k.startswith("train/")
                                                     and k.endswith("samples_per_sec")}},
                           f"{name}: throughput", False),
    }
    return [out / file for file, (panels, title, smooth) in figures.items()
            if figure(panels, title, out / file, smooth)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmlit plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run folder (trainer.default_root_dir), e.g. runs/quickstart")
    parser.add_argument("--out", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"mmlit plot: error: {err}")
        return 2
    print("\n".join(f"wrote {path}" for path in written) or "nothing to plot: the CSV log holds no values yet")
    return 0
