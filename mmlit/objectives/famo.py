"""FAMO, fast adaptive multitask optimization (Liu et al., NeurIPS 2023).

Task logits ``xi`` give weights ``z = softmax(xi)``; the step minimises ``sum_t z_t log L_t / c`` with
``c = sum_t z_t / L_t`` (held constant), so task ``t``'s gradient is weighed by ``z_t / (c L_t)`` and the weights of
a step sum to 1. After each step the logits move so that the tasks' log-losses fall at equal rates: ``xi`` takes an
Adam step (with weight decay ``gamma``) along ``J_softmax(xi)^T delta``, where ``delta_t`` is the fall of
``log L_t``. The paper measures the fall with a second forward pass on the same batch; mmlit compares the loss of
consecutive steps (mean over micro-batches), which needs no extra forward pass. The losses are averaged over the DDP
ranks (an all-reduce of one number per task) before the weights are computed, so a 2-rank run weighs as a 1-rank run
on the whole batch does. Under gradient accumulation each micro-batch is weighed by its own losses (the step's
mean is not known until its last micro-batch). Losses must be non-negative (FAMO assumes a minimum of 0).
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, PeriodLosses, adam_step, mean_over_ranks
from mmlit.registry import register_objective

__all__ = ["FAMO"]

_EPS = 1e-8


@register_objective("famo")
class FAMO(Objective):
    """Loss weights that balance the rate at which each task's log-loss falls.

    Args:
        lr: learning rate of the Adam step on the task logits (0.025 in the paper).
        gamma: weight decay of the task logits (0.01 in the paper's default).
    """

    def __init__(self, lr: float = 0.025, gamma: float = 0.01):
        super().__init__()
        self.lr, self.gamma = lr, gamma

    def bind(self, tasks: list[str]) -> None:
        super().bind(tasks)
        n = len(tasks)
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("adam", torch.zeros(2, n))  # first and second moments
        self.register_buffer("adam_steps", torch.tensor(0))
        self.period_losses = PeriodLosses(n)  # one step per period
        self.register_buffer("previous", torch.full((n,), float("nan")))  # log-loss of the last step with the task

    def _update_logits(self, means: torch.Tensor) -> None:
        present = ~means.isnan()
        log_loss = torch.log(means + _EPS)
        known = present & ~self.previous.isnan()  # tasks with a loss in this period and an earlier one
        delta = torch.where(known, self.previous - log_loss, 0.0)
        self.previous.copy_(torch.where(present, log_loss, self.previous))
        if not bool(known.any()):
            return  # nothing to compare yet; a step whose losses did not change still steps, as the authors' code does
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # J_softmax^T delta, plus weight decay
        self.adam_steps += 1
        self.logits.copy_(adam_step(self.logits, grad, self.adam, self.adam_steps, self.lr))

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        closed = self.period_losses.advance(step)
        if closed is not None:
            self._update_logits(closed)
        index = self.rows(losses, self.logits.device)
        values = torch.stack([loss.float() for loss in losses.values()])  # (T,), this rank
        mean = mean_over_ranks(values.detach().clone())  # (T,), all ranks
        if bool((mean < 0).any()):
            negative = {name: round(float(v), 4) for name, v in zip(losses, mean)}
            raise ValueError(f"model.objective: FAMO weighs log-losses and needs losses >= 0; got {negative}")
        self.period_losses.add(index, mean)
        z = torch.softmax(self.logits, dim=0)[index]
        weights = z / (mean + _EPS)
        weights = weights / weights.sum()  # z_t / (c L_t): the gradient of sum_t z_t log L_t / c
        self.weights.update(zip(losses, weights))
        return (weights * values).sum()
