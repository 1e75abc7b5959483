"""A callback for the DDP test: every rank writes its final weights, so the test can compare them."""

from __future__ import annotations

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
