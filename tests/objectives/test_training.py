"""Objectives inside real training: gradient accumulation, DDP (2 gloo processes), fp16 loss scaling, non-finite
gradients, tasks absent from a step, and the logged objective state. The reference for every comparison is the
same tiny module trained in one process on the whole global batch (``_train.py``)."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from mmlit.cli import main
from mmlit.data import RoundRobin

from .._processes import free_port, run as run_process
from ..conftest import REPO, tiny_recipe, write_recipe
from ._train import TASKS, build_module, interleave, loader, shared, step_batches, trainer, weights

STEPS = 3


@pytest.fixture(scope="module")
def batches(soc):
    urls = soc["shards"]["train"][:2]
    return {part: step_batches(urls, soc["tokenizer"], STEPS, part) for part in ("whole", 0, 1)}


def _fit(method: str, batches: list[dict], tmp_path, **kwargs):
    module = build_module(method)
    trainer(tmp_path, len(batches) // kwargs.get("accumulate_grad_batches", 1), **kwargs).fit(module, loader(batches))
    return module


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["static", "cagrad", "gradnorm"])
def test_gradient_accumulation_matches_the_whole_batch(method, batches, tmp_path):
    """Two micro-batches of half the images give the update of the whole batch: a gradient method acts once, on the
    per-task gradients summed over the micro-batches (CAGrad's and GradNorm's weights depend non-linearly on them, so
    acting per micro-batch would differ)."""
    whole = weights(_fit(method, batches["whole"], tmp_path))
    accumulated = weights(_fit(method, interleave(batches[0], batches[1]), tmp_path, accumulate_grad_batches=2))
    assert _max_difference(whole, accumulated) < 1e-5
    assert _max_difference(whole, weights(build_module(method))) > 1e-2  # it trained


@pytest.mark.parametrize("method", ["static", "pcgrad", "gradnorm"])
def test_the_shared_encoder_pass_trains_as_separate_passes(method, batches, tmp_path):
    """Tasks with one image tensor (as tasks on one source get it) are encoded once a step and back-propagated
    through that pass (once, or once per task for a gradient method, also over accumulated micro-batches): the
    weights are those of separate passes."""
    separate = weights(_fit(method, batches["whole"], tmp_path))
    assert _max_difference(separate, weights(_fit(method, shared(batches["whole"]), tmp_path))) < 1e-5
    accumulated = shared(interleave(batches[0], batches[1]))
    assert _max_difference(separate, weights(_fit(method, accumulated, tmp_path, accumulate_grad_batches=2))) < 1e-5


def test_fp16_gradients_are_unscaled_before_the_method_sees_them(batches, tmp_path):
    """GradNorm's weight update reads gradient norms; with a loss scale of 2^12 left in, its weights would move
    4096 times as far. Under fp16 autocast they must match the fp32 run up to half-precision rounding."""
    fp32 = _fit("gradnorm", batches["whole"], tmp_path)
    fp16 = _fit("gradnorm", batches["whole"], tmp_path,
                plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))])
    moved = (fp32.objective.task_weights - 1).abs().max().item()
    assert moved > 1e-3
    assert (fp16.objective.task_weights - fp32.objective.task_weights).abs().max().item() < 0.1 * moved


@pytest.mark.parametrize("method, where", [("static", "backbone"), ("gradnorm", "backbone"), ("gradnorm", "tasks")])
def test_non_finite_gradients_skip_the_step(method, where, batches, tmp_path):
    """An infinite gradient at step 1 (in the backbone, or in a head) skips that step and nothing else: the weights
    (and GradNorm's state) equal a run on the batches of steps 0 and 2 only."""
    module = build_module(method)
    param = next(getattr(module, where).parameters())
    param.register_hook(lambda g: g * float("inf") if module.global_step == 1 else g)
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        trainer(tmp_path, STEPS).fit(module, loader(batches["whole"]))
    assert module.skipped_steps == 1
    reference = _fit(method, [batches["whole"][0], batches["whole"][2]], tmp_path)
    assert _max_difference(weights(module), weights(reference)) < 1e-5


def test_absent_task_gets_no_update_and_the_method_combines_the_present_ones(batches, tmp_path):
    class Snapshot(pl.Callback):  # the absent task's head after step 0, before step 1 (vqa only) runs
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 1:
                self.head = {k: v.clone() for k, v in module.tasks["image_classification"].state_dict().items()}

    module, snapshot = build_module("pcgrad"), Snapshot()
    steps = [batches["whole"][0], {"vqa": batches["whole"][1]["vqa"]}]
    trainer(tmp_path, 2, callbacks=[snapshot]).fit(module, loader(steps))
    assert module.global_step == 2 and module.skipped_steps == 0
    for key, value in module.tasks["image_classification"].state_dict().items():
        assert torch.equal(value, snapshot.head[key]), key  # no gradient, so SGD leaves the absent task's head alone
    assert float(module.objective.weights["vqa"]) == 1.0  # PCGrad over one task is that task's gradient


def test_objective_state_and_skipped_steps_are_saved_in_checkpoints(batches, tmp_path):
    for method, state in (("gradnorm", "task_weights"), ("dwa", "history"), ("famo", "logits")):
        module = build_module(method)
        module.skipped_steps = 2
        trainer(tmp_path, STEPS, enable_checkpointing=True).fit(module, loader(batches["whole"]))
        saved = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)
        resumed = build_module(method)
        resumed.load_state_dict(saved["state_dict"])
        resumed.on_load_checkpoint(saved)
        assert torch.equal(getattr(resumed.objective, state), getattr(module.objective, state)), method
        assert not torch.equal(getattr(build_module(method).objective, state).nan_to_num(),
                               getattr(module.objective, state).nan_to_num()), method  # it did change in training
        assert resumed.skipped_steps == 2
        for path in (tmp_path / "checkpoints").glob("*.ckpt"):
            path.unlink()


