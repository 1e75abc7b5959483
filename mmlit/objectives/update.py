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

The host does not wait for the device to skip a loss-based objective's step: the verdict stays a device tensor,
handed to an optimizer that skips its own step where it is set (torch's fused Adam, AdamW and SGD read
``found_inf``, as torch's GradScaler hands it to them; ``mmlit.optim`` builds them fused where the trainer allows),
and the skipped steps are counted on the device, read at logging steps. Another optimizer keeps the read: its step
is skipped by taking the gradients away, after the host has read the verdict (the log says so once).
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mmlit.compat.lightning import ddp_finds_unused_parameters, grad_scaler
from mmlit.data.mixing import AllTasks
from mmlit.distributed import reduce_over_ranks
from mmlit.fsdp import shards_parameters
from mmlit.objectives.base import Objective, mean_over_ranks
from mmlit.objectives.task_gradients import (
    FeatureGradients, TaskGradients, gradient_statistics, parameter_columns,
)
from mmlit.optim import skips_on_device
from mmlit.registry import get_objective, list_objectives

__all__ = ["ObjectiveUpdate"]


def _non_finite(module: nn.Module) -> Tensor | None:
    """1.0 where some gradient of ``module`` is not finite, else 0.0 (None without gradients): a device tensor that
    nothing reads, the same on every rank. Under DDP every rank holds the reduced gradients; under FSDP each holds a
    shard of them, so the ranks' verdicts are max-reduced, on the device too."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    sharded = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    bad = (~torch.isfinite(torch.nn.utils.get_total_norm(local))).float()
    return reduce_over_ranks(bad, "max") if sharded else bad


class ObjectiveUpdate:
    """The gradient step of a ``MultiTaskModule`` under its objective.

    Args:
        objective: the bound objective.
        shared: returns the shared (backbone) parameters that train, asked anew each step.
        top: returns those of them that the gradient statistics measure (``Backbone.top_parameters``).
    """

    def __init__(self, objective: Objective, shared: Callable[[], list[nn.Parameter]],
                 top: Callable[[], list[nn.Parameter]]):
        self.objective, self.top = objective, top
        self.task_gradients = TaskGradients(shared) if objective.uses_gradients else None
        self._skipped = 0  # steps skipped and counted on the host (by the fp16 scaler; after reading the verdict)
        self._found: Tensor | None = None  # (2,) on the device: steps the optimizer skipped itself, and the last one
        self._reported = 0  # of those, the ones already warned about
        self._said = False  # whether the log has said that the optimizer makes every step read the verdict
        self.losses: dict[str, Tensor] | None = None  # this micro-batch's task losses (their graphs alive)
        self.want_statistics = False  # set by the GradientStatistics callback at logging steps
        self.statistics: dict[str, Tensor] | None = None  # the task gradients' norms and cosines, when wanted
        self.probe: FeatureGradients | None = None  # a loss-based objective's step that measures them

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients (reads the device's count)."""
        return self._skipped + (int(self._found[0]) if self._found is not None else 0)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped, self._found, self._reported = value, None, 0

    def skipped_on(self, device) -> Tensor:
        """``skipped_steps`` as a float tensor on ``device``, for logging without reading it now."""
        counted = torch.full((), float(self._skipped), device=device)
        return counted + self._found[0].to(device) if self._found is not None else counted

    def report(self) -> None:
        """Warn about the steps the optimizer skipped itself since the last report: reads two numbers from the device,
        so it is called at logging steps and at the end of the fit."""
        if self._found is None:
            return
        count, last = self._found.tolist()
        if count > self._reported:
            earlier = f" and {count - self._reported - 1} earlier step(s)" if count - self._reported > 1 else ""
            self._reported = count
            rank_zero_warn(f"non-finite gradients at step {last}{earlier}: skipped on every rank "
                           f"({self._skipped + count} skipped so far)")

    def allows_fused(self, trainer) -> bool:
        """Whether the optimizer may step with a fused kernel under ``trainer``: not with an fp16 loss scaler
        (Lightning would leave the unscaling, which clipping and the objectives need first, to the optimizer's step),
        nor with gradient clipping under mixed precision (Lightning's ``MixedPrecision`` refuses to clip then)."""
        clipping = (trainer.gradient_clip_val or 0) > 0 and isinstance(trainer.precision_plugin, MixedPrecision)
        return grad_scaler(trainer) is None and not clipping

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

    def feature_probe(self) -> FeatureGradients | None:
        """At a step whose statistics a loss-based objective measures: the probe that the backbone's features go
        through (``Backbone.probing``); None otherwise."""
        top = self.top() if self.want_statistics and self.task_gradients is None else []
        self.probe = FeatureGradients(top) if top else None
        return self.probe

    def measure_direct(self, trainer, losses: dict[str, Tensor]) -> None:
        """Before the step's backward pass: the statistics' rows of tasks whose heads run an encoder's layers."""
        if losses:
            self.probe.direct(losses, lambda loss: self.scale(trainer, loss), self.loss_scale(trainer))

    def measure(self) -> None:
        """After the step's backward pass, in which ``probe`` measured them: the statistics, averaged over ranks."""
        probe, self.probe = self.probe, None
        self.statistics = gradient_statistics(mean_over_ranks(probe.rows()), probe.tasks)

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
        scaler = grad_scaler(trainer)
        inner = getattr(optimizer, "optimizer", optimizer)  # (inside Lightning's LightningOptimizer)
        on_device = scaler is None and self.task_gradients is None and skips_on_device(inner)
        if scaler is None and self.task_gradients is None and not on_device and not self._said:
            self._said = True
            rank_zero_info(f"model.optimizer: {type(inner).__name__} cannot skip a step on the device (torch's fused "
                           f"Adam and AdamW can, SGD too without FSDP; mmlit fuses them where the trainer allows), so "
                           f"the host reads whether each step's gradients are finite: it waits for the device once "
                           f"per step")

        def closure():
            result = optimizer_closure()
            if self.task_gradients is not None:
                self._combine(module)
            elif scaler is None:  # (the fp16 GradScaler skips steps itself)
                bad = _non_finite(module)
                if on_device and bad is not None:
                    inner.found_inf = bad  # read by the fused step, on the device
                    self._count(bad, module.global_step)
                elif bad is not None and bad.item():
                    self._skip(module)
            return result

        scale = scaler.get_scale() if scaler is not None else None
        try:
            optimizer.step(closure=closure)
        finally:
            if on_device:
                vars(inner).pop("found_inf", None)
        if scaler is not None and scaler.get_scale() < scale:
            self._skipped += 1  # the scaler lowers its scale exactly when it skips (early ones are normal)
        every = trainer.log_every_n_steps
        if every > 0 and module.global_step % every == 0:
            self.report()

    def _count(self, bad: Tensor, step: int) -> None:
        if self._found is None:
            self._found = torch.zeros(2, dtype=torch.long, device=bad.device)
        skipped = bad.long()
        self._found[0] += skipped
        self._found[1] = torch.where(skipped > 0, step, self._found[1])

    def _combine(self, module) -> None:
        shared = {id(p) for p in self.task_gradients.params}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in shared]
        wanted = self._on_top if self.want_statistics else None
        if not self.task_gradients.step(self.objective, others, self.loss_scale(module.trainer), module.global_step,
                                        wanted):
            self._skip(module)

    def _on_top(self, grads: Tensor, tasks: list[str]) -> None:
        """The statistics of a gradient-based objective's task gradients (T, P), on the top parameters."""
        columns = parameter_columns(self.task_gradients.params, self.top()).to(grads.device)
        self.statistics = gradient_statistics(grads[:, columns], tasks)

    def _skip(self, module) -> None:
        if grad_scaler(module.trainer) is not None:
            self.task_gradients.write(None)  # NaN: the GradScaler skips the step and lowers its scale on every rank
            return
        self._skipped += 1
        for p in module.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        rank_zero_warn(f"non-finite gradients at step {module.global_step}: the step is skipped on every rank "
                       f"({self.skipped_steps} skipped so far)")
