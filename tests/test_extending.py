"""The worked example of ``docs/extending.md``, run as the page gives it: its files become the package
``mmlit_examples`` (outside mmlit, registered through entry points as the page's ``pyproject.toml`` says), and its
recipe trains a new modality (a sensor's ``.npy`` readings, an MLP encoder), a task that reads the sensor and text, a
fusion, a multi-task objective and a shard format (JSON lines) through ``mmlit fit``, with no file of mmlit changed."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mmlit.text import train_tokenizer

from ._processes import REPO, cli_env, run

PAGE = REPO / "docs" / "extending.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, dict]:
    """The page's files as an installed package (its code and recipe as written), and sensor shards in JSON lines."""
    root = tmp_path_factory.mktemp("extending")
    package, work = root / "site" / "mmlit_examples", root / "work"
    package.mkdir(parents=True)
    work.mkdir()
    (package / "__init__.py").write_text("")
    files = {}
    for block in _blocks("python") + _blocks("yaml"):
        name = re.match(r"# file: (\S+)\n", block)
        if name:
            files[name[1]] = block
            (work if name[1].endswith(".yaml") else package).joinpath(name[1]).write_text(block)
    assert set(files) == {"sensor.py", "sensor_qa.py", "product_fusion.py", "loss_share.py", "jsonl_source.py",
                          "recipe.yaml"}
    # the entry points of the page's pyproject.toml, as pip would install them
    points = tomllib.loads(_blocks("toml")[0])["project"]["entry-points"]
    info = root / "site" / "mmlit_examples-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmlit-examples\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in names.items())
                                                   for group, names in points.items()))
    shards = work / "sensors"
    shards.mkdir()
    generator, questions = random.Random(0), []
    for name, n in (("train-000", 600), ("train-001", 600), ("val", 200)):
        with open(shards / f"{name}.jsonl", "w") as out:
            for i in range(n):
                reading = np.random.default_rng(generator.randrange(1 << 30)).normal(size=8).astype(np.float32)
                side = generator.choice(["above", "below"])  # the answer depends on the reading and the words
                question = f"is the total of the reading {side} zero?"
                questions.append(question)
                buffer = io.BytesIO()
                np.save(buffer, reading)
                entries = {"npy": {"b64": base64.b64encode(buffer.getvalue()).decode()},
                           "json": json.dumps({"question": question,
                                               "answer": "yes" if (reading.sum() > 0) == (side == "above") else "no"})}
                out.write(json.dumps({"key": f"{name}-{i:04d}", "entries": entries}) + "\n")
    train_tokenizer(questions, shards / "tokenizer.json", vocab_size=64)
    env = cli_env()
    env["PYTHONPATH"] = f"{root / 'site'}:{env['PYTHONPATH']}"
    return work, env


def _mmlit(example, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    work, env = example
    return run([sys.executable, "-m", "mmlit.cli", *args], timeout=timeout, cwd=work, env=env)


@pytest.mark.slow
def test_the_pages_recipe_trains_a_new_modality_task_fusion_objective_and_source(example):
    work, _ = example
    result = _mmlit(example, "fit", "--config", "recipe.yaml", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                    "--trainer.logger.save_dir=runs/sensor_qa", "--trainer.logger.name=csv",
                    "--trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(open(next((work / "runs" / "sensor_qa").glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/sensor_qa/loss"]) for r in rows if r.get("train/sensor_qa/loss")]
    accuracy = [float(r["val/sensor_qa/acc"]) for r in rows if r.get("val/sensor_qa/acc")]
    weights = [float(r["train/objective/weight/sensor_qa"]) for r in rows if r.get("train/objective/weight/sensor_qa")]
    assert len(losses) >= 10 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses  # it learns
    assert accuracy and accuracy[-1] > 0.8, accuracy  # held-out readings (chance 0.5)
    assert weights and all(w == pytest.approx(1.0) for w in weights)  # loss_share with one task: weight 1


def test_the_registered_names_list_the_pages_classes(example):
    expected = {"modalities": ("sensor", "mmlit_examples.sensor.SensorModality"),
                "tasks": ("sensor_qa", "mmlit_examples.sensor_qa.SensorQA"),
                "fusions": ("product", "mmlit_examples.product_fusion.ProductFusion"),
                "objectives": ("loss_share", "mmlit_examples.loss_share.LossShare"),
                "sources": ("jsonl", "mmlit_examples.jsonl_source.JsonLinesSource")}
    # `mmlit KIND` is main([KIND]): the five in one fresh process (a process each spent its time on imports), each
    # list after a line that names it, the package found only through its installed entry points
    script = ("import sys\nfrom mmlit.cli import main\nfor kind in sys.argv[1:]:\n    print('== ' + kind, flush=True)\n"
              "    if main([kind]) != 0:\n        sys.exit(kind + ': exit status not 0')")
    work, env = example
    result = run([sys.executable, "-c", script, *expected], timeout=120, cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    listings = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", result.stdout, re.M | re.S))
    for kind, (name, path) in expected.items():
        assert re.search(rf"^{name} .*\({re.escape(path)}\)", listings.get(kind, ""), re.M), (kind, result.stdout)


def test_a_backbone_without_the_tasks_encoder_is_an_error_naming_both(example):
    text = (example[0] / "recipe.yaml").read_text()
    without = re.sub(r"\n +(sensor|fusion): \{class_path.*", "", text)  # no sensor encoder (and no fusion of it)
    assert "SensorEncoder" not in without and "ProductFusion" not in without
    (example[0] / "without_sensor.yaml").write_text(without)
    result = _mmlit(example, "fit", "--config", "without_sensor.yaml", "--trainer.max_steps=1", timeout=120)
    assert result.returncode != 0
    assert ("model.tasks.sensor_qa: the task reads sensor, but model.backbone.init_args.encoders has no 'sensor' "
            "(it has text)") in result.stderr, result.stderr[-2000:]
