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

import weakref
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from mmlit.compat.torch import reduce_gradients_manually
from mmlit.objectives.base import Objective, mean_over_ranks

__all__ = ["FeatureGradients", "TaskGradients", "gradient_statistics", "parameter_columns"]


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
             statistics: Callable[[Tensor, list[str]], None] | None = None) -> bool:
        """The gradient step, just before the optimizer steps: gather over ranks, unscale, check, let ``objective``
        combine the task gradients and write its update (scaled again, for the precision plugin) into ``.grad``.
        Returns False, having written nothing, when a gradient is not finite (the same on every rank: they were
        averaged). ``statistics`` gets the unscaled task gradients and their tasks (at logging steps)."""
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
            statistics(grads, tasks)
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


class FeatureGradients:
    """Each task's gradient on the backbone's top parameters, measured inside the training step's own backward pass
    (for the statistics of loss-based objectives).

    Inside ``Backbone.probing``, each task's view of the features its head reads is an alias of its own (the pass
    itself stays shared). The step's backward pass reaches each task loss ``L_t`` first, with the factor ``dL/dL_t``
    that the objective (and the loss scale and the accumulation) gives it, then each alias with that task's gradient
    on the features. There it is back-propagated to ``params`` right away (``torch.autograd.grad``, which leaves
    ``.grad`` and DDP's reducer alone) and divided by the factor afterwards (the gradient of ``L_t`` alone): through
    the fusion and each encoder's top only, while their saved tensors are still there, so the step's pass keeps no
    graph for it (kept, it cost as much as the measurement, in allocations). Each task's row sums over its aliases."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.task: str | None = None  # the task whose head asks the backbone now
        self.tasks: list[str] = []  # the step's tasks, in the order of its losses (the same on every rank)
        self.aliases: list[Tensor] = []  # the aliased tensors, alive for the backward pass (hooks hold weak references)
        self.factors: dict[str, Tensor] = {}
        self.sums: dict[str, Tensor] = {}

    def __call__(self, features):
        """``Backbone.probing``'s probe: ``features`` with each tensor that trains replaced by an alias of the task's."""
        encoded = {name: self._watched(e) for name, e in features.encoded.items()}
        return type(features)(encoded, self._watched(features.fused) if features.fused is not None else None)

    def _watched(self, encoded):
        return type(encoded)(*(self._alias(t) for t in encoded[:2]), *encoded[2:])

    def _alias(self, tensor: Tensor | None) -> Tensor | None:
        if tensor is None or not tensor.requires_grad or self.task is None:  # (None: a task measured ``direct``ly)
            return tensor
        alias = tensor.view_as(tensor)
        # (the pass back starts from the aliased tensor: from the alias, it would run this hook again)
        alias.register_hook(partial(_measure, weakref.ref(tensor), self.task, self.params, self.factors, self.sums))
        self.aliases.append(tensor)
        return alias

    def watch(self, losses: dict[str, Tensor]) -> None:
        """Keep ``dL/dL_t`` of each task loss when the step's backward pass reaches it."""
        self.tasks = list(losses)
        for name, loss in losses.items():
            if loss.requires_grad:
                loss.register_hook(partial(_keep, self.factors, name))

    def direct(self, losses: dict[str, Tensor], scale: Callable[[Tensor], Tensor], loss_scale: float) -> None:
        """The rows of tasks whose heads run an encoder's layers themselves (``Task.reads_backbone_outputs`` False),
        before the step's backward pass: each loss, scaled as it will be, back to ``params`` (``autograd.grad``)."""
        for name, loss in losses.items():
            if loss.requires_grad:
                grads = torch.autograd.grad(scale(loss), self.params, retain_graph=True, allow_unused=True)
                self.sums[name] = _flat(self.params, list(grads)) / loss_scale

    def rows(self) -> Tensor:
        """(T, P): each task's gradient on ``params`` (zeros where it has none), this rank's, after the backward pass."""
        zeros = _flat(self.params, [None] * len(self.params))
        return torch.stack([self.sums.get(name, zeros) for name in self.tasks])


def _keep(store: dict, key, grad: Tensor) -> None:
    store[key] = grad.detach()


def _measure(aliased: weakref.ref, task: str, params: list[nn.Parameter], factors: dict[str, Tensor],
             sums: dict[str, Tensor], grad: Tensor) -> None:
    """A task's gradient on an alias: its part of the task's gradient on ``params``, back-propagated now from the
    aliased tensor."""
    tensor, factor = aliased(), factors.get(task)
    if tensor is None or factor is None:
        return
    # Back-propagated as it came (an fp16 loss scale keeps small values from underflowing), divided afterwards in
    # float32; a task weighted 0 at this step has no gradient here to measure: NaN, not a zero that reads as one.
    grads = torch.autograd.grad(tensor, params, grad.detach(), retain_graph=True, allow_unused=True)
    flat = _flat(params, list(grads)) / torch.where(factor == 0, torch.nan, factor.float())
    sums[task] = sums[task] + flat if task in sums else flat


def parameter_columns(params: list[nn.Parameter], chosen: list[nn.Parameter]) -> Tensor:
    """The positions of ``chosen``'s values in a flat vector of ``params`` (``_flat``'s order)."""
    wanted, offset, columns = {id(p) for p in chosen}, 0, []
    for p in params:
        if id(p) in wanted:
            columns.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long)


def gradient_statistics(grads: Tensor, tasks: list[str]) -> dict[str, Tensor]:
    """``grad_norm/{task}`` and ``cosine/{a}:{b}`` (gradient conflict when negative) of the rows of ``grads``."""
    g = grads @ grads.T
    norms = g.diagonal().clamp(min=0).sqrt()
    stats = {f"grad_norm/{name}": norms[i] for i, name in enumerate(tasks)}
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            stats[f"cosine/{a}:{tasks[j]}"] = g[i, j] / (norms[i] * norms[j]).clamp(min=1e-12)
    return stats