def test_loss_based_objective_with_a_sampled_mixture_under_ddp_needs_unused_parameter_detection():
    trainer_ = SimpleNamespace(strategy=DDPStrategy(), world_size=2,
                               datamodule=SimpleNamespace(sampler=RoundRobin(), tokenizer=None))
    module = build_module("static")
    module._trainer = trainer_
    with pytest.raises(ValueError, match="data.mixture: RoundRobin leaves tasks out.*ddp_find_unused_parameters_true"):
        module.setup("fit")
    module = build_module("pcgrad")  # reduces its gradients itself: nothing to set
    module._trainer = trainer_
    module.setup("fit")


def test_objective_by_registered_name_from_the_command_line(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path, tasks=["vqa", "image_classification"], logger=[
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "csv"}}],
        limit_val_batches=0)
    main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), "--model.objective", "cagrad"])
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv")))))
    keys = {k for row in rows for k, v in row.items() if v}
    for key in ("weight/vqa", "weight/image_classification", "grad_norm/vqa", "grad_norm/image_classification",
                "cosine/vqa:image_classification", "skipped_steps"):
        assert f"train/objective/{key}" in keys, key
    with pytest.raises(ValueError, match="model.objective: no objective named 'pcgrd'; registered objectives: cagrad"):
        main(["fit", "--config", str(tmp_path / "r.yaml"), "--model.objective", "pcgrd"])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_two_ranks_match_one_rank_on_the_same_global_batch(soc, batches, tmp_path):
    """2 gloo ranks, each on half of every global batch: identical weights on both ranks, equal to the one-process
    run on the whole batches; an infinite gradient on rank 1 alone skips the step on both (and, under fp16, lowers
    both ranks' loss scale); a task absent from a step, or a backbone part no task uses, needs no unused-parameter
    detection with a gradient objective, and is a clear error with plain DDP and a loss-based one; tasks sharing one
    image tensor (one encoder pass per step) train as with separate passes, with a loss-based and a gradient-based
    objective."""
    runs = ["static", "uncertainty", "dwa", "rlw", "famo", "gradnorm", "cagrad", "mgda", "pcgrad_absent", "static_inf",
            "pcgrad_fp16_inf", "static_imageonly", "pcgrad_imageonly", "static_shared", "pcgrad_shared"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "tests.objectives._ddp_run", "--train", *soc["shards"]["train"][:2], "--tokenizer", soc["tokenizer"],
               "--out", str(tmp_path), "--runs", *runs]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = run_process(command, timeout=480, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    for r in range(2):
        error = (tmp_path / "static_imageonly" / f"rank{r}.error").read_text()
        assert "parameter(s) got no gradient in the first step (backbone.encoders.text" in error
        assert "ddp_find_unused_parameters_true" in error
    runs.remove("static_imageonly")
    whole = batches["whole"]
    references = {**{run: whole for run in runs if "_" not in run},
                  "pcgrad_absent": [whole[0], {"vqa": whole[1]["vqa"]}, whole[2]], "static_inf": [whole[0], whole[2]],
                  "static_shared": whole, "pcgrad_shared": whole}  # the shared pass: the separate passes' result
    for run in runs:
        ranks = [torch.load(tmp_path / run / f"rank{r}.pt", weights_only=True) for r in range(2)]
        info = [json.loads((tmp_path / run / f"rank{r}.json").read_text()) for r in range(2)]
        assert _max_difference(*ranks) == 0.0, run  # bit-identical on both ranks
        assert info[0]["global_step"] == info[1]["global_step"] == STEPS
        if run.endswith("_inf"):
            assert [i["skipped_steps"] for i in info] == [1, 1], run
        if run in references:
            reference = _fit(run.split("_")[0], references[run], tmp_path)
            assert _max_difference(ranks[0], weights(reference)) < 1e-5, run
    assert [i["scale"] for i in (json.loads((tmp_path / "pcgrad_fp16_inf" / f"rank{r}.json").read_text())
                                 for r in range(2))] == [128.0, 128.0]  # 2^8 halved once, on both ranks


@pytest.mark.parametrize("method", ["static", "pcgrad"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_statistics_can_be_turned_off(method, accumulate, batches, tmp_path):
    """Logged with a loss-based and a gradient-based objective, also when a step accumulates micro-batches."""
    logged = {}
    for on in (True, False):
        module = build_module(method)
        module.gradient_statistics = on
        fit = trainer(tmp_path, STEPS // accumulate, accumulate_grad_batches=accumulate)
        fit.fit(module, loader(batches["whole"]))
        logged[on] = set(fit.logged_metrics)
    assert "train/objective/grad_norm/vqa" in logged[True] and "train/objective/cosine/vqa:image_classification" in logged[True]
    assert not any("grad_norm" in key or "cosine" in key for key in logged[False])


@pytest.mark.parametrize("method, tasks", [("static", TASKS), ("uncertainty", TASKS), ("pcgrad", TASKS),
                                           ("static", ("vqa", "prefix_lm"))])
def test_gradient_statistics_are_each_tasks_own_gradient_on_the_backbones_top(method, tasks, soc, batches, tmp_path):
    """The logged norms and cosine are those of each task's loss alone, back-propagated to ``top_parameters`` (the
    fusion's and each encoder's last block and what follows it), whatever weights the objective gives the tasks:
    measured from the step's own backward pass for a loss-based objective, from the task gradients for a
    gradient-based one."""
    """(prefix_lm's head runs the text encoder's layers itself: its row is measured by a pass of its own loss.)"""
    settings = {"static": {"weights": {"vqa": 3.0, tasks[1]: 0.25}}}.get(method, {})
    reference = build_module(method, tasks=tasks, **settings)
    step = (batches["whole"] if tasks == TASKS else step_batches(soc["shards"]["train"][:1], soc["tokenizer"], 1,
                                                                 "whole", tasks))[0]
    with reference.backbone.shared_pass():
        losses = {name: reference.tasks[name](reference.backbone, task_batch)["loss"] for name, task_batch in step.items()}
    top = reference.backbone.top_parameters()
    image = reference.backbone.encoders["image"]
    assert 0 < sum(p.numel() for p in top if any(p is q for q in image.parameters())) < sum(p.numel() for p in image.parameters())
    assert all(any(p is q for q in top) for p in reference.backbone.fusion.parameters())  # (depth 1: no repeated blocks)
    grads = {name: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(
        top, torch.autograd.grad(loss, top, retain_graph=True, allow_unused=True))]) for name, loss in losses.items()}
    norms = {name: g.norm().item() for name, g in grads.items()}
    cosine = torch.nn.functional.cosine_similarity(grads["vqa"], grads[tasks[1]], dim=0).item()

    module = build_module(method, tasks=tasks, **settings)
    fit = trainer(tmp_path, 1)
    fit.fit(module, loader([step]))
    logged = {k.removeprefix("train/objective/"): v.item() for k, v in fit.logged_metrics.items()}
    for name in tasks:
        assert logged[f"grad_norm/{name}"] == pytest.approx(norms[name], rel=1e-4), name
    assert logged[f"cosine/vqa:{tasks[1]}"] == pytest.approx(cosine, abs=1e-4)
