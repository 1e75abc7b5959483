"""GradNorm (Chen et al., "GradNorm: gradient normalization for adaptive loss balancing in deep multitask
networks", ICML 2018).

Task weights ``w_t`` (summing to T) are learned so that each weighted gradient norm ``G_t = w_t ||g_t||`` moves
towards ``mean(G) * r_t ** alpha``, where ``r_t`` is the task's loss relative to its first loss, divided by the mean
of those ratios: a task that trains slower gets a larger gradient. The update is ``sum_t w_t g_t``; then ``w`` takes
one Adam step on ``sum_t |G_t - target_t|`` (targets held constant, as in the paper), whose gradient is
``sign(G_t - target_t) ||g_t||``, and is renormalised. Adam (as in LibMTL, where the weights are parameters of the
model's optimiser) makes the step about ``lr`` whatever the gradient norms: a plain gradient step would move a weight
by ``lr ||g_t||``, which with norms of 30-60 drives it to zero in one step. The norms are taken over all shared
parameters (the paper uses the last shared layer; LibMTL also uses all of them), from gradients averaged over ranks.
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, adam_step
from mmlit.registry import register_objective

__all__ = ["GradNorm"]


@register_objective("gradnorm")
class GradNorm(Objective):
    """Loss weights that equalise the tasks' training rates through their gradient norms.

    Args:
        alpha: strength of the pull towards equal training rates (1.5 in the paper).
        lr: Adam's step size on the weights.
    """

    uses_gradients = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025):
        super().__init__()
        self.alpha, self.lr = alpha, lr

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        self.register_buffer("task_weights", torch.ones(len(tasks)))
        self.register_buffer("initial_losses", torch.full((len(tasks),), float("nan")))
        self.register_buffer("adam", torch.zeros(2, len(tasks)))  # Adam's moments of each weight
        self.register_buffer("adam_steps", torch.zeros(len(tasks)))  # steps taken by each weight (tasks may be absent)

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(self.task_weights[self.index[name]] * loss for name, loss in losses.items())

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, tasks: list[str], step: int) -> torch.Tensor:
        index = self.rows(tasks, self.task_weights.device)
        weights = self.task_weights[index].clone()  # (T,)
        update = self._linear(grads, weights, tasks)

        first = self.initial_losses[index]
        self.initial_losses[index] = torch.where(first.isnan(), losses.to(first), first)
        ratio = losses.to(first) / self.initial_losses[index].clamp(min=1e-12)
        norms = grads.norm(dim=1).to(weights)  # (T,)
        weighted = weights * norms
        target = weighted.mean() * (ratio / ratio.mean()) ** self.alpha
        moments = self.adam[:, index]
        self.adam_steps[index] += 1
        stepped = adam_step(weights, torch.sign(weighted - target) * norms, moments, self.adam_steps[index], self.lr)
        self.adam[:, index] = moments
        stepped = stepped.clamp(min=1e-6)
        self.task_weights[index] = stepped * weights.sum() / stepped.sum()  # the present tasks keep their total
        return update
