"""The objective interface: per-task losses in, one scalar to back-propagate out."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Objective"]


class Objective(nn.Module):
    """Combine ``{task: loss}`` into the loss that is back-propagated.

    ``bind`` is called once with the task names, so a recipe error names the recipe key;
    ``state`` returns the scalars logged under ``train/objective/...``.
    """

    def bind(self, tasks: list[str]) -> None:
        self.task_names = list(tasks)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, float]:
        return {}
