"""PCGrad, projecting conflicting gradients (Yu et al., "Gradient surgery for multi-task learning", NeurIPS 2020).

For each task ``i`` and each other task ``j`` in a random order, if ``g_i^PC . g_j < 0`` the conflicting component is
removed: ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``; the update is ``sum_i g_i^PC``. The projections are done on the
Gram matrix, keeping each ``g_i^PC`` as coefficients over the original gradients, so the update is a linear
combination ``sum_j alpha_j g_j`` and ``alpha_j`` is logged as task ``j``'s effective weight. The random order
depends on (seed, step), so every rank projects in the same order.
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, gram, step_generator
from mmlit.registry import register_objective

__all__ = ["PCGrad"]


@register_objective("pcgrad")
class PCGrad(Objective):
    """Sum of task gradients with the conflicting components projected away.

    Args:
        seed: seeds the order of projections (with the step).
    """

    uses_gradients = True

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(losses.values())

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, tasks: list[str], step: int) -> torch.Tensor:
        g = gram(grads)  # (T, T)
        n = len(tasks)
        coef = torch.eye(n, dtype=g.dtype, device=g.device)  # row i: g_i^PC as coefficients over the g_j
        generator = step_generator(self.seed, step)
        for i in range(n):
            for j in torch.randperm(n, generator=generator).tolist():
                if j == i or g[j, j] <= 0:
                    continue
                dot = coef[i] @ g[:, j]  # g_i^PC . g_j
                if dot < 0:
                    coef[i, j] -= dot / g[j, j]
        return self._linear(grads, coef.sum(dim=0), tasks)
