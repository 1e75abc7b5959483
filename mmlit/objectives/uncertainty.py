"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-task learning using uncertainty to weigh losses for scene
geometry and semantics", CVPR 2018).

Each task has a learned log-variance ``s_t = log sigma_t^2``; the loss is ``sum_t 0.5 exp(-s_t) L_t + 0.5 s_t``
(the paper's regression form, as LibMTL uses it for every task). For a fixed loss the optimum is ``s_t = log L_t``,
so a task with a large (noisy) loss gets a small weight ``0.5 exp(-s_t)``. The log-variances are parameters of the
module and are trained by the run's optimizer with everything else.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlit.objectives.base import Objective
from mmlit.registry import register_objective

__all__ = ["UncertaintyWeighting"]


@register_objective("uncertainty")
class UncertaintyWeighting(Objective):
    """Learned homoscedastic-uncertainty weights.

    Args:
        init_log_variance: the starting ``s_t`` of every task (0: weight 0.5).
    """

    def __init__(self, init_log_variance: float = 0.0):
        super().__init__()
        self.init_log_variance = init_log_variance

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        self.log_variance = nn.Parameter(torch.full((len(tasks),), float(self.init_log_variance)))

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        total = 0.0
        for name, loss in losses.items():
            s = self.log_variance[self.index[name]]
            weight = 0.5 * torch.exp(-s)
            total = total + weight * loss + 0.5 * s
            self.weights[name] = weight.detach()
        return total

    def state(self) -> dict[str, torch.Tensor | float]:
        return {**super().state(), **{f"log_variance/{n}": self.log_variance[i].detach() for n, i in self.index.items()}}
