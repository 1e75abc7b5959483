"""``MultiTaskModule``: the shared backbone, one head per task, and the objective, as a LightningModule.

It orchestrates a step and holds no mechanism of its own: each encoder runs once per input (``Backbone.shared_pass``),
each head gives its loss, the objective combines them, and ``ObjectiveUpdate`` (``mmlit/objectives/update.py``) turns
them into the optimizer step (per-task backward passes, mixed-precision scaling, skipped non-finite steps). The
non-finite loss guard, the gradient statistics and DDP's unused-parameter check are callbacks it adds itself
(``mmlit/step_callbacks.py``); evaluation metrics live in ``TaskMetrics``, the optimizer's groups in ``mmlit/optim.py``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from mmlit.compile import Compile, compile_modules
from mmlit.data.collate import batch_size_of
from mmlit.distributed import reduce_over_ranks
from mmlit.fsdp import FSDP2Strategy
from mmlit.metrics.tasks import TaskMetrics
from mmlit.models import Backbone
from mmlit.objectives import Objective, build_objective
from mmlit.objectives.update import ObjectiveUpdate
from mmlit.optim import build_optimizer
from mmlit.step_callbacks import GradientStatistics, NonFiniteLoss, UnusedParameters, log_objective
from mmlit.tasks.base import Task
from mmlit.transfer import CHECKPOINT_LAYOUT, load_backbone_weights, upgrade_checkpoint

__all__ = ["MultiTaskModule"]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)  # (fused where the trainer allows: mmlit.optim)


class MultiTaskModule(pl.LightningModule):
    """Train one backbone on several tasks.

    Args:
        backbone: the shared encoders (one per modality) and fusion.
        tasks: task name -> task; each name is used in logged keys (``train/{name}/loss``).
        objective: combines the task losses (default: static weights of 1); a registered name (``pcgrad``) builds that
            objective with its defaults.
        optimizer: builds the optimizer from the parameter groups (no weight decay on 1-D parameters).
        scheduler: builds a learning-rate scheduler, stepped every optimizer step.
        pretrained: start the backbone from this file: an mmlit checkpoint (``.ckpt``) or a backbone file
            (``mmlit export-backbone``'s ``.safetensors``). The parts it holds load strictly, the others
            (e.g. a fusion that the pre-training run did not have) start fresh; task heads never load.
        layer_decay: layer-wise learning-rate decay: each encoder layer trains at ``layer_decay`` times the
            rate of the layer above it; fusion and heads at the full rate (1: off).
        compile: ``torch.compile`` the backbone (block by block, by default) and the heads (see ``mmlit/compile.py``):
            ``true`` with the defaults, or the settings (``{backend: aot_eager}``); checkpoints keep their keys, so
            they load with or without it.
        gradient_statistics: log each task's gradient norm on the backbone's top and the pairwise cosines at logging
            steps (``GradientStatistics``; with a loss-based objective, a short backward pass per task through the
            backbone's top at those steps).
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run (``high`` lets float32 matrix products
            use TF32 on GPUs that have it); None leaves it as it is.
    """

    def __init__(self, backbone: Backbone, tasks: dict[str, Task], objective: Objective | str | None = None,
                 optimizer: OptimizerCallable = _default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 pretrained: str | None = None, layer_decay: float = 1.0, compile: bool | Compile | None = False,
                 gradient_statistics: bool = True,
                 matmul_precision: Literal["highest", "high", "medium"] | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        self.backbone, self.layer_decay, self.gradient_statistics = backbone, layer_decay, gradient_statistics
        if pretrained is not None:
            load_backbone_weights(backbone, pretrained)
        for name, task in tasks.items():
            task.name = name
            task.build(backbone)
        self.tasks = nn.ModuleDict(tasks)
        self.objective = build_objective(objective, list(tasks))
        self.update = ObjectiveUpdate(self.objective, partial(_trainable, backbone),  # (picklable: ddp_spawn)
                                      backbone.top_parameters)
        self.evaluation = TaskMetrics(tasks)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = None  # the data module's, once a stage is set up (decodes predictions)
        self.flops_per_batch: int | None = None  # (ThroughputMonitor reads it: no MFU without it)
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        if compile is not False and compile is not None:
            heads = [child for task in tasks.values() for child in task.children() if any(True for _ in child.parameters())]
            compile_modules([*backbone.encoders.values(), *filter(None, [backbone.fusion])], heads,
                            Compile() if compile is True else compile)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients (``train/objective/skipped_steps``)."""
        return self.update.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.update.skipped_steps = value

    def configure_callbacks(self) -> list[pl.Callback]:
        return [NonFiniteLoss(), *([GradientStatistics()] if self.gradient_statistics else []), UnusedParameters()]

    def configure_model(self) -> None:
        """Shard the module under ``trainer.strategy: mmlit.fsdp.FSDP2Strategy`` (its blocks, then the rest); nothing
        under any other strategy. Lightning calls it in every fit, validate, test and predict, after ``setup``."""
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        # A text encoder with a tokenizer of its own (a pretrained model's) reads every text with it, not data.tokenizer
        own = getattr(self.backbone.spec("text"), "tokenizer_file", None)
        if own is None and tokenizer is not None and tokenizer.get_vocab_size() > self.backbone.vocab_size:
            raise ValueError(
                f"model.backbone's vocab_size (its text encoder's, or its own without one) is {self.backbone.vocab_size}, "
                f"but data.tokenizer has {tokenizer.get_vocab_size()} tokens; raise vocab_size to at least that")
        self.tokenizer = tokenizer
        for task in self.tasks.values():
            task.setup(tokenizer)
        if stage == "fit":
            self.update.check(self.trainer, getattr(datamodule, "sampler", None))

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        losses = {}
        probe = self.update.feature_probe()  # (at steps that measure a loss-based objective's gradient statistics)
        # tasks on one source: each input encoded once, every head reads it
        with self.backbone.shared_pass(), self.backbone.probing(probe):
            for name, task_batch in batch.items():
                if probe is not None:
                    probe.task = name if self.tasks[name].reads_backbone_outputs else None
                self.tasks[name].global_step = self.global_step
                losses[name] = self.tasks[name](self.backbone, task_batch)["loss"]
                self.log(f"train/{name}/loss", losses[name], batch_size=batch_size_of(task_batch))
        if probe is not None:
            probe.watch(losses)
        loss = self.objective(losses, self.global_step)
        self.log("train/loss", loss)  # (not prog_bar: Lightning would read it from the device every step; Progress)
        self.update.losses = losses  # (a gradient-based objective back-propagates them one task at a time)
        if self.update.task_gradients is None:
            log_objective(self, self.objective.state())
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.update.before_batch(self.trainer)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.update.task_gradients is None:
            if self.update.probe is not None:
                self.update.measure_direct(self.trainer, {name: value for name, value in self.update.losses.items()
                                                          if not self.tasks[name].reads_backbone_outputs})
            super().backward(loss, *args, **kwargs)
            self.update.losses = None  # (their graphs are spent)
            if self.update.probe is not None:  # (it measured the gradient statistics in that pass)
                self.update.measure()
        else:
            self.update.backward(self.trainer)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        self.update.zero_grad()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        self.update.step(self, optimizer, optimizer_closure)
        self.log("train/objective/skipped_steps", self.update.skipped_on(self.device))  # (read at logging steps only)
        if self.update.task_gradients is not None:
            log_objective(self, self.objective.state())

    def on_train_end(self) -> None:
        self.update.report()  # (the steps the optimizer skipped since the last logging step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(mmlit_skipped_steps=self.update.skipped_steps, mmlit_layout=CHECKPOINT_LAYOUT)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint, fitting=self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING)
        self.update.skipped_steps = checkpoint.get("mmlit_skipped_steps", 0)

    def _eval_step(self, stage: str, batch: dict[str, dict]) -> None:
        with self.backbone.shared_pass():
            for name, task_batch in batch.items():
                outputs = self.tasks[name](self.backbone, task_batch)
                self.evaluation.update(stage, name, self.tasks[name], outputs, task_batch, batch_size_of(task_batch))

    def _eval_epoch_end(self, stage: str) -> None:
        self.log_dict(self.evaluation.compute(stage, reduce_over_ranks), sync_dist=False)

    def validation_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list[dict]]:
        """Each task's prediction rows for its batch (``Task.predict``); ``PredictionWriter`` writes them."""
        with self.backbone.shared_pass():
            return {name: self.tasks[name].predict(self.tasks[name](self.backbone, task_batch), task_batch, self.tokenizer)
                    for name, task_batch in batch.items()}

    def configure_optimizers(self):
        fused = self._trainer is not None and self.update.allows_fused(self.trainer)
        return build_optimizer(self, self.backbone.encoders.values(), self.layer_decay, self.optimizer_factory,
                               self.scheduler_factory, fused=fused)
