"""Dynamic weight average (Liu, Johns & Davison, "End-to-end multi-task learning with attention", CVPR 2019).

``w_t = T softmax(r / temperature)_t`` with ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``: a task whose loss fell less over
the last period gets more weight. The paper averages each task's loss over an epoch; mmlit averages over windows of
``period`` optimizer steps (set it to ``data.steps_per_epoch`` for the paper's choice). Each step's losses
are averaged over the DDP ranks (an all-reduce of one number per task) before they enter the window sums, so every
rank holds the same sums and uses the same weights. The first two windows use
weights of 1.
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, PeriodLosses, mean_over_ranks
from mmlit.registry import register_objective

__all__ = ["DynamicWeightAverage"]


@register_objective("dwa")
class DynamicWeightAverage(Objective):
    """Loss weights from each task's rate of loss decrease.

    Args:
        period: optimizer steps per averaging window.
        temperature: softness of the weights (2 in the paper); larger is closer to equal weights.
    """

    def __init__(self, period: int = 100, temperature: float = 2.0):
        super().__init__()
        if period < 1:
            raise ValueError(f"model.objective.init_args.period must be at least 1 step, got {period}")
        if temperature <= 0:
            raise ValueError(f"model.objective.init_args.temperature must be positive, got {temperature}")
        self.period, self.temperature = period, temperature

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        n = len(tasks)
        self.period_losses = PeriodLosses(n, self.period)
        self.register_buffer("history", torch.full((2, n), float("nan")))  # window means: (k-2, k-1)
        self.register_buffer("current", torch.ones(n))

    def _close_window(self, means: torch.Tensor) -> None:
        self.history.copy_(torch.stack([self.history[1], means]))
        ratio = torch.nan_to_num(self.history[1] / self.history[0], nan=1.0, posinf=1.0, neginf=1.0)
        self.current.copy_(len(self.task_names) * torch.softmax(ratio / self.temperature, dim=0))

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        closed = self.period_losses.advance(step)
        if closed is not None:
            self._close_window(closed)
        index = self.rows(losses, self.current.device)
        means = mean_over_ranks(torch.stack([loss.detach().float() for loss in losses.values()]))  # (T,), all ranks
        self.period_losses.add(index, means)
        total = sum(self.current[i] * loss for i, loss in zip(index.tolist(), losses.values()))
        self.weights.update({name: self.current[i] for name, i in self.index.items()})
        return total
