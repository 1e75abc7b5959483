"""A user's own data, end to end: the synthetic Shapes files in the COCO, image-folder, VQAv2 and table layouts are
converted with ``mmlit data convert``, a tokenizer is trained on them, and each matching task trains a few steps
through the CLI and reports its metrics (retrieval recall@K, zero-shot accuracy, CIDEr-D and BLEU-4, VQA accuracy per
answer type, top-1 classification); ``mmlit predict`` writes every task's predictions; ``mmlit plot`` draws the run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from mmlit.cli import main
from mmlit.data import load_index, shapes
from mmlit.data.tools import main as data_main

from ._processes import run_cli
from .conftest import tiny_backbone, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _convert(fmt: str, out: Path, *args: str) -> None:
    assert data_main(["convert", fmt, "--out", str(out), "--no-progress", "--shard-size", "8", *args]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Converted Shapes data sets under one folder, with a tokenizer trained on all of them."""
    root = tmp_path_factory.mktemp("real")
    raw = root / "raw"
    for split, n in (("train", 24), ("val", 8)):
        _convert("coco", root / "coco", "--annotations", str(shapes.write_coco(raw / "coco", n, split=split)),
                 "--images", str(raw / "coco" / split), "--split", split)
        questions, annotations = shapes.write_vqa(raw / "vqa", n, split=split)
        _convert("vqa", root / "vqa", "--questions", str(questions), "--annotations", str(annotations),
                 "--images", str(raw / "vqa" / f"{split}2014"), "--split", split)
    _convert("folder", root / "folder", "--images", str(shapes.write_folder(raw / "folder", 6)), "--val-fraction", "0.34")
    table = shapes.write_table(raw / "table", 24, kind="csv")
    _convert("table", root / "table", "--table", str(table), "--text-column", "caption", "--label-column", "label",
             "--val-fraction", "0.25")
    # one question per sample, as a table of (image, question, answer) rows gives it
    rows = [{"image": str(raw / "vqa" / "train2014" / f"COCO_train2014_{2000 + i:012d}.jpg"), "question": "what shape?",
             "answer": "circle" if i % 2 else "square"} for i in range(12)]
    (raw / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _convert("table", root / "single", "--table", str(raw / "questions.jsonl"), "--val-fraction", "0.34")
    # new images without labels or captions, for mmlit predict
    (raw / "new.jsonl").write_text("".join(json.dumps({"image": r["image"]}) + "\n" for r in rows[:5]))
    _convert("table", root / "new", "--table", str(raw / "new.jsonl"), "--split", "predict")
    assert data_main(["answers", "--shards", str(root / "vqa" / "train-*.tar"), "--top", "12", "--out",
                      str(root / "vqa" / "answers.json")]) == 0
    assert data_main(["tokenizer", "--vocab-size", "250", "--out", str(root / "tokenizer.json"),
                      *[f"--shards={root / name / 'train-*.tar'}" for name in ("coco", "vqa", "folder", "table")]]) == 0
    return root


def _shards(root: Path, name: str, **splits: str) -> dict:
    return {split: str(root / name / f"{source}.json") for split, source in {"train": "train", "val": "val", **splits}.items()}


def _recipe(data: Path, run: Path, tasks: dict, steps: int = 3) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "max_epochs": -1, "log_every_n_steps": 1,
                    "default_root_dir": str(run), "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "val_check_interval": steps, "check_val_every_n_epoch": None,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(run), "name": "csv"}}]},
        "model": {"backbone": tiny_backbone(), "tasks": tasks},
        "data": {"tokenizer": str(data / "tokenizer.json"), "num_workers": 0, "shuffle_buffer": 8, "seed": 0},
    }


