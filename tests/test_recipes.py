"""Every shipped recipe fits through ``mmlit fit`` (the real CLI and Trainer, with the recipe's own objective,
optimizer, scheduler and layer decay) on tiny shards laid out as it expects (Sort-of-CLEVR's, or the converted COCO,
image-folder and VQAv2 layouts of the recipes for real data sets), and the pre-train -> fine-tune pair hands its
backbone over.

The recipes' own paths (``data/sort_of_clevr/...``, ``data/shapes/...``) resolve inside a temporary folder that holds
tiny shards.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmlit.cli import MMLitCLI, main
from mmlit.data import shapes
from mmlit.data.sort_of_clevr import write_dataset
from mmlit.data.sort_of_clevr_av import write_dataset as write_av_dataset
from mmlit.data.tools import iter_texts
from mmlit.data.tools import main as data_main
from mmlit.text import train_tokenizer

from .conftest import REPO

# quickstart_gpu.yaml builds a GPU trainer; its model and data are quickstart.yaml's, which is tested here.
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart_gpu.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder whose ``data/sort_of_clevr`` has the quickstart's shard names with 8 images per train shard (and
    ``data/sort_of_clevr_full`` the full preset's, with 2; ``data/sort_of_clevr_av`` and ``data/sort_of_clevr_speech``
    the spoken ones'), and whose
    ``data/shapes`` has the converted COCO, image-folder and VQAv2 layouts the recipes for real data sets read, made
    with the commands their headers give (at a few images each)."""
    root = tmp_path_factory.mktemp("recipes")
    data = root / "data" / "sort_of_clevr"
    shards = write_dataset(data, {"train": 64, "val": 8, "test": 8}, seed=0, shard_size=8)
    train_tokenizer(iter_texts(shards["train"]), data / "tokenizer.json", vocab_size=200)
    # the full preset's shard names (sort_of_clevr_fast.yaml): 20 training shards
    write_dataset(root / "data" / "sort_of_clevr_full", {"train": 40, "val": 4, "test": 4}, seed=0, shard_size=2)
    # the spoken and moving set's (spoken_vqa.yaml, video_qa.yaml, ...): 4 training shards, its tokenizer and answers
    spoken = root / "data" / "sort_of_clevr_av"
    av_shards = write_av_dataset(spoken, {"train": 16, "val": 4, "test": 4}, seed=0, shard_size=4)
    train_tokenizer(iter_texts(av_shards["train"]), spoken / "tokenizer.json", vocab_size=200)
    speech = root / "data" / "sort_of_clevr_speech"  # (speech_image_retrieval.yaml's: 10 training shards, no clips)
    speech_shards = write_av_dataset(speech, {"train": 20, "val": 4, "test": 4}, seed=0, shard_size=2, video=False,
                                     spoken_questions=1)
    train_tokenizer(iter_texts(speech_shards["train"]), speech / "tokenizer.json", vocab_size=200)
    # the pretrained text encoder of lit_minilm.yaml, copied as its header says
    assert data_main(["pretrained", "all-minilm-l6-v2", "--out", str(root / "models" / "all-MiniLM-L6-v2")]) == 0
    # vlm.yaml's LM, made as its header says (pretrained for fewer steps)
    assert data_main(["tiny-lm", "--shards", str(data / "train-{000000..000007}.tar"), "--out",
                      str(root / "models" / "tiny-lm"), "--steps", "10"]) == 0
    raw, out = root / "data" / "shapes" / "raw", root / "data" / "shapes"

    def convert(fmt: str, *args) -> None:
        assert data_main(["convert", fmt, "--no-progress", "--shard-size", "8", *map(str, args)]) == 0

    for split, n in (("train", 16), ("val", 8)):
        shapes.write_coco(raw / "coco", n, split=split)
        shapes.write_vqa(raw / "vqa", n, split=split)
        convert("coco", "--annotations", raw / "coco" / f"captions_{split}.json", "--images", raw / "coco" / split,
                "--out", out / "coco", "--split", split)
        convert("vqa", "--questions", raw / "vqa" / f"questions_{split}.json", "--annotations",
                raw / "vqa" / f"annotations_{split}.json", "--images", raw / "vqa" / f"{split}2014", "--out", out / "vqa",
                "--split", split)
    convert("folder", "--images", shapes.write_folder(raw / "folder", 5), "--out", out / "folder", "--val-fraction", "0.4")
    assert data_main(["answers", "--shards", str(out / "vqa" / "train-*.tar"), "--out", str(out / "vqa" / "answers.json")]) == 0
    for tokenizer, sets in ((out / "tokenizer.json", ("coco", "folder")), (out / "vqa" / "tokenizer.json", ("vqa",))):
        assert data_main(["tokenizer", "--out", str(tokenizer), *(f"--shards={out / s / 'train-*.tar'}" for s in sets)]) == 0
    return root


def _cli(recipe: Path, root: Path, *overrides: str) -> MMLitCLI:
    return MMLitCLI(args=["--config", str(recipe), "--data.num_workers", "0", "--trainer.logger", "false",
                          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "run"),
                          *overrides], run=False)


