"""The objective interface: how the per-task losses of a step become one update.

Two kinds share it, and adding a method is one file with one registered class:

- a **loss-based** objective (static, uncertainty, DWA, RLW, FAMO) implements ``forward(losses, step)`` and returns
  the loss that is back-propagated;
- a **gradient-based** objective (GradNorm, PCGrad, CAGrad, MGDA) sets ``uses_gradients = True`` and implements
  ``combine(grads, losses, tasks, step)``: it receives each task's gradient on the shared (backbone) parameters and
  returns the gradient applied to them. Its ``forward`` returns the loss logged as ``train/loss``. Each head gets its
  own task's gradient, unweighted (the LibMTL convention).

What ``combine`` can rely on (``mmlit/objectives/task_gradients.py`` makes it so): one row per task present in the
step, row ``i`` belonging to ``tasks[i]``; float32; unscaled (fp16 GradScaler); finite; summed over the micro-batches of gradient
accumulation, each divided by their number as Lightning does; averaged over the DDP ranks. The input is therefore the
same on every rank, and every rank computes the same update. Randomness comes from ``step_generator(seed, step)``.

``weights`` holds each task's effective weight (its coefficient in the update), logged under
``train/objective/weight/{task}`` with whatever else ``state()`` returns.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mmlit.distributed import reduce_over_ranks
from mmlit.seeds import torch_generator

__all__ = ["Objective", "PeriodLosses", "adam_step", "gram", "mean_over_ranks", "step_generator"]


class Objective(nn.Module):
    """Combine ``{task: loss}`` (and, for gradient-based methods, per-task gradients) into one update."""

    uses_gradients: ClassVar[bool] = False
    objective_name: ClassVar[str]  # set by @register_objective

    def bind(self, tasks: list[str]) -> None:
        """Called once with the recipe's task names, before any step; buffers sized by the tasks are made here."""
        self.task_names = list(tasks)
        self.index = {name: i for i, name in enumerate(tasks)}
        self.weights: dict[str, Tensor | float] = {name: 1.0 for name in tasks}

    def rows(self, names, device: torch.device | None = None) -> Tensor:
        """The positions of ``names`` among the bound tasks, for indexing per-task buffers (T,)."""
        return torch.tensor([self.index[name] for name in names], device=device)

    def forward(self, losses: dict[str, Tensor], step: int) -> Tensor:
        """The loss of this step (back-propagated by loss-based methods); ``losses`` has the tasks present."""
        raise NotImplementedError

    def combine(self, grads: Tensor, losses: Tensor, tasks: list[str], step: int) -> Tensor:
        """Gradient-based methods: ``grads`` (T, P) and ``losses`` (T,) of the ``tasks`` present -> gradient (P,)."""
        raise NotImplementedError(f"{type(self).__name__} is loss-based; it does not combine gradients")

    def state(self) -> dict[str, Tensor | float]:
        """Scalars logged under ``train/objective/...`` at the logging interval."""
        return {f"weight/{name}": value for name, value in self.weights.items()}

    def _linear(self, grads: Tensor, alpha: Tensor, tasks: list[str]) -> Tensor:
        """The update ``sum_t alpha_t g_t`` (P,), recording each ``alpha_t`` as the task's effective weight."""
        alpha = alpha.to(device=grads.device, dtype=grads.dtype)
        self.weights.update({name: a for name, a in zip(tasks, alpha.detach())})
        return alpha @ grads


class PeriodLosses(nn.Module):
    """Each task's loss averaged over a period of ``period`` optimizer steps (and over micro-batches), for methods
    that weigh by how losses change from one period to the next (DWA, FAMO). ``add`` takes losses already averaged
    over the DDP ranks, so the buffers hold the same on every rank (DDP copies buffers from rank 0 anyway)."""

    def __init__(self, tasks: int, period: int = 1):
        super().__init__()
        self.period = period
        self.register_buffer("sums", torch.zeros(2, tasks))  # (loss sum, count) of the current period
        self.register_buffer("current", torch.tensor(-1))

    def advance(self, step: int) -> Tensor | None:
        """At the first call of a new period: the closed period's means (T,), NaN for tasks absent from it (``None``
        before the first period); otherwise ``None``."""
        period = step // self.period
        if period == int(self.current):
            return None
        closed = None
        if int(self.current) >= 0:
            closed = torch.where(self.sums[1] > 0, self.sums[0] / self.sums[1].clamp(min=1e-12), torch.nan)
        self.sums.zero_()
        self.current.fill_(period)
        return closed

    def add(self, rows: Tensor, losses: Tensor) -> None:
        """Add the all-rank mean ``losses`` (T,) of the tasks at ``rows`` to the current period."""
        self.sums[0, rows] += losses
        self.sums[1, rows] += 1


def adam_step(value: Tensor, grad: Tensor, moments: Tensor, steps: Tensor | int, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """One Adam step (Kingma & Ba 2015, as ``torch.optim.Adam`` takes it) on the weights of an objective:
    ``moments`` (2, N) holds the first and second moments and is updated in place, ``steps`` counts the steps taken,
    this one included (a number, or a tensor of N counts); returns the new ``value`` (N,). Methods whose weights are
    learnt by Adam in their authors' code (FAMO's logits, GradNorm's weights) step with it: the step is about ``lr``
    whatever the scale of the gradient."""
    moments[0].mul_(betas[0]).add_((1 - betas[0]) * grad)
    moments[1].mul_(betas[1]).add_((1 - betas[1]) * grad * grad)
    steps = torch.as_tensor(steps, dtype=moments.dtype)
    m_hat, v_hat = moments[0] / (1 - betas[0] ** steps), moments[1] / (1 - betas[1] ** steps)
    return value - lr * m_hat / (v_hat.sqrt() + eps)


def gram(grads: Tensor, chunk: int = 1 << 22) -> Tensor:
    """``G[i, j] = g_i . g_j`` (T, T), accumulated in float64 (also where TF32 matmuls are allowed) and returned on
    the CPU: the methods of this package need only these inner products, and their small loops then run without a
    device synchronisation per comparison. Chunks bound the float64 copy's memory."""
    g = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for part in grads.split(chunk, dim=1):
        part = part.double()
        g += part @ part.T
    return g.cpu()


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the DDP ranks in place (and return it); every rank must call it at the same point.

    Per-rank statistics must not live in module buffers between steps: DDP copies every buffer from rank 0 before
    each forward. Reduce the values first, as DWA and FAMO do, so that their buffers hold the same on every rank."""
    return reduce_over_ranks(tensor, "mean")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends on (seed, step) only, so every rank draws the same numbers in a step."""
    return torch_generator("objective", seed, step)
