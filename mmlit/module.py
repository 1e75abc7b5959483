"""``MultiTaskModule``: the shared backbone, one head per task, and the objective, as a LightningModule."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from mmlit.compile import Compile, compile_modules
from mmlit.data.mixing import AllTasks
from mmlit.models import Backbone
from mmlit.objectives import Objective, StaticWeights
from mmlit.objectives.task_gradients import TaskGradients, flat_task_gradients, gradient_statistics
from mmlit.registry import get_objective
from mmlit.tasks.base import Task, batch_size_of
from mmlit.transfer import layer_decay_groups, load_backbone_weights

__all__ = ["MultiTaskModule"]

_EVAL_STAGES = ("val", "test")


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


class MultiTaskModule(pl.LightningModule):
    """Train one backbone on several tasks.

    A loss-based objective's loss is back-propagated as usual (DDP reduces the gradients). A gradient-based objective
    gets each task's gradient on the backbone instead: ``backward`` runs once per task, and just before the optimizer
    steps (``optimizer_step``, after the last micro-batch and before the precision plugin unscales, clips and steps)
    the per-task gradients are averaged over ranks, unscaled and combined (see ``mmlit/objectives/task_gradients.py``).
    A step whose gradients are not finite is skipped on every rank together (by the fp16 GradScaler, or here).
    At the logging interval, ``train/objective/...`` gets each task's weight, its gradient norm on the backbone and
    the pairwise cosines of the task gradients.

    Args:
        backbone: the shared encoders and fusion.
        tasks: task name -> task; each name is used in logged keys (``train/{name}/loss``).
        objective: combines the task losses (default: static weights of 1); a registered name (``pcgrad``) builds that
            objective with its defaults.
        optimizer: builds the optimizer from the parameters.
        scheduler: builds a learning-rate scheduler, stepped every optimizer step.
        pretrained: start the backbone from this file: an mmlit checkpoint (``.ckpt``) or a backbone file
            (``mmlit export-backbone``'s ``.safetensors``). The parts it holds load strictly, the others
            (e.g. a fusion that the pre-training run did not have) start fresh; task heads never load.
        layer_decay: layer-wise learning-rate decay: each encoder layer trains at ``layer_decay`` times the
            rate of the layer above it; fusion and heads at the full rate (1: off).
        compile: ``torch.compile`` the backbone (block by block, by default) and the heads (see ``mmlit/compile.py``):
            ``true`` with the defaults, or the settings (``{backend: aot_eager}``); checkpoints keep their keys, so
            they load with or without it.
        gradient_statistics: log each task's gradient norm on the backbone and the pairwise cosines at logging steps.
            A loss-based objective pays one extra backward pass per task for them at those steps (about 9% of a
            CPU run's time with ``log_every_n_steps: 10``, measured by ``tools/bench_train.py``); a gradient-based
            one has the gradients already.
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run (``high`` lets float32 matrix products
            use TF32 on GPUs that have it); None leaves it as it is.
    """

    def __init__(self, backbone: Backbone, tasks: dict[str, Task], objective: Objective | str | None = None,
                 optimizer: OptimizerCallable = _default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 pretrained: str | None = None, layer_decay: float = 1.0, compile: bool | Compile | None = False,
                 gradient_statistics: bool = True,
                 matmul_precision: Literal["highest", "high", "medium"] | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        self.backbone, self.layer_decay = backbone, layer_decay
        if pretrained is not None:
            load_backbone_weights(backbone, pretrained)
        for name, task in tasks.items():
            task.name = name
            task.build(backbone)
        self.tasks = nn.ModuleDict(tasks)
        if isinstance(objective, str):
            try:
                objective = get_objective(objective)()
            except KeyError as err:
                raise ValueError(f"model.objective: {err.args[0]}") from None
        self.objective = objective if objective is not None else StaticWeights()
        self.objective.bind(list(tasks))
        self.task_gradients = TaskGradients(self._shared_parameters) if self.objective.uses_gradients else None
        self.skipped_steps, self.gradient_statistics = 0, gradient_statistics
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({name: task.metrics() for name, task in tasks.items()}) for stage in _EVAL_STAGES})
        self.eval_losses = nn.ModuleDict({
            stage: nn.ModuleDict({name: MeanMetric() for name in tasks}) for stage in _EVAL_STAGES})
        self.tokenizer = None  # the data module's, once a stage is set up (decodes predictions)
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        if compile is True:
            compile = Compile()
        if isinstance(compile, Compile):
            parts = [p for p in (backbone.image_encoder, backbone.text_encoder, backbone.fusion) if p is not None]
            heads = [child for task in tasks.values() for child in task.children() if any(True for _ in child.parameters())]
            compile_modules(parts, heads, compile)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and tokenizer.get_vocab_size() > self.backbone.vocab_size:
            raise ValueError(
                f"model.backbone's vocab_size (its text_encoder's, or its own without one) is {self.backbone.vocab_size}, but "
                f"data.tokenizer has {tokenizer.get_vocab_size()} tokens; raise vocab_size to at least that")
        self.tokenizer = tokenizer
        for task in self.tasks.values():
            task.setup(tokenizer)
        if stage != "fit":
            return
        strategy = self.trainer.strategy
        # Exact types: DeepSpeed and XLA subclass DDPStrategy but back-propagate without LightningModule.backward.
        if self.objective.uses_gradients and type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ValueError(f"model.objective: {type(self.objective).__name__} combines per-task gradients, which mmlit "
                             f"supports on one device and with trainer.strategy: ddp, not {type(strategy).__name__}")
        sampler = getattr(datamodule, "sampler", None)
        if (not self.objective.uses_gradients and self.trainer.world_size > 1 and sampler is not None
                and not isinstance(sampler, AllTasks) and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters")):
            raise ValueError(f"data.mixture: {type(sampler).__name__} leaves tasks out of steps, so their heads get no "
                             f"gradient there and DDP would fail; set trainer.strategy: ddp_find_unused_parameters_true "
                             f"(gradient-based objectives reduce gradients themselves and need no setting)")

    def _shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _scale(self, loss: torch.Tensor) -> torch.Tensor:
        scaler = self._grad_scaler()
        return scaler.scale(loss) if scaler is not None else loss

    def _loss_scale(self) -> float:
        scaler = self._grad_scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _logging_step(self) -> bool:
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _log_objective(self, values: dict) -> None:
        for key, value in values.items():
            self.log(f"train/objective/{key}", torch.as_tensor(value, dtype=torch.float32, device=self.device))

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        losses = {}
        with self.backbone.shared_pass():  # tasks on one source: each image encoded once, every head reads it
            for name, task_batch in batch.items():
                losses[name] = self.tasks[name](self.backbone, task_batch)["loss"]
                self.log(f"train/{name}/loss", losses[name], batch_size=batch_size_of(task_batch))
        loss = self.objective(losses, self.global_step)
        # Decided over all ranks, so that every rank raises (a rank that raised alone would leave the others waiting).
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.device)
        if self.trainer.strategy.reduce(bad, reduce_op="sum") > 0:
            values = ", ".join(f"train/{n}/loss={v.item():.4g}" for n, v in losses.items())
            raise FloatingPointError(f"non-finite loss at step {self.global_step} on at least one rank (here: {values}); "
                                     f"the last checkpoint is untouched. Lower the learning rate or check the data of "
                                     f"the task(s) with a non-finite loss.")
        self.log("train/loss", loss, prog_bar=True)
        if self.task_gradients is not None:
            self._step_losses = losses  # back-propagated one task at a time by ``backward``
        else:
            self._log_objective(self.objective.state())
            if (self.gradient_statistics and self._logging_step()
                    and batch_idx % self.trainer.accumulate_grad_batches == 0):  # once per step
                grads = flat_task_gradients(losses, self._shared_parameters(), self._scale)
                self._log_objective(gradient_statistics(grads / self._loss_scale(), list(losses)))
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.task_gradients is not None:
            self.task_gradients.reduce_instead_of_ddp(self.trainer.strategy.model)

    def on_after_backward(self) -> None:
        wrapper = self.trainer.strategy.model
        if (self.global_step == 0 and self.task_gradients is None and isinstance(wrapper, DistributedDataParallel)
                and not wrapper.find_unused_parameters):
            # Plain DDP fails at the next forward, with a message that names no parameter, when one got no gradient.
            unused = [n for n, p in self.named_parameters() if p.requires_grad and p.grad is None]
            if unused:
                raise ValueError(f"trainer.strategy: {len(unused)} parameter(s) got no gradient in the first step "
                                 f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}), which plain DDP cannot "
                                 f"reduce; set trainer.strategy: ddp_find_unused_parameters_true, freeze them, or use a "
                                 f"gradient-based objective (mmlit reduces those gradients itself)")

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.task_gradients is None:
            return super().backward(loss, *args, **kwargs)
        accumulate = self.trainer.accumulate_grad_batches  # Lightning divides the loss by it; so does this
        self.task_gradients.backward(self._step_losses, lambda task_loss: self._scale(task_loss / accumulate))
        self._step_losses = None

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        if self.task_gradients is not None:
            self.task_gradients.reset()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        def closure():
            # Runs inside the precision plugin, after the last micro-batch's backward and before it unscales the
            # gradients, clips them and steps.
            result = optimizer_closure()
            if self.task_gradients is not None:
                self._combine_task_gradients()
            elif self._grad_scaler() is None:  # the fp16 GradScaler skips non-finite steps itself
                grads = [p.grad for p in self.parameters() if p.grad is not None]
                if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                    self._skip_step()  # gradients were reduced by DDP: every rank decides alike
            return result

        scaler = self._grad_scaler()
        scale = scaler.get_scale() if scaler is not None else None
        optimizer.step(closure=closure)
        if scaler is not None and scaler.get_scale() < scale:
            self.skipped_steps += 1  # the scaler lowers its scale exactly when it skips (early ones are normal)
        self.log("train/objective/skipped_steps", float(self.skipped_steps))

    def _skip_step(self) -> None:
        if self._grad_scaler() is not None:
            self.task_gradients.write(None)  # NaN: the GradScaler skips the step and lowers its scale on every rank
            return
        self.skipped_steps += 1
        for p in self.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        rank_zero_warn(f"non-finite gradients at step {self.global_step}: the step is skipped on every rank "
                       f"({self.skipped_steps} skipped so far)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmlit_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("mmlit_skipped_steps", 0)

    def _combine_task_gradients(self) -> None:
        shared = {id(p) for p in self.task_gradients.params}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in shared]
        statistics = self._log_objective if self.gradient_statistics and self._logging_step() else None
        if not self.task_gradients.step(self.objective, others, self._loss_scale(), self.global_step, statistics):
            self._skip_step()
            return
        self._log_objective(self.objective.state())

    def _eval_step(self, stage: str, batch: dict[str, dict]) -> None:
        with self.backbone.shared_pass():
            for name, task_batch in batch.items():
                task = self.tasks[name]
                outputs = task(self.backbone, task_batch)
                task.update_metrics(self.metrics[stage][name], outputs, task_batch)
                if "loss" in outputs:  # (a batch of an evaluation source, zero-shot images, may have none)
                    self.eval_losses[stage][name].update(outputs["loss"], weight=batch_size_of(task_batch))

    def _eval_epoch_end(self, stage: str) -> None:
        # A metric's compute() syncs across ranks, so every rank computes the same metrics in the same order: those
        # that some rank updated (summed in one all-reduce). A task no batch reached (no shards for this split, or
        # the sanity check stopped before it), or a metric of a source without shards here (zero-shot), is left out.
        parts = [(name, key, metric) for name in self.tasks
                 for key, metric in [("loss", self.eval_losses[stage][name]),
                                     *self.metrics[stage][name].items(keep_base=True, copy_state=False)]]
        counts = torch.tensor([float(metric.update_count) for _, _, metric in parts], device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum") if self._trainer is not None else counts
        values = {}
        for (name, key, metric), count in zip(parts, counts.tolist()):
            if count:
                value = metric.compute()  # a metric may give several values (recall@1, @5, ... both ways)
                named = value if isinstance(value, dict) else {key: value}
                values.update({f"{stage}/{name}/{k}": v for k, v in named.items()})
            metric.reset()
        self.log_dict({k: v for k, v in values.items() if torch.isfinite(v)}, sync_dist=False)

    def validation_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list[dict]]:
        """Each task's prediction rows for its batch (``Task.predict``); ``PredictionWriter`` writes them."""
        rows = {}
        with self.backbone.shared_pass():
            for name, task_batch in batch.items():
                rows[name] = self.tasks[name].predict(self.tasks[name](self.backbone, task_batch), task_batch,
                                                      self.tokenizer)
        return rows

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        if self.layer_decay == 1.0:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            optimizer = self.optimizer_factory(layer_decay_groups(self.backbone, list(self.named_parameters()),
                                                                  self.layer_decay))
            for group in optimizer.param_groups:
                group["lr"] *= group["lr_scale"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if self.layer_decay != 1.0:
            _keep_lr_scales(optimizer, scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _keep_lr_scales(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Schedulers that scale each group's initial rate keep the layer-decay ratios; OneCycleLR sets every group
    from one ``max_lr``, so its per-group rates are scaled here. Any other scheduler that loses the ratios is an
    error rather than a silent full-rate run."""
    groups = optimizer.param_groups
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        for group in groups:
            for key in ("initial_lr", "max_lr", "min_lr"):
                group[key] *= group["lr_scale"]
            group["lr"] = group["initial_lr"]
    top = max(groups, key=lambda g: g["lr_scale"])
    for group in groups:
        expected = top["lr"] * group["lr_scale"] / top["lr_scale"]
        if abs(group["lr"] - expected) > 1e-6 * max(abs(expected), 1e-12):
            raise ValueError(f"model.layer_decay: {type(scheduler).__name__} sets every parameter group's learning "
                             "rate itself, so the layer-wise decay would be lost; use OneCycleLR or a scheduler that "
                             "scales each group's initial rate (LambdaLR, CosineAnnealingLR, LinearLR, ...)")
