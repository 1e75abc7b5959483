"""The ``mmlit`` command end to end: recipes, errors that name the recipe key, a short fit and resume."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import tarfile

import pytest
import torch
import yaml

from mmlit.cli import main

from ._processes import run_cli
from .conftest import REPO, tiny_recipe, write_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout)


@pytest.mark.parametrize("kind", ["tasks", "objectives"])
def test_list_commands_name_everything_registered(kind, capsys):
    from mmlit import registry

    assert main([kind]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == getattr(registry, f"list_{kind}")()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_parses_and_starts_with_its_command(recipe, capsys, monkeypatch):
    """The first line is the command that runs the recipe; that command parses."""
    command = recipe.read_text().splitlines()[0].split()
    assert command[:3] == ["#", "mmlit", "fit"] and f"recipes/{recipe.name}" in command
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([*command[2:], "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["tasks"], "a recipe declares at least one task"


def test_recipes_stack_later_values_win(tmp_path, capsys):
    override = write_recipe({"trainer": {"max_epochs": 3}, "data": {"num_workers": 0}}, tmp_path / "o.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(RECIPES[0]), "--config", str(override), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3 and printed["data"]["num_workers"] == 0


def test_mistyped_key_is_a_clear_error(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path)
    recipe["data"]["num_wrokers"] = 2
    result = _run("fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), "--print_config")
    assert result.returncode != 0
    assert "num_wrokers" in result.stderr


def test_misspelled_task_class_is_a_clear_error(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path, tasks=["vqa"])
    recipe["model"]["tasks"]["vqa"]["class_path"] = "mmlit.tasks.VQAA"
    result = _run("fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), "--print_config")
    assert result.returncode != 0
    assert "mmlit.tasks.VQAA" in result.stderr and "model.tasks" in result.stderr


def test_missing_shards_name_the_recipe_key(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path, tasks=["vqa"])
    recipe["model"]["tasks"]["vqa"]["init_args"]["shards"]["train"] = str(tmp_path / "nowhere-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match=r"model.tasks.vqa.init_args.shards.train: no shard matches"):
        main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])


def test_shard_without_the_task_fields_names_shard_and_sample(soc, tmp_path):
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for i in range(4):
            data = b'{"caption": "red circle"}'
            info = tarfile.TarInfo(f"s{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    recipe = tiny_recipe(soc, tmp_path, tasks=["image_classification"])
    recipe["model"]["tasks"]["image_classification"]["init_args"]["shards"]["train"] = str(bad)
    from mmlit.data import SampleError

    with pytest.raises(SampleError, match=r"bad-000000.tar: sample 's\d'.*task 'image_classification' needs"):
        main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])


def test_objective_weight_for_unknown_task_names_the_key(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path, tasks=["vqa"])
    recipe["model"]["objective"] = {"class_path": "mmlit.objectives.StaticWeights", "init_args": {"weights": {"vqq": 1.0}}}
    with pytest.raises(ValueError, match=r"model.objective.init_args.weights: no task named 'vqq'"):
        main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fit_end_to_end_then_resume_then_test(soc, tmp_path):
    run = tmp_path / "run"
    # One evaluation batch per task (every task's val and test keys are logged from its first batch)
    recipe = tiny_recipe(soc, run, limit_val_batches=1, limit_test_batches=1)
    recipe["throughput"] = {"window_size": 2}  # rates from the second step on (the run has 3)
    recipe_path = write_recipe(recipe, tmp_path / "r.yaml")
    result = _run("fit", "--config", str(recipe_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint:" in result.stdout and "wandb sync" in result.stdout

    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # loadable without unpickling code
    assert checkpoint["global_step"] == 3
    assert any(k.startswith("tasks.vqa.head") for k in checkpoint["state_dict"])
    assert (run / "config.yaml").is_file() and "tasks:" in (run / "config.yaml").read_text()
    run_id = (run / "wandb-run-id").read_text().strip()
    assert [p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")] == [run_id]
    assert checkpoint["mmlit_wandb_run_id"] == run_id

    rows = list(csv.DictReader(open(next((run / "csv").glob("version_*/metrics.csv")))))
    keys = {k for row in rows for k, v in row.items() if v}
    for name in recipe["model"]["tasks"]:
        assert f"train/{name}/loss" in keys and f"val/{name}/loss" in keys
    for key in ("val/vqa/acc_rel", "val/vqa/acc_nonrel", "val/contrastive/r@1_i2t", "val/captioning/exact_match",
                "train/device/samples_per_sec", "train/perf/minutes", "train/perf/peak_memory_mib",
                "train/perf/params_trainable", "train/perf/params_frozen", "train/objective/weight/vqa", "train/objective/grad_norm/vqa",
                "train/objective/cosine/captioning:vqa", "train/objective/skipped_steps"):
        assert key in keys, key
    minutes = [float(row["train/perf/minutes"]) for row in rows if row.get("train/perf/minutes")]
    assert minutes == sorted(minutes) and 0 < minutes[-1] < 30, minutes  # wall minutes since the fit started

    resumed = _run("fit", "--config", str(recipe_path), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 6
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {run_id}, "the resume continues its run"

    assert (run / "config.1.yaml").is_file(), "resuming keeps the first run's recipe"
    tested = _run("test", "--config", str(recipe_path), "--ckpt_path", str(last))
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test/vqa/acc" in tested.stdout
    assert (run / "config.test.yaml").is_file()

    older = tmp_path / "older.ckpt"  # a checkpoint of before the modality-keyed core: no layout mark
    torch.save({k: v for k, v in torch.load(last, weights_only=True).items() if k != "mmlit_layout"}, older)
    with pytest.raises(ValueError, match="written before encoders were keyed by modality.*cannot resume a fit"):
        main(["fit", "--config", str(recipe_path), "--trainer.max_epochs", "3", "--ckpt_path", str(older),
              "--trainer.logger", "false"])  # (refused before its first step: no W&B run to start in this process)


def test_log_every_n_steps_0_trains_without_step_logs(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["image_classification"], log_every_n_steps=0)
    recipe["trainer"]["logger"] = recipe["trainer"]["logger"][1:]  # the CSV logger only
    main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")))))
    keys = {k for row in rows for k, v in row.items() if v}
    assert "val/image_classification/loss" in keys
    assert not {k for k in keys if k.startswith(("train/perf/", "train/data/", "train/mixture/"))}


def test_error_budget_stops_the_run_at_a_step_that_logs_nothing(soc, tmp_path):
    from mmlit.data import DataBudgetError, iter_samples

    from .conftest import write_tar

    samples = [{k: v for k, v in s.items() if k not in ("__url__", "__index__")}
               for s in iter_samples(soc["shards"]["train"][3])]
    for s in samples[:3]:
        s["png"] = b"\x89PNG broken"
    faulty = write_tar(tmp_path / "faulty.tar", samples)
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["image_classification"], logger=False, log_every_n_steps=1000,
                         num_sanity_val_steps=0)
    recipe["model"]["tasks"]["image_classification"]["init_args"]["shards"]["train"] = (
        "{" + ",".join([*soc["shards"]["train"][:3], str(faulty)]) + "}")
    recipe["data"].update(error_budget=0.01, steps_per_epoch=None, shuffle_buffer=0)
    with pytest.raises(DataBudgetError, match=r"task 'image_classification' skipped \d+ of \d+ training samples read "
                                              r"\(rank 0: \d+\)") as stop:
        main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])
    skipped, read = map(int, re.search(r"skipped (\d+) of (\d+)", str(stop.value)).groups())
    assert 0 < skipped <= 3 and read < 40  # stopped in the first epoch of 40 samples, at the batch that skipped
