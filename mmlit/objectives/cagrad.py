"""CAGrad, conflict-averse gradient descent (Liu et al., "Conflict-averse gradient descent for multi-task
learning", NeurIPS 2021).

The update stays within a ball of radius ``c ||g0||`` around the average gradient ``g0`` and, inside it, maximises
the worst task's improvement. Its dual is a problem over the simplex,
``min_w  g_w . g0 + c ||g0|| ||g_w||`` with ``g_w = sum_t w_t g_t``, solved here on the Gram matrix (L-BFGS on
softmax logits, float64; the authors use SciPy's SLSQP). The update is ``(g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2)``
(the authors' ``rescale=1``), a linear combination of the task gradients whose coefficients are logged.
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, gram
from mmlit.registry import register_objective

__all__ = ["CAGrad", "cagrad_weights"]


def cagrad_weights(g: torch.Tensor, c: float, iterations: int = 50) -> torch.Tensor:
    """The simplex weights ``w`` (T,) of CAGrad's dual for the Gram matrix ``g`` (T, T)."""
    n = g.shape[0]
    b = torch.full((n,), 1.0 / n, dtype=g.dtype)
    radius = c * torch.sqrt(b @ g @ b + 1e-12)
    logits = torch.zeros(n, dtype=g.dtype, requires_grad=True)
    solver = torch.optim.LBFGS([logits], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                               tolerance_grad=1e-12, tolerance_change=1e-14)

    def dual() -> torch.Tensor:
        solver.zero_grad()
        w = torch.softmax(logits, dim=0)
        value = w @ g @ b + radius * torch.sqrt(w @ g @ w + 1e-12)
        value.backward()
        return value

    with torch.enable_grad():
        solver.step(dual)
    return torch.softmax(logits.detach(), dim=0)


@register_objective("cagrad")
class CAGrad(Objective):
    """The average gradient, bent towards the worst-off task within a ball around it.

    Args:
        c: radius of the ball relative to ``||g0||`` (0 gives the average gradient; 0.4 in the paper's MTL runs).
    """

    uses_gradients = True

    def __init__(self, c: float = 0.4):
        super().__init__()
        if c < 0:
            raise ValueError(f"model.objective.init_args.c must be >= 0, got {c}")
        self.c = c

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(losses.values())

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, tasks: list[str], step: int) -> torch.Tensor:
        g = gram(grads)
        n = len(tasks)
        w = cagrad_weights(g, self.c)
        radius = self.c * torch.sqrt(g.mean() + 1e-12)  # c ||g0||
        lam = radius / torch.sqrt(w @ g @ w + 1e-12)
        alpha = (torch.full((n,), 1.0 / n, dtype=g.dtype) + lam * w) / (1 + self.c ** 2)
        return self._linear(grads, alpha, tasks)
