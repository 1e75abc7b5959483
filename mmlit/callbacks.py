"""Lightning callbacks that mmlit adds to every run."""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from mmlit.tasks.base import batch_size_of

__all__ = ["Freeze", "Throughput"]


class Throughput(pl.Callback):
    """Logs ``train/perf/samples_per_s``: examples of all tasks on all ranks per second of wall time,
    measured over the steps between two logging points (data loading included).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._samples = None, 0  # the gap between epochs (validation) is not training time

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:  # the first step of an epoch includes worker start-up: not measured
            self._start = now
            return
        self._samples += sum(batch_size_of(task_batch) for task_batch in batch.values())
        every = trainer.log_every_n_steps  # 0: no logging on step boundaries
        if every > 0 and trainer.global_step % every == 0 and now > self._start:
            rate = self._samples * trainer.world_size / (now - self._start)
            pl_module.log("train/perf/samples_per_s", rate, rank_zero_only=True)
            self._start, self._samples = now, 0


class Freeze(pl.Callback):
    """Keep the parameters whose names match ``patterns`` unchanged for the whole run, or until ``until_step``.

    Add it to a recipe under ``trainer.callbacks`` (e.g. patterns ``[backbone.image_encoder.*]`` to train new
    heads on a pretrained image encoder first). A frozen parameter's gradient is dropped just before each
    optimizer step, after DDP has reduced it and after a gradient objective has combined it, so the optimizer
    skips it (no update, no weight decay, no momentum) and it is left out of gradient clipping. Its gradient
    is still computed: ``requires_grad`` is left alone because DDP fixes the set of parameters it reduces when
    it wraps the model, so a parameter unfrozen later would train differently on every rank. Batch-norm
    statistics of a frozen part keep updating in training mode. Under a gradient objective (PCGrad, GradNorm,
    ...) the frozen parameters' task gradients still enter the combination (their norms and conflicts), only
    their update is dropped.

    Args:
        patterns: ``fnmatch`` patterns on ``MultiTaskModule.named_parameters()`` names.
        until_step: the optimizer step (``trainer.global_step``) from which they train; None: never.
    """

    def __init__(self, patterns: list[str], until_step: int | None = None):
        if not patterns:
            raise ValueError("Freeze.patterns: give at least one parameter name pattern")
        self.patterns, self.until_step = list(patterns), until_step
        self._params: list = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = [name for name, _ in pl_module.named_parameters()]
        for pattern in self.patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"Freeze.patterns: {pattern!r} matches no parameter (names look like {names[0]!r})")
        self._params = [p for name, p in pl_module.named_parameters()
                        if any(fnmatchcase(name, pattern) for pattern in self.patterns)]
        until = "the whole run" if self.until_step is None else f"until step {self.until_step}"
        rank_zero_info(f"Freeze: {len(self._params)} parameter tensors matching {self.patterns} frozen for {until}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.until_step is None or trainer.global_step < self.until_step:
            for param in self._params:
                param.grad = None
