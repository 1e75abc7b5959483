"""Train the shipped Sort-of-CLEVR recipes, each for a fixed wall time, and print where they get beside the published
results and chance.

    python tools/recipes_report.py                               # every run below, in order
    python tools/recipes_report.py --runs vqa_relation_network vqa_lstm_cnn --minutes 5
    python tools/recipes_report.py --runs sort_of_clevr_fast --seeds 3  # seeds 0, 1, 2: mean, min and max
    python tools/recipes_report.py --runs sort_of_clevr_fast --seeds 3 --set model.tasks.vqa.init_args.relational_after=1200

Each run is ``mmlit fit`` on a recipe as shipped, with ``--trainer.max_time`` set to the run's minutes and CSV logging
into ``runs/report/<run>``, then ``mmlit test`` of its last checkpoint on the test split. The data: the full
Sort-of-CLEVR (``mmlit data sort-of-clevr --out data/sort_of_clevr_full --preset full``: 9,600 training images, as
in Santoro et al. 2017) for the VQA runs, the quickstart's shards (``tools/quickstart.sh``) for the rest. The
VQA and captioning runs also predict the test split: the answers are scored per question type (which relation limits
the relational accuracy), the captions per attribute (every object's shape, side and half) besides exact match.

Written for each run: ``runs/report/<run>/curves.png``, every validation metric against wall minutes; and
``runs/report/vqa_relational.png``, the relational accuracy of the VQA runs against minutes, with the paper's 94% (RN)
and 63% (CNN+MLP). ``--reuse`` tests a run whose folder already holds a finished fit instead of training it again;
it refuses a fit trained with other ``--set`` values (recorded in the folder's ``report_set.json``).

With ``--seeds N`` each run trains N times, with ``--seed_everything S --data.seed S`` for S in 0..N-1 (from
``--first-seed``), into ``runs/report/<run>/seed<S>``; the report gives each seed's test metrics and their mean, min and
max, and, for a run with a target (the VQA runs: validation relational accuracy 0.94, the paper's RN), the minutes and
the steps at which validation first reached it. Steps do not depend on the machine; minutes do (a run's time limit is
``--minutes`` or its own: raise it to let a slower machine finish the recipe's steps).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sort_of_clevr_baselines import chance_levels, scenes  # tools/ is on sys.path when a tool runs as a script

from mmlit.data.sort_of_clevr import SceneObject
from mmlit.plot import figure, read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICK, FULL = "data/sort_of_clevr", "data/sort_of_clevr_full"
FULL_SHARDS = json.dumps({"train": f"{FULL}/train-{{000000..000019}}.tar", "val": f"{FULL}/val-000000.tar",
                          "test": f"{FULL}/test-000000.tar"})
# Santoro et al. 2017, Sort-of-CLEVR: "a CNN augmented with an RN achieves an accuracy above 94% for both relational
# and non-relational questions ... a CNN augmented with an MLP only reached this performance on the non-relational
# questions, plateauing at 63% on the relational questions".
RN_PAPER = {"test/vqa/acc_rel": (0.94, "RN, Santoro et al. 2017"), "test/vqa/acc_nonrel": (0.94, "RN, Santoro et al. 2017")}
MLP_PAPER = {"test/vqa/acc_rel": (0.63, "CNN+MLP, Santoro et al. 2017"),
             "test/vqa/acc_nonrel": (0.94, "CNN+MLP, Santoro et al. 2017")}


@dataclass
class Run:
    recipe: str
    minutes: float
    extra: list[str] = field(default_factory=list)
    full_data: bool = False  # the VQA runs: the full Sort-of-CLEVR instead of the quickstart's shards
    published: dict[str, tuple[float, str]] = field(default_factory=dict)
    target: tuple[str, float] | None = None  # a validation metric and the value whose first crossing is reported


def _steps(total: int) -> list[str]:
    """A one-cycle schedule of ``total`` steps (what a run's time limit allows on this CPU, measured)."""
    return ["--model.scheduler.init_args.total_steps", str(total), "--trainer.max_steps", str(total)]


RN_TARGET = ("val/vqa/acc_rel", 0.94)

RUNS = {
    "sort_of_clevr_fast": Run("sort_of_clevr_fast", 60, full_data=True, published=RN_PAPER, target=RN_TARGET),
    "vqa_relation_network": Run("vqa_relation_network", 8, ["--model.tasks.vqa.init_args.shards", FULL_SHARDS,
                                                            "--trainer.max_epochs", "-1", *_steps(600)],
                                full_data=True, published=RN_PAPER, target=RN_TARGET),
    "vqa_lstm_cnn": Run("vqa_lstm_cnn", 8, ["--model.tasks.vqa.init_args.shards", FULL_SHARDS],  # its 3,000 steps
                        full_data=True, published=MLP_PAPER),
    "captioning": Run("captioning", 8),
    "clip": Run("clip", 3),
    "clip_to_vqa": Run("clip_to_vqa", 3, ["--model.pretrained", "runs/report/clip/checkpoints/last.ckpt"]),
}


def _logger(root: Path, name: str) -> list[str]:
    return ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                            "init_args": {"save_dir": str(root), "name": name}})]