def _tiny(recipe: Path) -> list[str]:
    """Overrides for a run of a few steps on the tiny shards: 2 samples a batch for every task, no validation."""
    tasks = yaml.safe_load(recipe.read_text())["model"]["tasks"]
    return [f"--model.tasks.{name}.init_args.batch_size=2" for name in tasks] + [
        "--data.num_workers=0", "--data.steps_per_epoch=3", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        "--model.pretrained=null"]  # (clip_to_vqa's checkpoint is tested below)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_through_the_cli(recipe, workdir, monkeypatch, tmp_path):
    """``mmlit fit`` of the recipe for 3 steps, through the real CLI and Trainer: the recipe's own model, objective,
    optimizer, scheduler and layer decay take every step, every task logs a finite loss, and its head trains."""
    monkeypatch.chdir(workdir)
    root = tmp_path / "run"
    logger = ["--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
              "--trainer.logger.name=csv"]
    assert main(["fit", "--config", str(recipe), *_tiny(recipe), f"--trainer.default_root_dir={root}",
                 "--trainer.logger=[]", *logger]) == 0
    rows = list(csv.DictReader(open(next(root.glob("csv/version_*/metrics.csv")))))
    tasks = yaml.safe_load(recipe.read_text())["model"]["tasks"]
    for name in tasks:
        losses = [float(r[f"train/{name}/loss"]) for r in rows if r.get(f"train/{name}/loss")]
        assert losses and all(math.isfinite(v) for v in losses), (name, losses)
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    cli = _cli(recipe, tmp_path, *_tiny(recipe))
    start = cli.model.state_dict()
    trained = checkpoint["state_dict"]
    for name in tasks:  # every head took part: some of its weights moved
        head = [k for k in trained if k.startswith(f"tasks.{name}.") and trained[k].is_floating_point()]
        assert head and any(not torch.equal(trained[k], start[k]) for k in head), name
    scheduler = yaml.safe_load(recipe.read_text())["model"].get("scheduler")
    if scheduler:  # the recipe's scheduler stepped the rates
        assert checkpoint["lr_schedulers"] and checkpoint["lr_schedulers"][0]["last_epoch"] == 3


@pytest.mark.slow
def test_pretrain_then_finetune_starts_from_the_pretrained_backbone(workdir, monkeypatch, tmp_path):
    """clip.yaml trains; clip_to_vqa.yaml builds its encoders from that checkpoint (the fusion and the new VQA head
    start fresh), keeps the image encoder frozen for its first steps, and trains."""
    monkeypatch.chdir(workdir)
    pretrain = tmp_path / "clip"
    assert main(["fit", "--config", str(REPO / "recipes" / "clip.yaml"), "--data.num_workers", "0",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(pretrain)]) == 0
    checkpoint = pretrain / "checkpoints" / "last.ckpt"
    saved = {k[len("backbone."):]: v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()
             if k.startswith("backbone.")}

    cli = _cli(REPO / "recipes" / "clip_to_vqa.yaml", tmp_path, "--model.pretrained", str(checkpoint),
               "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1")
    start = cli.model.backbone.state_dict()
    encoders = [k for k in saved if k.startswith(("encoders.image.", "encoders.text."))]
    assert encoders and all(torch.equal(start[k], saved[k]) for k in encoders)
    assert not any(k.startswith("fusion.") for k in saved), "the dual encoder has no fusion; the VQA model adds one"

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.backbone.state_dict()
    assert cli.trainer.global_step == 2
    image_params = [k for k, _ in cli.model.backbone.encoders["image"].named_parameters()]
    assert all(torch.equal(after[f"encoders.image.{k}"], saved[f"encoders.image.{k}"]) for k in image_params), \
        "the recipe freezes the image encoder for its first 100 steps"
    assert not torch.equal(after["encoders.text.embed.weight"], saved["encoders.text.embed.weight"])


@pytest.mark.slow
def test_lit_keeps_the_pretrained_text_tower_locked(workdir, monkeypatch, tmp_path):
    """lit_minilm.yaml through ``mmlit fit`` (3 steps and a validation): every weight of the locked all-MiniLM-L6-v2
    in the checkpoint is the folder's own, bit for bit, while the image tower trained; the zero-shot accuracy of the
    validation images was logged."""
    from safetensors.torch import load_file

    monkeypatch.chdir(workdir)
    recipe, root = REPO / "recipes" / "lit_minilm.yaml", tmp_path / "run"
    steps = ["--model.tasks.contrastive.init_args.batch_size=4", "--data.num_workers=0", "--data.steps_per_epoch=3",
             "--trainer.max_steps=3", "--trainer.check_val_every_n_epoch=1", "--trainer.num_sanity_val_steps=0",
             "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]
    assert main(["fit", "--config", str(recipe), *steps, f"--trainer.default_root_dir={root}", "--trainer.logger=[]",
                 "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
                 "--trainer.logger.name=csv"]) == 0
    trained = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    pretrained = load_file(workdir / "models" / "all-MiniLM-L6-v2" / "model.safetensors")
    prefix = "backbone.encoders.text.model."
    text = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
    assert len(text) >= 100 and all(torch.equal(v, pretrained[k]) for k, v in text.items())
    start = _cli(recipe, tmp_path).model.state_dict()
    image = [k for k in trained if k.startswith("backbone.encoders.image.") and trained[k].is_floating_point()]
    assert image and sum(not torch.equal(trained[k], start[k]) for k in image) > len(image) // 2
    rows = list(csv.DictReader(open(next(root.glob("csv/version_*/metrics.csv")))))
    top1 = [float(r["val/contrastive/zero_shot_top1"]) for r in rows if r.get("val/contrastive/zero_shot_top1")]
    assert len(top1) == 1 and 0.0 <= top1[0] <= 1.0
