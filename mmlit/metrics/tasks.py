"""Every task's evaluation metrics and mean loss, per evaluation stage, computed the same way on every rank."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

__all__ = ["TaskMetrics"]


class TaskMetrics(nn.Module):
    """Each task's ``metrics()`` and its mean loss, for each stage (``val``, ``test``).

    Args:
        tasks: task name -> task head (``metrics()`` makes a fresh collection).
        stages: the evaluation stages.
    """

    def __init__(self, tasks: dict[str, nn.Module], stages: tuple[str, ...] = ("val", "test")):
        super().__init__()
        self.metrics = nn.ModuleDict({stage: nn.ModuleDict({name: task.metrics() for name, task in tasks.items()})
                                      for stage in stages})
        self.losses = nn.ModuleDict({stage: nn.ModuleDict({name: MeanMetric() for name in tasks}) for stage in stages})

    def update(self, stage: str, name: str, task: nn.Module, outputs: dict, batch: dict, batch_size: int) -> None:
        task.update_metrics(self.metrics[stage][name], outputs, batch)
        if "loss" in outputs:  # (a batch of an evaluation source, zero-shot images, may have none)
            self.losses[stage][name].update(outputs["loss"], weight=batch_size)

    def compute(self, stage: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{stage}/{task}/{metric}`` of every metric that some rank updated, then reset. A metric's ``compute()``
        syncs across ranks, so every rank computes the same metrics in the same order: those whose update counts,
        summed over ranks in one ``reduce`` (an all-reduce), are not zero. A task no batch reached (no shards for this
        split, or the sanity check stopped before it), or a metric of a source without shards here (zero-shot), is
        left out. Non-finite values are dropped."""
        parts = [(name, key, metric) for name in self.losses[stage]
                 for key, metric in [("loss", self.losses[stage][name]),
                                     *self.metrics[stage][name].items(keep_base=True, copy_state=False)]]
        counts = torch.tensor([float(metric.update_count) for _, _, metric in parts],
                              device=next(iter(self.losses[stage].values())).device)
        counts = reduce(counts) if reduce is not None else counts
        values = {}
        for (name, key, metric), count in zip(parts, counts.tolist()):
            if count:
                value = metric.compute()  # a metric may give several values (recall@1, @5, ... both ways)
                named = value if isinstance(value, dict) else {key: value}
                values.update({f"{stage}/{name}/{k}": v for k, v in named.items()})
            metric.reset()
        return {k: v for k, v in values.items() if torch.isfinite(v)}
