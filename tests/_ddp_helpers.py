"""Callbacks and plugins for the multi-process tests, loaded by class path from a recipe: every rank writes what it
trained on and the weights it ended with; a run can be made to crash at a chosen step, to write its first checkpoint
slowly (so that a test can kill it in the middle of the write), or to fail on one rank."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from mmlit.checkpoints import AtomicCheckpointIO
from mmlit.tasks import ImageClassification, Shards
from mmlit.tasks.image_classification import ImageClassificationData


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


class Pace(pl.Callback):
    """Sleeps ``seconds`` after each training step: a tiny run lasts long enough to be interrupted in its middle."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        time.sleep(self.seconds)


class SlowCheckpointIO(AtomicCheckpointIO):
    """The first checkpoint of a test (while ``marker`` does not exist; every checkpoint with ``first_only`` false)
    is written half, then ``marker`` is made, then it pauses ``pause`` seconds before the rest: a test kills the run
    in that pause."""

    def __init__(self, marker: str, pause: float = 5.0, first_only: bool = True):
        super().__init__()
        self.marker, self.pause, self.first_only = Path(marker), pause, first_only

    def _write(self, checkpoint: dict, file) -> None:
        if self.first_only and self.marker.exists():
            return super()._write(checkpoint, file)
        data = io.BytesIO()
        torch.save(checkpoint, data)
        data = data.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        self.marker.write_text("writing")
        time.sleep(self.pause)
        file.write(data[len(data) // 2:])


class FailOn(pl.Callback):
    """Raises on rank ``rank``, in its callbacks' ``setup`` (after the data module's) or at training step ``step``."""

    def __init__(self, rank: int, step: int | None = None):
        self.rank, self.step = rank, step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.step is None and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure in setup on rank {self.rank}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.step is not None and trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure at step {self.step} on rank {self.rank}")


def read_steps(dirpath: Path, rank: int) -> list[dict]:
    """``read_keys`` of a run that was killed and resumed: each step as it was last trained, in step order."""
    last = {record["step"]: record for record in read_keys(dirpath, rank)}
    return [last[step] for step in sorted(last)]


class _FailingData(ImageClassificationData):
    """Image classification's data side, failing on rank ``fail_rank`` in the data module's setup (when it asks for
    the evaluation sources, before its broadcast of the shard index) or in a DataLoader worker's ``prepare``."""

    def __init__(self, data: ImageClassificationData, fail_rank: int, fail_in: str, marker: str | None):
        super().__init__(data.shards, data.batch_size, data.label_field, data.classes, data.transforms["image"])
        self.fail_rank, self.fail_in, self.marker = fail_rank, fail_in, marker

    def _fail(self, where: str):
        if self.marker:
            Path(self.marker).write_text(str(time.time()))  # when it failed
        raise RuntimeError(f"injected failure in {where} on rank {self.fail_rank}")

    def evaluation_sources(self) -> list:
        import torch.distributed as dist

        if self.fail_in == "setup" and dist.is_initialized() and dist.get_rank() == self.fail_rank:
            self._fail("the data module's setup")
        return super().evaluation_sources()

    def prepare(self, sample, tokenizer):
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        if self.fail_in == "worker" and rank == self.fail_rank:
            self._fail("a DataLoader worker")
        yield from super().prepare(sample, tokenizer)


class FailingTask(ImageClassification):
    """Image classification that fails on rank ``fail_rank``: in the data module's setup, before its broadcast of
    the shard index (``setup``), or in a DataLoader worker's ``prepare`` (``worker``)."""

    def __init__(self, shards: Shards, fail_rank: int, fail_in: str = "worker", marker: str | None = None, **kwargs):
        super().__init__(shards, **kwargs)
        self.data = _FailingData(self.data, fail_rank, fail_in, marker)


class NaNOnce(ImageClassification):
    """Image classification whose loss is NaN once: at the first training step on rank ``rank`` after the file
    ``trigger`` appears (the file is removed then), as from a bad batch or a hardware fault. ``tools/soak.py``."""

    def __init__(self, shards: Shards, trigger: str, rank: int = 1, **kwargs):
        super().__init__(shards, **kwargs)
        self.trigger, self.rank = Path(trigger), rank

    def forward(self, backbone, batch: dict) -> dict:
        import torch.distributed as dist

        out = super().forward(backbone, batch)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.training and rank == self.rank and self.trigger.exists():
            self.trigger.unlink()
            out["loss"] = out["loss"] * float("nan")
        return out
