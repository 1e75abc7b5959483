"""Static loss weighting: ``sum_t w_t L_t`` with weights fixed in the recipe (1 by default)."""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective
from mmlit.registry import register_objective

__all__ = ["StaticWeights"]


@register_objective("static")
class StaticWeights(Objective):
    """Weighted sum of task losses.

    Args:
        weights: weight per task name; tasks not named get 1.0.
    """

    def __init__(self, weights: dict[str, float] | None = None):
        super().__init__()
        self.fixed = dict(weights or {})

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        unknown = sorted(set(self.fixed) - set(tasks))
        if unknown:
            raise ValueError(f"model.objective.init_args.weights: no task named {', '.join(map(repr, unknown))}; "
                             f"the recipe's tasks are {', '.join(tasks)}")
        self.weights.update(self.fixed)

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(self.weights[name] * loss for name, loss in losses.items())