def _fit(recipe: dict, path: Path) -> dict[str, float]:
    """Fit through the CLI; the last logged value of every key."""
    main(["fit", "--config", str(write_recipe(recipe, path))])
    rows = list(csv.DictReader(open(next(Path(recipe["trainer"]["default_root_dir"]).glob("csv/version_*/metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v and k not in ("step", "epoch")}


def _task(cls: str, shards: dict, batch_size: int = 4, **init_args) -> dict:
    return {"class_path": f"mmlit.tasks.{cls}", "init_args": {"shards": shards, "batch_size": batch_size, **init_args}}


def test_image_folder_trains_a_classifier_with_augmentation_and_predicts_new_images(data, tmp_path):
    shards = {**_shards(data, "folder"), "predict": str(data / "new" / "predict.json")}
    tasks = {"shapes": _task("ImageClassification", shards, classes=str(data / "folder" / "classes.json"),
                             transform={"auto_augment": "rand-m9-mstd0.5"})}
    values = _fit(_recipe(data, tmp_path / "run", tasks), tmp_path / "r.yaml")
    assert "train/shapes/loss" in values and 0.0 <= values["val/shapes/acc"] <= 1.0
    assert "val/shapes/acc_top5" not in values  # four classes: top-5 says nothing
    main(["predict", "--config", str(tmp_path / "r.yaml"), "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "shapes.rank0.jsonl").open()]
    assert len(rows) == 5 and all(r["prediction"] in shapes.SHAPES and 0.25 <= r["score"] <= 1.0 for r in rows)


def test_coco_trains_coca_tasks_with_zero_shot_and_predicts(data, tmp_path):
    coco = {**_shards(data, "coco", test="val"), "predict": str(data / "new" / "predict.json")}
    tasks = {"contrastive": _task("Contrastive", coco, caption_field="json.captions", zero_shot={
                 "shards": {"val": str(data / "folder" / "val.json")}, "classes": str(data / "folder" / "classes.json"),
                 "templates": ["a {}", "a drawing of a {}"], "batch_size": 4}),
             "captioning": _task("Captioning", coco, caption_field="json.captions", beam_size=2)}
    recipe = _recipe(data, tmp_path / "run", tasks)
    values = _fit(recipe, tmp_path / "r.yaml")
    for key in ("val/contrastive/r@1_i2t", "val/contrastive/r@5_t2i", "val/contrastive/r@10_i2t",
                "val/contrastive/zero_shot_top1", "val/contrastive/zero_shot_top5", "val/captioning/cider",
                "val/captioning/bleu4", "val/captioning/exact_match"):
        assert 0.0 <= values[key] <= (10.0 if key.endswith("cider") else 1.0), key
    assert values["val/contrastive/zero_shot_top5"] == 1.0  # four classes: every label is among the top 5
    assert values["val/contrastive/r@10_t2i"] == 1.0  # eight images: every caption finds its image among 10

    # predict on new images that have no captions: a caption each, an embedding each (no CLIP score without a caption)
    main(["predict", "--config", str(tmp_path / "r.yaml"), "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])
    rows = {name: [json.loads(line) for line in (tmp_path / "run" / "predictions" / f"{name}.rank0.jsonl").open()]
            for name in ("contrastive", "captioning")}
    for name in rows:
        assert sorted(r["key"] for r in rows[name]) == [f"{i:08d}" for i in range(5)], name
    assert all(isinstance(r["prediction"], str) and r["score"] <= 0.0 for r in rows["captioning"])  # log-probabilities
    assert all(len(r["prediction"]) == 128 and r["score"] is None for r in rows["contrastive"])


def test_vqa_in_both_layouts_reports_accuracy_per_answer_type(data, tmp_path):
    tasks = {"vqa": _task("VQA", _shards(data, "vqa"), answers=str(data / "vqa" / "answers.json"),
                          answer_types=["yes/no", "number", "other"]),
             "single": _task("VQA", _shards(data, "single"), answers=["circle", "square", "star"], questions_field="json")}
    values = _fit(_recipe(data, tmp_path / "run", tasks), tmp_path / "r.yaml")
    for key in ("val/vqa/acc", "val/vqa/acc_yes_no", "val/vqa/acc_number", "val/vqa/acc_other", "val/single/acc"):
        assert 0.0 <= values[key] <= 1.0, key
    assert "train/single/loss" in values


def test_a_table_trains_captioning_on_txt_and_a_classifier_on_its_labels(data, tmp_path):
    table = _shards(data, "table")
    tasks = {"captioning": _task("Captioning", table),
             "label": _task("ImageClassification", table, classes=str(data / "table" / "classes.json"))}
    values = _fit(_recipe(data, tmp_path / "run", tasks), tmp_path / "r.yaml")
    assert {"val/captioning/cider", "val/label/acc", "train/captioning/loss"} <= set(values)


def test_multilabel_classification_reports_mean_average_precision(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["multilabel_classification"], logger=[
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "run"), "name": "csv"}}])
    values = _fit(recipe, tmp_path / "r.yaml")
    assert 0.0 < values["val/multilabel_classification/map"] <= 1.0 and "val/multilabel_classification/f1" in values


def test_runs_print_a_line_per_epoch_off_a_terminal_and_plot_their_curves(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["vqa", "image_classification"], enable_progress_bar=True)
    recipe["trainer"]["logger"] = recipe["trainer"]["logger"][1:]  # the CSV logger
    recipe["data"]["num_workers"] = 1  # (a worker runs the main module again: runpy must not warn there)
    result = run_cli("fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("epoch 0/1"))
    assert "step 3" in line and "val/vqa/acc_rel" in line and "train/loss" in line
    # (mmlit's causes; libraries' adverts)
    for notice in ("LightningCLI's args parameter", "LeafSpec", "litmodels", "litlogger", "found in sys.modules"):
        assert notice not in result.stdout + result.stderr, notice

    assert main(["plot", str(tmp_path / "run")]) == 0
    for name in ("losses.png", "metrics.png", "objective.png", "gradients.png"):
        with Image.open(tmp_path / "run" / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 300, name
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_converted_indexes_are_what_setup_reads(data):
    """The converters' index files list every shard they wrote, relative to the index, with counts and sizes."""
    for name in ("coco", "vqa", "folder", "table"):
        index = load_index(str(data / name / "train.json"), "k")
        assert all(Path(u).is_file() and Path(u).parent == data / name for u in index.urls)
        assert sum(index.counts) > 0 and all(s == Path(u).stat().st_size for u, s in zip(index.urls, index.sizes))