def _mmlit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmlit.cli", *args], cwd=REPO, check=True)


def _last(series: dict, prefix: str) -> dict[str, float]:
    return {k: v[-1][1] for k, v in series.items() if k.startswith(prefix) and not k.endswith("/loss") and v}


def _minutes_of(series: dict) -> callable:
    """Step -> wall minutes of the fit, from the ``train/perf/minutes`` the Throughput callback logs."""
    import numpy as np

    points = series.get("train/perf/minutes") or [(0, 0.0)]
    steps, minutes = zip(*[(0, 0.0), *points])
    return lambda step: float(np.interp(step, steps, minutes))


def _caption_attributes(predictions: Path, test_shard: str) -> dict[str, float]:
    """Per-attribute accuracy of predicted Sort-of-CLEVR captions (``red circle top left , green square ...``): for
    every object of the scene, whether the caption names it with the right shape, half (top/bottom) and side
    (left/right); an object the caption leaves out counts wrong. ``all``: every attribute of the scene right."""
    annotations = scenes(test_shard)
    right = {"shape": 0, "vertical": 0, "horizontal": 0, "all": 0}
    objects = images = 0
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        named = {}
        for part in row["prediction"].split(","):
            words = part.split()
            if len(words) == 4:
                named.setdefault(words[0], words[1:])
        scene_right = True
        for o in (SceneObject(**fields) for fields in annotations[row["key"]]["objects"]):
            truth = [o.shape, o.vertical, o.horizontal]  # (the generator's own halves and sides)
            said = named.get(o.colour, [None] * 3)
            for attribute, t, s in zip(("shape", "vertical", "horizontal"), truth, said):
                right[attribute] += t == s
                scene_right &= t == s
            objects += 1
        right["all"] += scene_right
        images += 1
    return {**{f"test/captioning/attr_{a}": right[a] / objects for a in ("shape", "vertical", "horizontal")},
            "test/captioning/attr_all_of_scene": right["all"] / images}


def _vqa_types(predictions: Path, test_shard: str) -> dict[str, float]:
    """Accuracy per Sort-of-CLEVR question type (shape, horizontal, vertical; closest, furthest, count) of predicted
    answers: which relation limits the relational accuracy."""
    annotations, hits = scenes(test_shard), {}
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        question = annotations[row["key"]]["questions"][row["question_id"]]
        hits.setdefault(question["type"], []).append(row["prediction"] == question["answer"])
    return {f"test/vqa/type_{t}": sum(h) / len(h) for t, h in sorted(hits.items())}


def _first_reach(points: list[tuple[int, float]], value: float) -> int | None:
    """The first step at which a metric logged as (step, value) points reached ``value`` (none: never)."""
    return next((step for step, v in points if v >= value), None)


def _as_set(overrides) -> str:
    """``--key value`` pairs as the ``--set key=value`` arguments that gave them."""
    pairs = list(overrides)
    return " ".join(f"{key[2:]}={value}" for key, value in zip(pairs[::2], pairs[1::2]))


