"""``mmlit plot RUN_DIR``: PNG curves of a run from its CSV log, for a look at a run without W&B.

Reads every ``metrics.csv`` under the run folder (Lightning's ``CSVLogger``; a resumed run adds a ``version_N``, and a
later version's value of a step wins) and draws, into ``RUN_DIR/plots/``:

* ``losses.png``: each task's training loss (raw and a moving average) and validation loss, against the step;
* ``metrics.png``: each task's validation metrics;
* ``objective.png``: the objective's weight per task, and the total loss;
* ``gradients.png``: a task-by-task matrix: each task's gradient norm on its diagonal, the cosine between two tasks'
  gradients over training below it (red where they conflict), and that cosine's mean over the last quarter of the
  run above it;
* ``throughput.png``: examples per second.

A figure whose values the run did not log is not drawn.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["figure", "gradient_matrix", "main", "plot_run", "read_metrics"]

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
    plt = _pyplot()
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
    _save(fig, path)
    return True


def gradient_matrix(norms: Series, cosines: dict[tuple[str, str], list[tuple[int, float]]], title: str,
                    path: Path) -> bool:
    """The task-by-task picture of the gradient statistics, readable for 2 to 10 tasks: row ``a``, column ``b`` holds
    the cosine between tasks ``a`` and ``b`` over training below the diagonal, its mean over the last quarter of the
    logged steps above it (a number on a red-to-blue cell), and task ``a``'s gradient norm on the diagonal. False
    (nothing written) without values."""
    tasks = sorted(set(norms) | {task for pair in cosines for task in pair})
    if not tasks:
        return False
    plt = _pyplot()
    import matplotlib.ticker

    n = len(tasks)
    cell = 2.2 if n <= 4 else 1.7
    fig, axes = plt.subplots(n, n, figsize=(max(cell * n, 6.5), max(cell * n * 0.8, 3.6) + 0.8), squeeze=False)
    colours = plt.get_cmap("RdBu")
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            ax = axes[i][j]
            ax.tick_params(labelsize=6)
            points = cosines.get((a, b)) or cosines.get((b, a))
            if i == j:
                if norms.get(a):
                    steps, values = zip(*norms[a])
                    ax.plot(steps, values, color="black", linewidth=1)
                    if min(values) > 0 and max(values) > 4 * min(values):
                        ax.set_yscale("log")
                        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_title(f"{a}: gradient norm", fontsize=7)
            elif not points:
                ax.axis("off")
            elif i > j:
                steps, values = zip(*points)
                ax.plot(steps, values, color="black", linewidth=0.8)
                ax.fill_between(steps, values, 0, where=[v < 0 for v in values], color="tab:red", alpha=0.4,
                                interpolate=True)
                ax.axhline(0, color="grey", linewidth=0.6)
                ax.set_ylim(-1.05, 1.05)
            else:
                late = [v for _, v in points[len(points) * 3 // 4:]]
                mean = sum(late) / len(late)
                ax.set_facecolor(colours((mean + 1) / 2))
                ax.text(0.5, 0.5, f"{mean:+.2f}", ha="center", va="center", fontsize=11 if n <= 6 else 8,
                        color="white" if abs(mean) > 0.6 else "black", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(a, fontsize=8)
            if i == n - 1:
                ax.set_xlabel(b if i != j else f"{b}\nstep", fontsize=8)
    fig.suptitle(f"{title}\nbelow the diagonal: cosine of two tasks' gradients by step (red: they conflict)\n"
                 f"above: its mean over the last quarter of the run; on it: each task's gradient norm", fontsize=8)
    _save(fig, path)
    return True


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (its folder made) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the run's figures into ``out`` (default ``RUN_DIR/plots``); returns the files written."""
    series = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "plots"
    losses, metrics, objective = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    norms, cosines = {}, {}
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
        elif key.startswith("train/objective/cosine/") and ":" in parts[-1]:
            a, b = parts[-1].split(":", 1)
            cosines[(a, b)] = points
        elif key.startswith("train/objective/grad_norm/"):
            norms[parts[-1]] = points
    name = Path(run_dir).resolve().name
    figures = {
        "losses.png": (losses, f"{name}: losses", True),
        "metrics.png": (metrics, f"{name}: evaluation metrics", False),
        "objective.png": (objective, f"{name}: multi-task objective", True),
        "throughput.png": ({"examples per second": {k: v for k, v in series.items() if k.startswith("train/")
                                                     and k.endswith("samples_per_sec")}},
                           f"{name}: throughput", False),
    }
    written = [out / file for file, (panels, title, smooth) in figures.items()
               if figure(panels, title, out / file, smooth)]
    if gradient_matrix(norms, cosines, f"{name}: task gradients on the backbone's top", out / "gradients.png"):
        written.append(out / "gradients.png")
    return written


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
