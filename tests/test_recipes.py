"""Every shipped recipe builds and trains on tiny shards laid out as it expects (Sort-of-CLEVR's, or the converted
COCO, image-folder and VQAv2 layouts of the recipes for real data sets), and the pre-train -> fine-tune pair hands its
backbone over.

The recipes' own paths (``data/sort_of_clevr/...``, ``data/shapes/...``) resolve inside a temporary folder that holds
tiny shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmlit.cli import MMLitCLI, main
from mmlit.data import shapes
from mmlit.data.sort_of_clevr import write_dataset
from mmlit.data.tools import iter_texts
from mmlit.data.tools import main as data_main
from mmlit.text import train_tokenizer

from .conftest import REPO

# quickstart_gpu.yaml builds a GPU trainer; its model and data are quickstart.yaml's, which is tested here.
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart_gpu.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder whose ``data/sort_of_clevr`` has the quickstart's shard names with 8 images per train shard (and
    ``data/sort_of_clevr_full`` the full preset's, with 2), and whose
    ``data/shapes`` has the converted COCO, image-folder and VQAv2 layouts the recipes for real data sets read, made
    with the commands their headers give (at a few images each)."""
    root = tmp_path_factory.mktemp("recipes")
    data = root / "data" / "sort_of_clevr"
    shards = write_dataset(data, {"train": 64, "val": 8, "test": 8}, seed=0, shard_size=8)
    train_tokenizer(iter_texts(shards["train"]), data / "tokenizer.json", vocab_size=200)
    # the full preset's shard names (sort_of_clevr_fast.yaml): 20 training shards
    write_dataset(root / "data" / "sort_of_clevr_full", {"train": 40, "val": 4, "test": 4}, seed=0, shard_size=2)
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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_batch_down(recipe, workdir, monkeypatch, tmp_path):
    """The recipe's model, as built by the CLI, lowers every task's loss on fixed batches from its data module."""
    monkeypatch.chdir(workdir)
    cli = _cli(recipe, tmp_path, "--model.pretrained", "null")  # clip_to_vqa's checkpoint is tested below
    model, datamodule = cli.model, cli.datamodule
    for task in model.tasks.values():
        task.batch_size = min(task.batch_size, 4)  # tiny batches: the recipe's sizes are for real runs
    datamodule.setup("fit")
    batch: dict = {}
    for step_batch in datamodule.train_dataloader():
        batch.update(step_batch)
        if set(batch) == set(model.tasks):
            break
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first, last = {}, {}
    for _ in range(10):
        losses = {name: model.tasks[name](model.backbone, task_batch)["loss"] for name, task_batch in batch.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        first = first or {k: v.item() for k, v in losses.items()}
        last = {k: v.item() for k, v in losses.items()}
    for name in model.tasks:
        assert last[name] < 0.9 * first[name], (name, first[name], last[name])


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
    encoders = [k for k in saved if k.split(".")[0] in ("image_encoder", "text_encoder")]
    assert encoders and all(torch.equal(start[k], saved[k]) for k in encoders)
    assert not any(k.startswith("fusion.") for k in saved), "the dual encoder has no fusion; the VQA model adds one"

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.backbone.state_dict()
    assert cli.trainer.global_step == 2
    image_params = [k for k, _ in cli.model.backbone.image_encoder.named_parameters()]
    assert all(torch.equal(after[f"image_encoder.{k}"], saved[f"image_encoder.{k}"]) for k in image_params), \
        "the recipe freezes the image encoder for its first 100 steps"
    assert not torch.equal(after["text_encoder.embed.weight"], saved["text_encoder.embed.weight"])
