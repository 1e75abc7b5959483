"""Per-task gradients on the shared parameters, for gradient-based objectives and for the logged gradient statistics.

``TaskGradients`` is what makes a gradient-based objective correct under DDP, mixed precision and gradient
accumulation. The module hands it each micro-batch's task losses in ``backward``: it back-propagates each loss on its
own, moves that task's gradient on the shared parameters into a buffer of its own (summed over micro-batches), and
leaves the head gradients in ``.grad``. When the optimizer is about to step, ``gather`` averages everything over the
DDP ranks in one all-reduce (the task buffers, the task losses and every other gradient), so that the objective gets
the same input on every rank; ``write`` puts the objective's update into the shared parameters' ``.grad``.

DDP's own reducer fires once per parameter per backward pass and cannot serve one pass per task, so it is turned
off for these objectives (``reduce_instead_of_ddp``) and this class reduces instead; ``step`` is the whole gradient
step the module runs before the optimizer steps. Parameters that
no task used keep ``grad = None`` on every rank (the same tasks are present on every rank), so DDP never fails on
them. The gradients it gathers are still multiplied by the fp16 loss scale; the caller divides before the objective
sees them and multiplies again when writing, so that the precision plugin's own unscale and inf check see them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from mmlit.compat.torch import reduce_gradients_manually
from mmlit.objectives.base import Objective, mean_over_ranks

__all__ = ["TaskGradients", "flat_task_gradients", "gradient_statistics"]


def _flat(params: list[nn.Parameter], grads: list[Tensor | None]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for p, g in zip(params, grads)])


class TaskGradients:
    """Per-task gradient buffers of one optimizer step.

    Args:
        shared: returns the shared parameters that train (asked anew each step: a recipe may freeze and unfreeze).
    """

    def __init__(self, shared: Callable[[], list[nn.Parameter]]):
        self.shared = shared
        self.reset()

    def reset(self) -> None:
        self.params: list[nn.Parameter] = []
        self.used: list[bool] = []
        self.grads: dict[str, Tensor] = {}  # task -> (P,), scaled as back-propagated
        self.losses: dict[str, list[Tensor]] = {}

    def backward(self, losses: dict[str, Tensor], scale: Callable[[Tensor], Tensor]) -> None:
        """Back-propagate each task's ``scale(loss)`` on its own; keep its shared-parameter gradient apart."""
        if not self.params:
            self.params = self.shared()
            self.used = [False] * len(self.params)
        saved = [p.grad for p in self.params]  # anything that was there before this step's tasks
        names = list(losses)
        for k, name in enumerate(names):
            for p in self.params:
                p.grad = None
            # Task graphs meet in the backbone's shared pass (tasks on one source) and a module may cache a tensor
            # across calls: keep graphs until the last task (they are all alive anyway: the peak memory does not grow).
            scale(losses[name]).backward(retain_graph=k < len(names) - 1)
            self.used = [u or p.grad is not None for u, p in zip(self.used, self.params)]
            flat = _flat(self.params, [p.grad for p in self.params])
            self.grads[name] = self.grads[name] + flat if name in self.grads else flat
            self.losses.setdefault(name, []).append(losses[name].detach().float())
        for p, g in zip(self.params, saved):
            p.grad = g

    def gather(self, others: list[nn.Parameter]) -> tuple[list[str], Tensor, Tensor]:
        """``(tasks, grads (T, P), losses (T,))`` averaged over ranks. The gradients of ``others`` (every other
        trainable parameter, the same list on every rank) go into the same all-reduce and are written back. A
        parameter that got a gradient on any rank gets the average on every rank (zeros standing in for ranks where
        it got none), as DDP does; one that got none anywhere keeps ``grad = None``."""
        tasks = list(self.grads)
        device = self.grads[tasks[0]].device
        losses = torch.stack([torch.stack(v).mean() for v in self.losses.values()]).to(device)
        used = torch.tensor(self.used + [p.grad is not None for p in others], dtype=torch.float32, device=device)
        flat = mean_over_ranks(torch.cat([torch.stack([self.grads[t] for t in tasks]).reshape(-1), losses,
                                          _flat(others, [p.grad for p in others]), used]))
        n, size = len(tasks), self.grads[tasks[0]].numel()
        grads, losses = flat[:n * size].view(n, size), flat[n * size:n * size + n]
        used = (flat[-len(used):] > 0).tolist()
        self.used = used[:len(self.params)]
        offset = n * size + n
        for p, any_rank in zip(others, used[len(self.params):]):
            if any_rank:
                p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        return tasks, grads, losses

    @staticmethod
    def reduce_instead_of_ddp(wrapper: nn.Module) -> None:
        """Before each training batch: DDP's reducer fires once per parameter per backward pass and cannot serve one
        pass per task, so it is turned off and ``gather`` reduces; DDP still broadcasts buffers (batch-norm
        statistics) from rank 0 before the forward."""
        reduce_gradients_manually(wrapper)

    def step(self, objective: Objective, others: list[nn.Parameter], loss_scale: float, step: int,
             statistics: Callable[[dict[str, Tensor]], None] | None = None) -> bool:
        """The gradient step, just before the optimizer steps: gather over ranks, unscale, check, let ``objective``
        combine the task gradients and write its update (scaled again, for the precision plugin) into ``.grad``.
        Returns False, having written nothing, when a gradient is not finite (the same on every rank: they were
        averaged). ``statistics`` gets the per-task gradient norms and cosines (at logging steps)."""
        if not self.grads:
            raise RuntimeError("no per-task gradients reached the objective: the strategy back-propagated without "
                               "LightningModule.backward")
        tasks, grads, losses = self.gather(others)
        grads = grads / loss_scale  # unscaled before any norm or projection
        finite = torch.isfinite(grads).all()
        for p in others:
            if p.grad is not None:
                finite = finite & torch.isfinite(p.grad).all()
        if not finite:
            return False
        if statistics is not None:
            statistics(gradient_statistics(grads, tasks))
        self.write(objective.combine(grads, losses, tasks, step) * loss_scale)
        return True

    def write(self, update: Tensor | None) -> None:
        """Set the shared parameters' ``.grad`` from the flat ``update`` (P,); ``None`` writes NaN (skip the step)."""
        offset = 0
        for p, used in zip(self.params, self.used):
            if used:
                piece = update[offset:offset + p.numel()] if update is not None else torch.full((p.numel(),), torch.nan)
                p.grad = piece.view_as(p).to(device=p.device, dtype=p.dtype).clone()
            offset += p.numel()


def flat_task_gradients(losses: dict[str, Tensor], params: list[nn.Parameter],
                        scale: Callable[[Tensor], Tensor]) -> Tensor:
    """Each task's gradient on ``params`` (T, P) by ``torch.autograd.grad``, which leaves ``.grad`` and DDP's
    reducer untouched (for the statistics of loss-based objectives); averaged over ranks, still scaled."""
    rows = [_flat(params, torch.autograd.grad(scale(loss), params, retain_graph=True, allow_unused=True))
            for loss in losses.values()]
    return mean_over_ranks(torch.stack(rows))


def gradient_statistics(grads: Tensor, tasks: list[str]) -> dict[str, Tensor]:
    """``grad_norm/{task}`` and ``cosine/{a}:{b}`` (gradient conflict when negative) of the rows of ``grads``."""
    g = grads @ grads.T
    norms = g.diagonal().clamp(min=0).sqrt()
    stats = {f"grad_norm/{name}": norms[i] for i, name in enumerate(tasks)}
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            stats[f"cosine/{a}:{tasks[j]}"] = g[i, j] / (norms[i] * norms[j]).clamp(min=1e-12)
    return stats
