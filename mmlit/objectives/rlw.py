"""Random loss weighting (Lin et al., "Reasonable effectiveness of random weighting: a litmus test for multi-task
learning", TMLR 2022; arXiv 2111.10603, 2021).

Each step draws ``z ~ N(0, I)`` and weighs the losses by ``softmax(z)``. The draw depends on (seed, step) only, so
every DDP rank and every micro-batch of a step uses the same weights, and a resumed run draws what the uninterrupted
one would have.
"""

from __future__ import annotations

import torch

from mmlit.objectives.base import Objective, step_generator
from mmlit.registry import register_objective

__all__ = ["RandomWeighting"]


@register_objective("rlw")
class RandomWeighting(Objective):
    """Random weights from a softmax over standard normal draws, new each step.

    Args:
        seed: seeds the draws (with the step).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def forward(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        # Drawn over the tasks present, so the weights of a step always sum to 1.
        weights = torch.softmax(torch.randn(len(losses), generator=step_generator(self.seed, step)), dim=0)
        self.weights.update(zip(losses, weights))
        return sum(w.to(loss.device) * loss for w, loss in zip(weights, losses.values()))