def run(name: str, spec: Run, minutes: float | None, reuse: bool = False, seed: int | None = None,
        overrides: tuple[str, ...] = ()) -> dict:
    root = REPO / "runs" / "report" / name
    config = ["--config", f"recipes/{spec.recipe}.yaml", *spec.extra, *overrides]
    if seed is not None:  # (the model's initialisation and the data's order both follow the seed)
        root = root / f"seed{seed}"
        config += ["--seed_everything", str(seed), "--data.seed", str(seed)]
    limit = minutes if minutes is not None else spec.minutes
    hours, rest = divmod(int(limit * 60), 3600)
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    recorded = root / "report_set.json"  # the --set values the fit in this folder was trained with
    if reuse and Path(checkpoint).exists():
        trained = json.loads(recorded.read_text()) if recorded.exists() else []
        if trained != list(overrides):
            raise SystemExit(f"--reuse: {root} was trained with --set {_as_set(trained) or '(none)'}, not "
                             f"{_as_set(overrides) or '(none)'}: train it again without --reuse, or pass its --set")
    else:
        for old in root.iterdir() if root.is_dir() else ():  # (an earlier run's logs would mix into the curves)
            if old.is_dir() and (seed is not None or not old.name.startswith("seed")):  # (keeps the --seeds runs)
                shutil.rmtree(old)
            elif not old.is_dir():
                old.unlink()
        root.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(list(overrides)))
        _mmlit("fit", *config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
               "--trainer.max_time", f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}", *_logger(root, "csv"))
    _mmlit("test", *config, "--ckpt_path", checkpoint, "--trainer.default_root_dir", str(root),
           "--trainer.enable_progress_bar", "false", *_logger(root, "test"))
    series = read_metrics(root / "csv")
    logged = series.get("train/perf/minutes") or [(0, 0.0)]
    result = {"seconds": logged[-1][1] * 60,  # (the fit's wall time at its last logged step)
              "steps": int(series["train/loss"][-1][0]) if "train/loss" in series else 0,
              "val": _last(series, "val/"), "test": _last(read_metrics(root / "test"), "test/")}
    scorers = {"captioning": _caption_attributes, "vqa": _vqa_types}
    tasks = [task for task in scorers if any(k.startswith(f"test/{task}/") for k in result["test"])]
    if tasks:  # the test split's predictions, scored per attribute / per question type
        _mmlit("predict", *config, "--ckpt_path", checkpoint, "--trainer.default_root_dir", str(root),
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false")
        for task in tasks:
            result["test"].update(scorers[task](root / "predictions" / f"{task}.rank0.jsonl",
                                                f"{FULL if spec.full_data else QUICK}/test-000000.tar"))
    minutes = _minutes_of(series)
    curves = {k: [(minutes(s), v) for s, v in points] for k, points in series.items()
              if k.startswith("val/") and not k.endswith("/loss")}
    figure({k[4:]: {name: points} for k, points in curves.items()}, name, root / "curves.png", xlabel="minutes")
    result["curve"] = curves.get("val/vqa/acc_rel", [])
    if spec.target is not None:
        step = _first_reach(series.get(spec.target[0], []), spec.target[1])
        result["target"] = {"metric": spec.target[0], "value": spec.target[1], "step": step,
                            "minutes": None if step is None else minutes(step)}
    (root / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _relational_figure(results: dict) -> None:
    curves = {name: r["curve"] for name, r in results.items() if r.get("curve")}
    if curves:  # the paper's results as flat lines across the longest run
        end = max(m for curve in curves.values() for m, _ in curve)
        curves |= {"RN, paper (94%)": [(0, 0.94), (end, 0.94)], "CNN+MLP, paper (63%)": [(0, 0.63), (end, 0.63)]}
        figure({"relational accuracy (validation)": curves}, "Sort-of-CLEVR VQA",
               REPO / "runs" / "report" / "vqa_relational.png", xlabel="minutes of training (2-core CPU)")


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} | {min(values):.3f} | {max(values):.3f}"


def _seed_table(name: str, spec: Run, seeds: dict[int, dict], chance: dict) -> None:
    """One row per test metric: each seed's value, then the mean, min and max over seeds; then the time, the steps and
    the first crossing of the run's target."""
    columns = " | ".join(f"seed {s}" for s in seeds)
    print(f"\n{name}\n\n| | {columns} | mean | min | max | published | chance |\n|---|"
          + "---|" * (len(seeds) + 5))
    level = chance.get(FULL if spec.full_data else QUICK, {})
    for key in sorted(next(iter(seeds.values()))["test"]):
        values = [r["test"].get(key, float("nan")) for r in seeds.values()]
        published = spec.published.get(key)
        print(f"| {re.sub('^test/[^/]+/', '', key)} | {' | '.join(f'{v:.3f}' for v in values)} | {_spread(values)} | "
              f"{f'{published[0]:.2f}' if published else '-'} | "
              f"{f'{level[key]:.3f}' if key in level else '-'} |")
    rows = {"minutes": [r["seconds"] / 60 for r in seeds.values()], "steps": [r["steps"] for r in seeds.values()]}
    if spec.target is not None:
        metric, value = spec.target
        reached = [r["target"] for r in seeds.values()]
        rows[f"steps to {metric} {value}"] = [t["step"] for t in reached]
        rows[f"minutes to {metric} {value}"] = [t["minutes"] for t in reached]
    for label, values in rows.items():
        known = [v for v in values if v is not None]
        shown = " | ".join("not reached" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
                           for v in values)
        show = (lambda v: f"{v:.1f}") if any(isinstance(v, float) for v in known) else str  # noqa: E731
        spread = (f"{sum(known) / len(known):.1f} | {show(min(known))} | {show(max(known))}" if len(known) == len(values)
                  else f"{len(known)} of {len(values)} seeds | | ")
        print(f"| {label} | {shown} | {spread} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--minutes", type=float, help="each run's time limit instead of its own")
    parser.add_argument("--reuse", action="store_true",
                        help="a run whose folder holds a finished fit (checkpoints/last.ckpt) trained with the same "
                             "--set values is tested, not trained again")
    parser.add_argument("--seeds", type=int, help="train each run on this many seeds and report their spread")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of the --seeds seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe value for every fit, test and predict of the runs (repeatable), e.g. "
                             "model.tasks.vqa.init_args.relational_after=1200")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.seeds is None and args.first_seed != 0:
        parser.error("--first-seed needs --seeds")
    overrides = []
    for item in args.set:
        key, equals, value = item.partition("=")
        if not equals or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides += [f"--{key}", value]
    chance = {}
    for data in (QUICK, FULL):
        shards = f"{data}/train-{{000000..{19 if data == FULL else 7:06d}}}.tar"
        if Path(REPO / data / "test-000000.tar").exists():
            levels = chance_levels(str(REPO / shards), str(REPO / data / "test-000000.tar"),
                                   str(REPO / QUICK / "tokenizer.json"))
            chance[data] = {"test/" + k[4:]: v for k, v in levels.items()}
    if args.seeds is not None:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        results = {name: {s: run(name, RUNS[name], args.minutes, args.reuse, seed=s, overrides=tuple(overrides))
                          for s in seeds} for name in args.runs}
        _relational_figure({f"{name}, seed {s}": r for name, by_seed in results.items() for s, r in by_seed.items()})
        for name, by_seed in results.items():
            _seed_table(name, RUNS[name], by_seed, chance)
        return
    results = {}
    for name in args.runs:
        results[name] = run(name, RUNS[name], args.minutes, args.reuse, overrides=tuple(overrides))
    _relational_figure(results)
    print("\n| recipe | data | time | steps | test metric | reached | published | chance |\n|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        spec = RUNS[name]
        data = FULL if spec.full_data else QUICK
        for i, (key, value) in enumerate(sorted(result["test"].items())):
            published = spec.published.get(key)
            level = chance.get(data, {}).get(key)
            head = (f"| {name} | {Path(data).name} | {result['seconds'] / 60:.1f} min | {result['steps']} |" if i == 0
                    else "| | | | |")
            print(f"{head} {re.sub('^test/[^/]+/', '', key)} | {value:.3f} | "
                  f"{f'{published[0]:.2f} ({published[1]})' if published else '-'} | "
                  f"{f'{level:.3f}' if level is not None else '-'} |")


if __name__ == "__main__":
    main()
