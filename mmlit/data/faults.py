"""Skipped samples: counted per task and rank, written to the run folder, held to an error budget.

Each rank appends one JSON line per skipped sample (task, split, shard URL, key or index, error)
to ``{trainer.default_root_dir}/data_faults/rank{r}.jsonl`` as soon as the batch that skipped
it reaches the main process, so the list survives a crash. ``DataMonitor`` sums the counts over
ranks at every logging step, logs them under ``train/data/{task}/...`` and stops every rank
together when a task's skipped share passes ``data.error_budget``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

from mmlit.data.shards import ShardError

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
    """Logs ``train/data/{task}/skipped`` and ``.../padded`` (all ranks) and ``train/mixture/{task}/p``
    and ``.../epoch``, and enforces the error budget; added to every run by the CLI."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        datamodule = trainer.datamodule
        mixture = getattr(datamodule, "mixture", None)
        if mixture is None or trainer.global_step % trainer.log_every_n_steps != 0:
            return  # the same decision on every rank: global_step is the same everywhere
        names = list(mixture.loaders)
        local = torch.tensor([[datamodule.faults.counts[n][c] for c in _COUNTS] for n in names], dtype=torch.long)
        every = trainer.strategy.all_gather(local.to(pl_module.device)).cpu().reshape(-1, len(names), len(_COUNTS))
        total = every.sum(0)
        probabilities = mixture.sampler.probabilities()
        batches, samples = datamodule.batches_per_epoch, datamodule.epoch_samples  # built once, not per task
        for i, name in enumerate(names):
            pl_module.log(f"train/data/{name}/skipped", float(total[i, 1]), rank_zero_only=True)
            pl_module.log(f"train/data/{name}/padded", float(total[i, 2]), rank_zero_only=True)
            pl_module.log(f"train/mixture/{name}/p", probabilities[name], rank_zero_only=True)
            epoch = (mixture.start[name] + mixture.pulled[name]) / batches[name]
            pl_module.log(f"train/mixture/{name}/epoch", epoch, rank_zero_only=True)
        budget = datamodule.error_budget
        for i, name in enumerate(names):
            skipped, read = int(total[i, 1]), int(total[i, 0])
            allowed = budget * max(read, samples[name])
            if skipped > allowed:
                per_rank = ", ".join(f"rank {r}: {int(every[r, i, 1])}" for r in range(every.shape[0]))
                raise DataBudgetError(
                    f"data.error_budget: task '{name}' skipped {skipped} of {read} training samples read "
                    f"({per_rank}), more than the budget of {budget:g} allows ({allowed:.0f}). The samples and their "
                    f"shards are listed in {datamodule.faults.path or 'the run folder'}; fix or remove those shards, "
                    f"or raise data.error_budget.")
