"""The DataModule in a run: setup checks naming recipe keys, fault files and the error budget, remote shards."""

from __future__ import annotations

import itertools
import json

import pytest

from mmlit.cli import main
from mmlit.data import DataBudgetError, MultiTaskDataModule, iter_samples, write_index
from mmlit.tasks.base import Shards

from ..conftest import soc_task, tiny_recipe, write_recipe, write_tar


def _fit(recipe, tmp_path):
    return main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])


def _faulty_shards(soc, tmp_path, broken: int) -> str:
    """The 4 training shards, with ``broken`` images of the last one made undecodable."""
    samples = [dict(s) for s in iter_samples(soc["shards"]["train"][3])]
    for s in samples[:broken]:
        s["png"] = b"\x89PNG broken"
    write_tar(tmp_path / "faulty.tar", [{k: v for k, v in s.items() if k not in ("__url__", "__index__")} for s in samples])
    return "{" + ",".join([*soc["shards"]["train"][:3], str(tmp_path / "faulty.tar")]) + "}"


def _recipe(soc, tmp_path, shards: str, budget: float) -> dict:
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["image_classification"], logger=False, max_epochs=2,
                         num_sanity_val_steps=0)
    recipe["model"]["tasks"]["image_classification"]["init_args"]["shards"]["train"] = shards
    recipe["data"].update(error_budget=budget, steps_per_epoch=None, shuffle_buffer=0)
    return recipe


def test_skipped_samples_are_counted_written_and_training_goes_on(soc, tmp_path):
    _fit(_recipe(soc, tmp_path, _faulty_shards(soc, tmp_path, broken=3), budget=0.1), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "run" / "data_faults" / "rank0.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert len(train) == 6  # 3 bad samples, read in each of the 2 epochs
    assert {x["url"] for x in train} == {str(tmp_path / "faulty.tar")} and all("cannot decode entry 'png'" in x["error"] for x in train)
    assert all(x["task"] == "image_classification" and x["rank"] == 0 for x in train)


def test_error_budget_stops_the_run_with_the_counts(soc, tmp_path):
    with pytest.raises(DataBudgetError, match=r"data.error_budget: task 'image_classification' skipped 3 of \d+ training "
                                              r"samples read \(rank 0: 3\).*data_faults/rank0.jsonl"):
        _fit(_recipe(soc, tmp_path, _faulty_shards(soc, tmp_path, broken=3), budget=0.01), tmp_path)
    assert (tmp_path / "run" / "data_faults" / "rank0.jsonl").read_text().count("\n") == 3  # written before the stop


def test_unreadable_shard_is_listed_and_counted_against_the_budget(soc, tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"junk" * 512)
    shards = "{" + ",".join([*soc["shards"]["train"], str(tmp_path / "junk.tar")]) + "}"
    with pytest.raises(DataBudgetError, match=r"shards.train: 1 of 5 shard\(s\) cannot be read"):
        _fit(_recipe(soc, tmp_path, shards, budget=0.1), tmp_path)
    _fit(_recipe(soc, tmp_path, shards, budget=0.2), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "run" / "data_faults" / "rank0.jsonl").read_text().splitlines()]
    assert any(x["url"] == str(tmp_path / "junk.tar") and "found at setup" in x["error"] for x in lines)


def test_empty_shard_and_too_few_samples_are_setup_errors_naming_the_key(soc, tmp_path):
    empty = write_tar(tmp_path / "empty.tar", [])
    recipe = _recipe(soc, tmp_path, "{" + ",".join([*soc["shards"]["train"], str(empty)]) + "}", budget=0.0)
    with pytest.raises(ValueError, match=r"model.tasks.image_classification.init_args.shards.train: shard .*empty.tar' holds no sample"):
        _fit(recipe, tmp_path)
    recipe = _recipe(soc, tmp_path, soc["train"], budget=0.0)
    recipe["data"]["num_workers"] = 2
    recipe["model"]["tasks"]["image_classification"]["init_args"]["shards"]["val"] = str(
        write_tar(tmp_path / "one.tar", [{k: v for k, v in next(iter_samples(soc["shards"]["val"][0])).items()
                                          if not k.startswith("__") or k == "__key__"}]))
    with pytest.raises(ValueError, match=r"shards.val: 1 sample\(s\) for 1 rank\(s\) x 2 worker\(s\)"):
        _fit(recipe, tmp_path)


def _keys(module: MultiTaskDataModule, steps: int) -> tuple[list, int]:
    mixture = module.train_dataloader()
    for _ in itertools.islice(mixture, steps):
        pass
    train = [mixture.recent[step]["vqa"] for step in range(steps)]
    val = sum(len(b["vqa"]["answers"]) for b in module.val_dataloader())
    return train, val


def test_remote_shards_train_like_local_ones(soc, http_store):
    import shutil

    for path in soc["shards"]["train"] + soc["shards"]["val"]:
        shutil.copy(path, http_store.root)
    write_index(sorted(str(p) for p in http_store.root.glob("train-*.tar")), str(http_store.root / "train.json"),
                progress=False)
    remote = {"train": http_store.url + "/train.json", "val": http_store.url + "/val-000000.tar"}  # (val: scanned)
    seen = []
    for shards, scan_remote in ((remote, True), ({"train": soc["train"], "val": soc["val"]}, False)):
        module = MultiTaskDataModule(soc["tokenizer"], tasks={"vqa": soc_task("vqa", Shards(**shards), batch_size=4)},
                                     num_workers=1, steps_per_epoch=5, scan_remote=scan_remote)
        module.tasks["vqa"].name = "vqa"
        module.setup("fit")
        seen.append(_keys(module, 5))
    assert seen[0] == seen[1] and len(seen[0][0]) == 5 and seen[0][1] == 10 * 20  # val-000000: 10 images x 20 questions


def test_resume_continues_the_epoch_on_other_ranks_and_restarts_it_with_another_order(soc, caplog):
    module = MultiTaskDataModule(soc["tokenizer"], tasks={"vqa": soc_task("vqa", Shards(train=soc["train"]), batch_size=4)},
                                 num_workers=2)
    module.setup("fit")
    saved = {"step": 7, "settings": module._settings(), "tasks": {"vqa": {
        "epoch": 1, "sample": 13, "epoch_samples": 40, "ranks": 2, "workers": 1, "batch_size": 4}}}
    module.load_state_dict(saved)
    with caplog.at_level("INFO"):
        module.train_dataloader()
    stream = module._train_streams["vqa"]
    assert stream.start == (1, 13) and module.mixture.step == 7  # the same epoch order: it continues, on 1 rank
    assert "other ranks (2 -> 1), workers (1 -> 2)" in caplog.text and "at sample 13 of 40" in caplog.text
    for change in ({"shuffle_buffer": 7}, {"seed": 1}):  # another epoch order: the epoch starts again
        module.load_state_dict(dict(saved, settings={**module._settings(), **change}))
        with pytest.warns(UserWarning, match="restarts its task epoch 1"):
            module.train_dataloader()
        assert module._train_streams["vqa"].start == (1, 0)
