"""Callbacks for the multi-process tests, loaded by class path from a recipe: every rank writes what it trained
on and the weights it ended with, and a run can be made to crash at a chosen step."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch


class DumpWeights(pl.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                   Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


class RecordKeys(pl.Callback):
    """Appends ``{"step": s, "keys": {task: [sample keys]}}`` per trained step to ``dirpath/rank{r}.jsonl``."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimizer step of this batch has run (no gradient accumulation here)
        path = Path(self.dirpath) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": trainer.datamodule.mixture.recent[step]}) + "\n")


class Crash(pl.Callback):
    """Raises before the batch of optimizer step ``at_step`` runs, on every rank, like a killed job."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"simulated crash before step {self.at_step}")


def read_keys(dirpath: Path, rank: int) -> list[dict]:
    path = Path(dirpath) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
