"""Callbacks that watch each training step of a ``MultiTaskModule`` (it adds them itself, ``configure_callbacks``):
a non-finite loss stops every rank together (one batch later: the host does not wait for the device to know), each
task's gradient statistics are logged (not under FSDP), and a parameter that plain DDP could not reduce is named at
the first step."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from mmlit.distributed import rank_flags
from mmlit.fsdp import shards_parameters

__all__ = ["GradientStatistics", "NonFiniteLoss", "UnusedParameters", "log_objective"]


class NonFiniteLoss(pl.Callback):
    """A non-finite loss on any rank stops the fit on every rank (a rank that raised alone would leave the others
    waiting in their next collective), naming each task's loss; no checkpoint holds an update from it.

    The host never waits for the device here: each batch's verdict travels as a flag of the trainer's ``RankFlags``
    (one small all-reduce, started at the batch's end and read at the next batch's end), so every rank stops one batch
    after the non-finite loss, together. That loss's update is not applied: its gradients are not finite, and
    ``ObjectiveUpdate`` skips such a step on every rank."""

    def __init__(self):
        self._sent: tuple[int, dict[str, torch.Tensor]] | None = None  # the step and task losses of the last flag sent
        self._current: tuple[int, dict[str, torch.Tensor]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            rank_flags(trainer).register("non_finite_loss")
            self._sent = self._current = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        rank_flags(trainer).raise_flag("non_finite_loss", ~torch.isfinite(loss))
        losses = pl_module.update.losses or {}
        self._current = (trainer.global_step, {name: value.detach() for name, value in losses.items()})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._check(rank_flags(trainer).exchange(trainer.fit_loop.total_batch_idx))
        self._sent, self._current = self._current, None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(rank_flags(trainer).finish())  # the last batch's flag

    def _check(self, raised: frozenset[str]) -> None:
        if "non_finite_loss" not in raised:
            return
        step, losses = self._sent or (None, {})
        values = ", ".join(f"train/{n}/loss={v.item():.4g}" for n, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {step} on at least one rank (here: {values}); its update "
                                 f"was skipped, so no checkpoint holds it. Lower the learning rate or check the data "
                                 f"of the task(s) with a non-finite loss.")


class GradientStatistics(pl.Callback):
    """At each logging step (``trainer.log_every_n_steps``), each task's gradient norm on the backbone's top
    (``train/objective/grad_norm/{task}``) and the cosine between two tasks' gradients there
    (``train/objective/cosine/{a}:{b}``; negative: they conflict), averaged over ranks and unscaled.

    The top is ``Backbone.top_parameters``: each encoder's last block with what follows it (a final norm), or an
    encoder without repeated blocks whole, and the fusion. GradNorm measures task gradients on the last shared layer
    for the same reason: they are what the heads pull on, and measuring them costs a fraction of a backward pass. A
    gradient-based objective has every task's gradient already and the statistics take its top columns; a loss-based
    one gets each task's gradient on the features its head reads from the step's own backward pass and back-propagates
    it through the top alone (``FeatureGradients``): 1.4-1.6% of the training time at a logging interval of 10 steps
    (``tools/bench_train.py``'s case e, docs/benchmarks.md), where one more backward pass per task through the whole
    backbone had cost 12%. A head that runs an encoder's layers itself (``Task.reads_backbone_outputs`` False: prefix
    LM, VLM) has its loss back-propagated to the top on its own instead. Another task weighted 0 at a step: NaN.
    Off under FSDP: a rank holds shards of the parameters, and ``autograd.grad`` reaches only whole ones."""

    def __init__(self):
        self.enabled = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.enabled = not shards_parameters(trainer.strategy)
        if not self.enabled and stage == "fit":
            rank_zero_info(f"gradient statistics (train/objective/grad_norm/*, cosine/*) are off under "
                           f"{type(trainer.strategy).__name__}: per-task gradients of sharded parameters are not "
                           f"measured (model.gradient_statistics: false turns them off without this line)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not self.enabled:
            return
        every = trainer.log_every_n_steps
        logging = every > 0 and (trainer.global_step + 1) % every == 0
        # A loss-based objective measures them on the step's first micro-batch (from its backward pass); a
        # gradient-based one when it steps, after the last: the flag holds for every micro-batch of that step.
        once = pl_module.update.task_gradients is not None or batch_idx % trainer.accumulate_grad_batches == 0
        pl_module.update.want_statistics = logging and once

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        update = pl_module.update
        if update.statistics is not None:
            log_objective(pl_module, update.statistics)
            update.statistics = None


def log_objective(pl_module: pl.LightningModule, values: dict) -> None:
    """Log ``values`` under ``train/objective/``."""
    for key, value in values.items():
        pl_module.log(f"train/objective/{key}", torch.as_tensor(value, dtype=torch.float32, device=pl_module.device))


class UnusedParameters(pl.Callback):
    """Plain DDP fails at the next forward, with a message that names no parameter, when one got no gradient: after
    the first backward pass, such parameters are named with the settings that fix it. (FSDP reduces the gradients
    that exist, and every rank leaves the same parameters without one: nothing to check there.)"""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapper = trainer.strategy.model
        if (trainer.global_step == 0 and pl_module.update.task_gradients is None
                and isinstance(wrapper, DistributedDataParallel) and not wrapper.find_unused_parameters):
            unused = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
            if unused:
                raise ValueError(f"trainer.strategy: {len(unused)} parameter(s) got no gradient in the first step "
                                 f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}), which plain DDP "
                                 f"cannot reduce; set trainer.strategy: ddp_find_unused_parameters_true, freeze them, "
                                 f"or use a gradient-based objective (mmlit reduces those gradients itself)")
