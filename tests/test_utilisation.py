"""Utilisation (``mmlit.utilisation`` and the ``Throughput`` callback): the FLOPs of a step counted on the real first
step, ``train/perf/tflops`` and ``train/perf/mfu`` against a recipe's peak, tokens per second, and a count that changes
no weight."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmlit.callbacks import Throughput
from mmlit.cli import MMLitCLI
from mmlit.text import PAD
from mmlit.utilisation import StepFlops, text_tokens

from .conftest import tiny_recipe, write_recipe

PEAK_TFLOPS = 0.5


class FirstBatch(pl.Callback):
    """Keeps a copy of the first training batch (loaded by class path from the recipe)."""

    def __init__(self):
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.batch is None:
            self.batch = copy.deepcopy(batch)


def _fit(soc, root, **throughput) -> MMLitCLI:
    """Four steps of VQA, logging every second step: step 0 is counted (no gradient statistics step), steps 2 and 3
    fill the window of rates that is logged after step 3."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(soc, root / "run", tasks=["vqa"], log_every_n_steps=2)
    recipe["trainer"]["logger"] = recipe["trainer"]["logger"][1:]  # the CSV logger only
    recipe["trainer"]["limit_val_batches"] = 0
    recipe["trainer"]["callbacks"] = [{"class_path": "tests.test_utilisation.FirstBatch"}]
    recipe["data"]["steps_per_epoch"] = 4
    recipe["throughput"] = {"window_size": 2, "token_keys": {"vqa": "question"}, **throughput}
    return MMLitCLI(args=["fit", "--config", str(write_recipe(recipe, root / "r.yaml"))])


def _logged(root) -> list[dict]:
    return list(csv.DictReader(open(next((root / "run" / "csv").glob("version_*/metrics.csv")))))


def _column(rows: list[dict], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def _callback(cli: MMLitCLI, kind: type):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


def test_flops_of_the_first_step_give_tflops_and_mfu_against_the_recipe_peak(soc, tmp_path):
    cli = _fit(soc, tmp_path, peak_tflops=PEAK_TFLOPS)
    throughput, batch = _callback(cli, Throughput), _callback(cli, FirstBatch).batch

    module = cli.model.train()
    with FlopCounterMode(display=False) as counter:  # the same step, forward and backward, counted here on its own
        with module.backbone.shared_pass():
            loss = module.tasks["vqa"](module.backbone, batch["vqa"])["loss"]
        loss.backward()
    examples = len(batch["vqa"]["image"])
    assert counter.get_total_flops() > 0
    assert throughput.flops.per_example == {("vqa",): pytest.approx(counter.get_total_flops() / examples, rel=1e-12)}

    rows = _logged(tmp_path)
    tflops, mfu = _column(rows, "train/perf/tflops"), _column(rows, "train/perf/mfu")
    assert tflops and all(t > 0 for t in tflops)
    assert mfu == pytest.approx([t / PEAK_TFLOPS for t in tflops], rel=1e-6)
    tokens = _column(rows, "train/device/tokens_per_sec")
    assert tokens and all(t > 0 for t in tokens)


@pytest.mark.slow
def test_counting_changes_no_weight_and_a_cpu_without_a_peak_logs_no_mfu(soc, tmp_path, monkeypatch):
    counted = _fit(soc, tmp_path / "counted")
    rows = _logged(tmp_path / "counted")
    assert _column(rows, "train/perf/tflops") and not _column(rows, "train/perf/mfu")

    monkeypatch.setattr(StepFlops, "start", lambda self, batch: None)
    plain = _fit(soc, tmp_path / "plain")
    assert not _column(_logged(tmp_path / "plain"), "train/perf/tflops")
    for (name, a), b in zip(counted.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_text_tokens_are_ids_other_than_pad_or_a_mask_of_real_tokens():
    ids = torch.tensor([[5, 6, PAD], [7, PAD, PAD]])
    batch = {"vqa": {"question": ids}, "vlm": {"mask": torch.tensor([[True, True, False]])}}
    assert int(text_tokens(batch, {"vqa": "question", "vlm": "mask", "captioning": "caption"})) == 5
    with pytest.raises(KeyError, match=r"throughput.token_keys.vqa: .* no 'text'"):
        text_tokens(batch, {"vqa": "text"})


def test_a_peak_that_is_not_positive_names_the_recipe_key():
    with pytest.raises(ValueError, match="throughput.peak_tflops"):
        Throughput(peak_tflops=0)
