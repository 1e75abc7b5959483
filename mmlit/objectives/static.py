"""Static loss weighting: ``sum_t w_t * L_t`` with weights fixed in the recipe (1 by default)."""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective

__all__ = ["StaticWeights"]


class StaticWeights(Objective):
    """Weighted sum of task losses.

    Args:
        weights: weight per task name; tasks not named get 1.0.
    """

    def __init__(self, weights: dict[str, float] | None = None):
        super().__init__()
        self.weights = dict(weights or {})

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ValueError(f"model.objective.init_args.weights: no task named {', '.join(map(repr, unknown))}; "
                             f"the recipe's tasks are {', '.join(tasks)}")

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(name, 1.0) * loss for name, loss in losses.items())

    def state(self) -> dict[str, float]:
        return {f"weight/{name}": self.weights.get(name, 1.0) for name in self.task_names}
