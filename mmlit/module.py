"""``MultiTaskModule``: the shared backbone, one head per task, and the objective, as a LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from mmlit.models import Backbone
from mmlit.objectives import Objective, StaticWeights
from mmlit.tasks.base import Task, batch_size_of

__all__ = ["MultiTaskModule"]

_EVAL_STAGES = ("val", "test")


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


class MultiTaskModule(pl.LightningModule):
    """Train one backbone on several tasks.

    Args:
        backbone: the shared encoders and fusion.
        tasks: task name -> task; each name is used in logged keys (``train/{name}/loss``).
        objective: combines the task losses (default: static weights of 1).
        optimizer: builds the optimizer from the parameters.
        scheduler: builds a learning-rate scheduler, stepped every optimizer step.
    """

    def __init__(self, backbone: Backbone, tasks: dict[str, Task], objective: Objective | None = None,
                 optimizer: OptimizerCallable = _default_optimizer, scheduler: LRSchedulerCallable | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        self.backbone = backbone
        for name, task in tasks.items():
            task.name = name
            task.build(backbone)
        self.tasks = nn.ModuleDict(tasks)
        self.objective = objective if objective is not None else StaticWeights()
        self.objective.bind(list(tasks))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({name: task.metrics() for name, task in tasks.items()}) for stage in _EVAL_STAGES})
        self.eval_losses = nn.ModuleDict({
            stage: nn.ModuleDict({name: MeanMetric() for name in tasks}) for stage in _EVAL_STAGES})

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and tokenizer.get_vocab_size() > self.backbone.vocab_size:
            raise ValueError(
                f"model.backbone.init_args.text_encoder.init_args.vocab_size is {self.backbone.vocab_size}, but "
                f"data.tokenizer has {tokenizer.get_vocab_size()} tokens; raise vocab_size to at least that")

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        losses = {}
        for name, task_batch in batch.items():
            losses[name] = self.tasks[name](self.backbone, task_batch)["loss"]
            self.log(f"train/{name}/loss", losses[name], batch_size=batch_size_of(task_batch))
        loss = self.objective(losses)
        if not torch.isfinite(loss):
            bad = ", ".join(f"train/{n}/loss={v.item():.4g}" for n, v in losses.items())
            raise FloatingPointError(f"non-finite loss at step {self.global_step} ({bad}); the last checkpoint is "
                                     f"untouched. Lower the learning rate or check the data of the task(s) above.")
        self.log("train/loss", loss, prog_bar=True)
        for key, value in self.objective.state().items():
            self.log(f"train/objective/{key}", value)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, dict]) -> None:
        for name, task_batch in batch.items():
            task = self.tasks[name]
            outputs = task(self.backbone, task_batch)
            task.update_metrics(self.metrics[stage][name], outputs, task_batch)
            self.eval_losses[stage][name].update(outputs["loss"], weight=batch_size_of(task_batch))

    def _eval_epoch_end(self, stage: str) -> None:
        # compute() syncs across ranks; every rank calls it for every task in the same order.
        values = {}
        # A task without batches on any rank (no shards for this split, or the sanity check stopped before it) is
        # left out; the decision is taken over all ranks, because compute() of the others would wait for it.
        seen = torch.tensor([float(self.eval_losses[stage][name].update_count) for name in self.tasks], device=self.device)
        seen = self.trainer.strategy.reduce(seen, reduce_op="sum") if self._trainer is not None else seen
        for (name, task), count in zip(self.tasks.items(), seen.tolist()):
            if getattr(task.shards, stage) is None or count == 0:
                continue
            values[f"{stage}/{name}/loss"] = self.eval_losses[stage][name].compute()
            for key, value in self.metrics[stage][name].compute().items():
                values[f"{stage}/{name}/{key}"] = value
            self.eval_losses[stage][name].reset()
            self.metrics[stage][name].reset()
        self.log_dict({k: v for k, v in values.items() if torch.isfinite(v)}, sync_dist=False)

    def validation_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
