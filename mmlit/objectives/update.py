"""How a step's task losses become one optimizer step under the objective: mixed-precision scaling, per-task backward
passes for gradient-based objectives, and skipping a step whose gradients are not finite, on every rank together.

A loss-based objective's loss is back-propagated as usual (DDP reduces the gradients). A gradient-based objective
gets each task's gradient on the backbone instead: ``backward`` runs once per task, and just before the optimizer
steps (inside the precision plugin's step, after the last micro-batch's backward and before it unscales, clips and
steps) the per-task gradients are averaged over ranks, unscaled and combined (``TaskGradients``). A step whose
gradients are not finite is skipped on every rank together: by the fp16 GradScaler (which also lowers its scale), or
here under bf16 and fp32 (``train/objective/skipped_steps`` and a warning), also under FSDP, where each rank holds a
shard of the gradients. Gradient-based objectives under FSDP are refused (``check``): combining per-task gradients
there needs their Gramian over every rank's shards.
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mmlit.compat.lightning import ddp_finds_unused_parameters, grad_scaler
from mmlit.data.mixing import AllTasks
from mmlit.distributed import reduce_over_ranks
from mmlit.fsdp import shards_parameters
from mmlit.objectives.base import Objective
from mmlit.objectives.task_gradients import TaskGradients, flat_task_gradients, gradient_statistics
from mmlit.registry import get_objective, list_objectives

__all__ = ["ObjectiveUpdate"]


def _finite(module: nn.Module) -> bool:
    """Whether every gradient of ``module`` is finite, the same answer on every rank: under DDP every rank holds the
    reduced gradients; under FSDP each holds a shard of them, so the ranks' answers are combined."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    bad = torch.tensor(0.0 if torch.isfinite(torch.nn.utils.get_total_norm(local)) else 1.0, device=local[0].device)
    return reduce_over_ranks(bad, "max").item() == 0


class ObjectiveUpdate:
    """The gradient step of a ``MultiTaskModule`` under its objective.

    Args:
        objective: the bound objective.
        shared: returns the shared (backbone) parameters that train, asked anew each step.
    """

    def __init__(self, objective: Objective, shared: Callable[[], list[nn.Parameter]]):
        self.objective, self.shared = objective, shared
        self.task_gradients = TaskGradients(shared) if objective.uses_gradients else None
        self.skipped_steps = 0
        self.losses: dict[str, Tensor] | None = None  # this micro-batch's task losses (their graphs alive)
        self.want_statistics = False  # set by the GradientStatistics callback at logging steps
        self.statistics: dict[str, Tensor] | None = None  # the task gradients' norms and cosines, when wanted

    def check(self, trainer, sampler) -> None:
        """Strategy settings the objective needs with the data's task ``sampler`` (None: every task every step),
        checked when a fit starts."""
        strategy = trainer.strategy
        if self.task_gradients is not None and shards_parameters(strategy):
            loss_based = [name for name in list_objectives() if not get_objective(name).uses_gradients]
            raise ValueError(f"model.objective: {type(self.objective).__name__} combines per-task gradients, which "
                             f"under FSDP ({type(strategy).__name__}) needs the tasks' gradient Gramian over the "
                             f"shards of every rank; that is not supported yet. Use trainer.strategy: ddp, or with "
                             f"FSDP a loss-based objective ({', '.join(loss_based)})")
        # Exact types: DeepSpeed and XLA subclass DDPStrategy but back-propagate without LightningModule.backward.
        if self.task_gradients is not None and type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ValueError(f"model.objective: {type(self.objective).__name__} combines per-task gradients, which mmlit "
                             f"supports on one device and with trainer.strategy: ddp, not {type(strategy).__name__}")
        # (FSDP reduces only the gradients that exist, and every rank leaves the same tasks out of a step.)
        if (self.task_gradients is None and trainer.world_size > 1 and sampler is not None
                and not isinstance(sampler, AllTasks) and not ddp_finds_unused_parameters(strategy)
                and not shards_parameters(strategy)):
            raise ValueError(f"data.mixture: {type(sampler).__name__} leaves tasks out of steps, so their heads get no "
                             f"gradient there and DDP would fail; set trainer.strategy: ddp_find_unused_parameters_true "
                             f"(gradient-based objectives reduce gradients themselves and need no setting)")

    def scale(self, trainer, loss: Tensor) -> Tensor:
        scaler = grad_scaler(trainer)
        return scaler.scale(loss) if scaler is not None else loss

    def loss_scale(self, trainer) -> float:
        scaler = grad_scaler(trainer)
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def before_batch(self, trainer) -> None:
        if self.task_gradients is not None:
            self.task_gradients.reduce_instead_of_ddp(trainer.strategy.model)

    def backward(self, trainer) -> None:
        """A gradient-based objective's backward: each task's loss on its own (divided by the accumulation, as
        Lightning divides the loss)."""
        accumulate = trainer.accumulate_grad_batches
        self.task_gradients.backward(self.losses, lambda task_loss: self.scale(trainer, task_loss / accumulate))
        self.losses = None

    def zero_grad(self) -> None:
        if self.task_gradients is not None:
            self.task_gradients.reset()

    def step(self, module, optimizer, optimizer_closure) -> None:
        """The optimizer step, with the objective's combination (or the finite check) inside its closure."""
        trainer = module.trainer

        def closure():
            result = optimizer_closure()
            if self.task_gradients is not None:
                self._combine(module)
            elif grad_scaler(trainer) is None and not _finite(module):  # (the fp16 GradScaler skips steps itself)
                self._skip(module)
            return result

        scaler = grad_scaler(trainer)
        scale = scaler.get_scale() if scaler is not None else None
        optimizer.step(closure=closure)
        if scaler is not None and scaler.get_scale() < scale:
            self.skipped_steps += 1  # the scaler lowers its scale exactly when it skips (early ones are normal)

    def _combine(self, module) -> None:
        shared = {id(p) for p in self.task_gradients.params}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in shared]
        wanted = (lambda stats: setattr(self, "statistics", stats)) if self.want_statistics else None
        if not self.task_gradients.step(self.objective, others, self.loss_scale(module.trainer), module.global_step,
                                        wanted):
            self._skip(module)

    def _skip(self, module) -> None:
        if grad_scaler(module.trainer) is not None:
            self.task_gradients.write(None)  # NaN: the GradScaler skips the step and lowers its scale on every rank
            return
        self.skipped_steps += 1
        for p in module.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        rank_zero_warn(f"non-finite gradients at step {module.global_step}: the step is skipped on every rank "
                       f"({self.skipped_steps} skipped so far)")

    def loss_statistics(self, trainer) -> dict[str, Tensor]:
        """For a loss-based objective: the task gradients' norms and cosines on the shared parameters, from this
        micro-batch's losses (one ``autograd.grad`` per task; the graphs stay for the backward pass)."""
        shared = self.shared()
        if not shared:  # a frozen backbone (a vision-language model's align stage): no task gradient to compare
            return {}
        grads = flat_task_gradients(self.losses, shared, lambda loss: self.scale(trainer, loss))
        return gradient_statistics(grads / self.loss_scale(trainer), list(self.losses))
