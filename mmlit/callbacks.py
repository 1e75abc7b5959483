"""Lightning callbacks that mmlit adds to every run."""

from __future__ import annotations

import time

import lightning.pytorch as pl

from mmlit.tasks.base import batch_size_of

__all__ = ["Throughput"]


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
        if (trainer.global_step % trainer.log_every_n_steps == 0) and now > self._start:
            rate = self._samples * trainer.world_size / (now - self._start)
            pl_module.log("train/perf/samples_per_s", rate, rank_zero_only=True)
            self._start, self._samples = now, 0
