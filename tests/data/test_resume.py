"""Exact mid-epoch resume: a run killed at step k and resumed from its checkpoint trains on exactly the samples
of the uninterrupted run, in the same order, with the same augmentations, and ends with bit-identical weights (1 and 2
ranks, 0 and 2 workers; local shards, and once each with an index and shards over HTTP and on S3)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from mmlit.data import write_index

from .._ddp_helpers import read_keys
from .._processes import run_cli
from ..conftest import tiny_recipe, write_recipe

TOTAL, CRASH = 8, 5  # steps; with 3 steps per epoch the crash is in the middle of epoch 1
FIT_TIMEOUT = 300  # seconds per fit (about 10 s each here); tools/stress_workers.py sets its own


def _fit(recipe: dict, path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("fit", "--config", str(write_recipe(recipe, path)), *extra, timeout=FIT_TIMEOUT, ddp=True)


def _recipe(soc, root, world: int, workers: int, callbacks: list[dict]) -> dict:
    recipe = tiny_recipe(soc, root, tasks=["vqa", "image_classification"], max_epochs=-1, max_steps=TOTAL, logger=False,
                         limit_val_batches=0, num_sanity_val_steps=0, devices=world,
                         strategy="ddp_find_unused_parameters_true" if world > 1 else "auto")
    recipe["data"].update(num_workers=workers, mixture={"class_path": "mmlit.data.Temperature", "init_args": {"temperature": 2.0}})
    recipe["model"]["tasks"]["image_classification"]["init_args"]["batch_size"] = 3
    # Augmentation on (random crops, flips, RandAugment): a resumed run draws the same augmentations
    recipe["model"]["tasks"]["image_classification"]["init_args"]["transform"] = {"auto_augment": "rand-m9-mstd0.5"}
    recipe["model"]["tasks"]["vqa"]["init_args"].pop("transform")  # VQA's own: random crops
    recipe["checkpoint"] = {"every_n_train_steps": CRASH}
    recipe["trainer"]["callbacks"] = callbacks
    return recipe


def _callbacks(tmp, name: str, crash: int | None = None) -> list[dict]:
    callbacks = [{"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(tmp / name / "keys")}},
                 {"class_path": "tests._ddp_helpers.DumpWeights", "init_args": {"dirpath": str(tmp / name / "weights")}}]
    if crash is not None:
        callbacks.append({"class_path": "tests._ddp_helpers.Crash", "init_args": {"at_step": crash}})
    return callbacks


def _on_store(soc: dict, request, store: str) -> dict:
    """``soc`` with its training shards (and an index of them) on a store on loopback: ``http`` or ``s3``."""
    if store == "local":
        return soc
    folder = request.getfixturevalue("tmp_path") / "store"
    folder.mkdir()
    for path in soc["shards"]["train"]:
        shutil.copy(path, folder)
    write_index(sorted(str(p) for p in folder.iterdir()), str(folder / "train.json"), progress=False)
    if store == "http":
        server = request.getfixturevalue("http_store")
        shutil.copytree(folder, server.root, dirs_exist_ok=True)
        return {**soc, "train": server.url + "/train.json"}
    server = request.getfixturevalue("s3_store")  # its environment reaches the fits through os.environ
    server.upload(folder, prefix="soc/")
    return {**soc, "train": server.url + "/soc/train.json"}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3 * FIT_TIMEOUT + 60)
@pytest.mark.parametrize("world,workers,store", [(1, 0, "local"), (1, 2, "local"), (2, 0, "local"), (2, 2, "local"),
                                                 (1, 2, "http"), (2, 0, "s3")])
def test_killed_and_resumed_run_matches_the_uninterrupted_one(soc, tmp_path, request, world, workers, store):
    soc = _on_store(soc, request, store)
    whole = _fit(_recipe(soc, tmp_path / "a", world, workers, _callbacks(tmp_path, "a")), tmp_path / "a.yaml")
    assert whole.returncode == 0, whole.stderr[-4000:]

    killed = _recipe(soc, tmp_path / "b", world, workers, _callbacks(tmp_path, "b", crash=CRASH))
    crashed = _fit(killed, tmp_path / "b.yaml")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    checkpoint = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == CRASH
    position = checkpoint["MultiTaskDataModule"]
    assert position["step"] == CRASH and set(position["tasks"]) == {"vqa", "image_classification"}

    killed["trainer"]["callbacks"] = _callbacks(tmp_path, "b")
    resumed = _fit(killed, tmp_path / "b2.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    for rank in range(world):
        expected = read_keys(tmp_path / "a" / "keys", rank)
        assert [r["step"] for r in expected] == list(range(TOTAL))
        assert read_keys(tmp_path / "b" / "keys", rank) == expected, f"rank {rank} saw other samples after resuming"
        a = torch.load(tmp_path / "a" / "weights" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "weights" / f"rank{rank}.pt", weights_only=True)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    tasks_per_step = [sorted(r["keys"]) for r in read_keys(tmp_path / "a" / "keys", 0)]
    assert all(len(t) == 1 for t in tasks_per_step) and len({t[0] for t in tasks_per_step}) == 2  # sampled mixture
