"""MGDA (Sener & Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018).

The update is the minimum-norm point of the convex hull of the task gradients, ``sum_t w_t g_t`` with ``w`` on the
simplex: a common descent direction of all tasks, or zero at a Pareto-stationary point.

The paper finds it by Frank-Wolfe (its Algorithm 2) and the authors' code by projected gradient steps; both stop
after a fixed number of iterations, which on badly scaled, conflicting gradients (norms 100x apart, cosines near -1)
leaves the update percents away from the minimum-norm point. mmlit solves the problem exactly instead, with Wolfe's
minimum-norm-point algorithm (Wolfe 1976, "Finding the nearest point in a polytope"), an active-set method that ends
in at most a few passes per task at the optimum (to float64 rounding).

MGDA-UB, the paper's cheaper variant, takes gradients with respect to a representation shared by every task on the
same input. In mmlit each task has its own batch, so there is no such shared representation; the gradients are
taken on the shared parameters, which is the exact MGDA that MGDA-UB bounds.

Gradient normalisation (``normalization``) is not part of the paper: the authors' code offers it ("not included in
the paper") as ``l2`` (unit norms), ``loss`` (divided by the loss), ``loss+`` (both) or ``none``, solves on the
normalised gradients, and applies the weights to the raw losses, so the update is ``sum_t w_t g_t``
(``weights_on: raw``). LibMTL applies them to the normalised gradients, ``sum_t w_t g_t / s_t``
(``weights_on: normalized``, mmlit's default). With ``none`` the two are the same. Under ``l2`` and ``loss+`` a task
whose gradient is zero has no direction to normalise: it takes weight 0 and the others are solved without it (any
update leaves its loss unchanged to first order).
"""

from __future__ import annotations

from typing import Literal

import torch

from mmlit.objectives.base import Objective, gram
from mmlit.registry import register_objective

__all__ = ["MGDA", "min_norm_weights"]


def _affine_minimum(g: torch.Tensor) -> torch.Tensor:
    """The weights ``v`` (summing to 1, of any sign) of the minimum-norm point of the affine hull of the points whose
    Gram matrix is ``g`` (S, S): the solution of ``[[g, 1], [1^T, 0]] [v, mu] = [0, 1]``."""
    s = g.shape[0]
    kkt = torch.ones(s + 1, s + 1, dtype=g.dtype)
    kkt[:s, :s], kkt[s, s] = g, 0.0
    rhs = torch.zeros(s + 1, dtype=g.dtype)
    rhs[s] = 1.0
    return torch.linalg.lstsq(kkt, rhs[:, None]).solution[:s, 0]  # (lstsq: points that are nearly dependent)


def min_norm_weights(g: torch.Tensor, tolerance: float = 1e-12) -> torch.Tensor:
    """The weights ``w`` on the simplex minimising ``||sum_t w_t p_t||^2`` (T,), given the Gram matrix ``g`` (T, T) of
    the points ``p_t``, by Wolfe's minimum-norm-point algorithm.

    A major cycle adds the point most opposed to the current point ``x`` while ``x . x - min_t x . p_t`` exceeds
    ``tolerance`` times the largest squared norm; minor cycles move to the minimum of the affine hull of the chosen
    points, dropping points whose weight would turn negative. The result satisfies the optimality conditions
    (``x . p_t >= x . x`` for every ``t``) to that tolerance."""
    g = g.double()
    n = g.shape[0]
    scale = float(g.diagonal().max()) if n else 0.0
    if n == 0 or scale <= 0.0:
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    g = g / scale  # (largest squared norm 1: tolerances are relative)
    w = torch.zeros(n, dtype=torch.float64)
    first = int(torch.argmin(g.diagonal()))
    w[first], support = 1.0, [first]
    for _ in range(10 * n + 10):  # major cycles (finite in exact arithmetic; the cap guards against rounding loops)
        gw = g @ w  # (T,): p_t . x
        j = int(torch.argmin(gw))
        if float(w @ gw - gw[j]) <= tolerance or j in support:
            break
        support.append(j)
        while True:  # minor cycles
            index = torch.tensor(support)
            v = _affine_minimum(g[index][:, index])
            if bool((v > tolerance).all()):
                w.zero_()
                w[index] = v
                break
            current = w[index]
            falling = v <= tolerance  # move from w towards v until the first weight reaches zero
            theta = float((current[falling] / (current[falling] - v[falling]).clamp(min=1e-300)).min().clamp(0.0, 1.0))
            moved = current + theta * (v - current)
            w.zero_()
            kept = moved > tolerance
            w[index[kept]] = moved[kept]
            support = index[kept].tolist()
            w /= w.sum()
    return w


@register_objective("mgda")
class MGDA(Objective):
    """The minimum-norm convex combination of the (normalised) task gradients.

    Args:
        normalization: how each task gradient is scaled before the solver (the authors' code's options; not in the
            paper).
        weights_on: apply the solver's weights to the ``normalized`` gradients (LibMTL) or to the ``raw`` ones (the
            authors' code); the same when ``normalization`` is ``none``.
    """

    uses_gradients = True

    def __init__(self, normalization: Literal["none", "l2", "loss", "loss+"] = "none",
                 weights_on: Literal["normalized", "raw"] = "normalized"):
        super().__init__()
        self.normalization, self.weights_on = normalization, weights_on

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(losses.values())

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, tasks: list[str], step: int) -> torch.Tensor:
        g = gram(grads)
        norms = g.diagonal().clamp(min=0.0).sqrt()
        loss = losses.double().cpu().clamp(min=1e-12)
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.normalization]
        # A zero gradient cannot be scaled to unit norm: it sits out (weight 0) rather than dividing by ~0.
        solved = scale > 0 if self.normalization in ("l2", "loss+") else torch.ones_like(norms, dtype=torch.bool)
        w = torch.zeros_like(norms)
        if solved.any():
            index = solved.nonzero()[:, 0]
            s = scale[index]
            w[index] = min_norm_weights(g[index][:, index] / torch.outer(s, s))
        alpha = w if self.weights_on == "raw" else w / torch.where(solved, scale, 1.0)
        return self._linear(grads, alpha, tasks)
