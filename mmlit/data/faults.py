"""Skipped samples: counted per task and rank, written to the run folder, held to an error budget.

Each rank appends one JSON line per skipped sample (task, split, shard URL, key or index, error)
to ``{trainer.default_root_dir}/data_faults/rank{r}.jsonl`` as soon as the batch that skipped
it reaches the main process, so the list survives a crash. ``DataMonitor`` sums the counts over
ranks at every training step and stops every rank together when a task's skipped share passes
``data.error_budget``; at logging steps it logs them under ``train/data/{task}/...``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

from mmlit.data.shards import ShardError
from mmlit.distributed import reduce_over_ranks

__all__ = ["DataBudgetError", "DataMonitor", "FaultLog"]

_COUNTS = ("samples", "skipped", "padded")


class DataBudgetError(RuntimeError):
    """More samples were skipped than ``data.error_budget`` allows."""


class FaultLog:
    """This rank's counts of samples read, skipped and padded batches per task, and its fault file."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COUNTS, 0))
        self.path: Path | None = None
        self._pending: list[dict] = []

    def attach(self, folder: str | Path) -> None:
        """Write to ``folder/data_faults/rank{r}.jsonl`` from now on (and what was held back until now)."""
        self.path = Path(folder) / "data_faults" / f"rank{self.rank}.jsonl"
        pending, self._pending = self._pending, []
        for record in pending:
            self._write(record)

    def _write(self, record: dict) -> None:
        if self.path is None:
            self._pending.append(record)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # opened per batch with faults: each line is on disk before training goes on
            f.write(json.dumps(record) + "\n")

    def add(self, task: str, split: str, report: dict) -> None:
        if split == "train":
            counts = self.counts[task]
            counts["samples"] += report["samples"]
            counts["skipped"] += len(report["faults"])
            counts["padded"] += report["padded"]
        for fault in report["faults"]:
            self._write({"task": task, "split": split, "rank": self.rank, **fault})

    def add_bad_shards(self, task: str, split: str, errors: list[ShardError]) -> None:
        for err in errors:
            self._write({"task": task, "split": split, "rank": self.rank, "url": err.url,
                         "error": f"{err.reason} (found at setup; samples after the first {err.read} are not read)"})


class DataMonitor(pl.Callback):
    """Enforces the error budget at every training step; logs ``train/data/{task}/skipped`` and ``.../padded``
    (all ranks) and ``train/mixture/{task}/p`` and ``.../epoch`` at logging steps; added to every run by the CLI."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        # Checked here, right after the loss (at batch end the read would wait for backward and the optimizer step
        # too). One process reads CPU counts; several ranks sum theirs with an all-reduce whose result is read: the
        # one per-step host read left on the training path under several ranks. Every rank sees the same sums, so
        # every rank stops at the same step.
        datamodule = trainer.datamodule
        mixture = getattr(datamodule, "mixture", None)
        if mixture is None:
            return
        names = list(mixture.tasks)
        total = _sum_over_ranks(_local_counts(datamodule, names, ("samples", "skipped")), pl_module.device)
        budget, samples = datamodule.error_budget, datamodule.epoch_samples
        over = [i for i, name in enumerate(names) if total[i][1] > budget * max(total[i][0], samples[name])]
        if over:
            every = _gather(trainer, pl_module, _local_counts(datamodule, names))  # for the per-rank counts
            _raise_over_budget(datamodule, names[over[0]], every[:, over[0]])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        datamodule = trainer.datamodule
        mixture = getattr(datamodule, "mixture", None)
        every_n = trainer.log_every_n_steps  # 0: no logging on step boundaries
        if mixture is None or every_n == 0 or trainer.global_step % every_n != 0:
            return  # the same decision on every rank: global_step is the same everywhere
        names = list(mixture.tasks)
        total = _gather(trainer, pl_module, _local_counts(datamodule, names)).sum(0)
        probabilities = mixture.sampler.probabilities()
        for i, name in enumerate(names):
            pl_module.log(f"train/data/{name}/skipped", float(total[i, 1]), rank_zero_only=True)
            pl_module.log(f"train/data/{name}/padded", float(total[i, 2]), rank_zero_only=True)
            pl_module.log(f"train/mixture/{name}/p", probabilities[name], rank_zero_only=True)
            pl_module.log(f"train/mixture/{name}/epoch", datamodule.task_epoch(name), rank_zero_only=True)


def _local_counts(datamodule, names: list[str], counts: tuple[str, ...] = _COUNTS) -> torch.Tensor:
    """This rank's (tasks, counts) counts; by default samples read, skipped, padded batches."""
    return torch.tensor([[datamodule.faults.counts[n][c] for c in counts] for n in names], dtype=torch.long)


def _sum_over_ranks(local: torch.Tensor, device: torch.device) -> list[list[int]]:
    """``local`` summed over all ranks: one all_reduce of a few numbers per step, small beside a training step."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return local.tolist()
    return reduce_over_ranks(local.to(device)).tolist()  # (NCCL reduces device tensors only)


def _gather(trainer: pl.Trainer, pl_module: pl.LightningModule, local: torch.Tensor) -> torch.Tensor:
    """Every rank's counts, (ranks, *local.shape)."""
    every = trainer.strategy.all_gather(local.to(pl_module.device)).cpu()
    return every.reshape(-1, *local.shape)


def _raise_over_budget(datamodule, name: str, every: torch.Tensor) -> None:
    """``every``: the task's (ranks, 3) counts."""
    budget, total = datamodule.error_budget, every.sum(0)
    read, skipped = int(total[0]), int(total[1])
    allowed = budget * max(read, datamodule.epoch_samples[name])
    per_rank = ", ".join(f"rank {r}: {int(every[r, 1])}" for r in range(every.shape[0]))
    raise DataBudgetError(
        f"data.error_budget: task '{name}' skipped {skipped} of {read} training samples read "
        f"({per_rank}), more than the budget of {budget:g} allows ({allowed:.0f}). The samples and their "
        f"shards are listed in {datamodule.faults.path or 'the run folder'}; fix or remove those shards, "
        f"or raise data.error_budget.")
