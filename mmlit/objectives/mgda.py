"""MGDA (Sener & Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018).

The update is the minimum-norm point of the convex hull of the task gradients, ``sum_t w_t g_t`` with ``w`` on the
simplex, found by the paper's Frank-Wolfe solver (Algorithm 2, exact line search between two points) on the Gram
matrix. It is a common descent direction of all tasks, or zero at a Pareto-stationary point.

MGDA-UB, the paper's cheaper variant, takes gradients with respect to a representation shared by every task on the
same input. In mmlit each task has its own batch, so there is no such shared representation; the gradients are
taken on the shared parameters, which is the exact MGDA that MGDA-UB bounds. ``normalization`` is the paper's
gradient normalisation: ``l2`` (unit norms), ``loss`` (divided by the loss), ``loss+`` (both), or ``none``.
"""

from __future__ import annotations

from typing import Literal

import torch

from mmlit.objectives.base import Objective, gram
from mmlit.registry import register_objective

__all__ = ["MGDA", "min_norm_weights"]


def _line_search(aa: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """The ``gamma`` in [0, 1] minimising ``||gamma a + (1 - gamma) b||^2`` from the three inner products."""
    denominator = aa + bb - 2 * ab
    if denominator <= 1e-12:
        return torch.zeros((), dtype=aa.dtype)
    return ((bb - ab) / denominator).clamp(0.0, 1.0)


def min_norm_weights(g: torch.Tensor, iterations: int = 250, tolerance: float = 1e-6) -> torch.Tensor:
    """Frank-Wolfe for ``min_w ||sum_t w_t g_t||^2`` on the simplex, given the Gram matrix ``g`` (T, T)."""
    n = g.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=g.dtype)
    for _ in range(iterations):
        gw = g @ w  # (T,): g_t . g_w
        t = int(torch.argmin(gw))
        gamma = _line_search(g[t, t], gw[t], w @ gw)  # between the vertex g_t and the current point g_w
        step = gamma * (torch.nn.functional.one_hot(torch.tensor(t), n).to(g.dtype) - w)
        w = w + step
        if step.abs().sum() < tolerance:
            break
    return w


@register_objective("mgda")
class MGDA(Objective):
    """The minimum-norm convex combination of the task gradients.

    Args:
        normalization: how each task gradient is scaled before the solver (the paper's options).
    """

    uses_gradients = True

    def __init__(self, normalization: Literal["none", "l2", "loss", "loss+"] = "none"):
        super().__init__()
        self.normalization = normalization

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(losses.values())

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, tasks: list[str], step: int) -> torch.Tensor:
        g = gram(grads)
        norms = g.diagonal().clamp(min=1e-24).sqrt()
        loss = losses.double().cpu().clamp(min=1e-12)
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.normalization]
        w = min_norm_weights(g / torch.outer(scale, scale))
        return self._linear(grads, w / scale, tasks)
