"""The task contract: a task is a head (this ``nn.Module``) and a data side (``mmlit.data.TaskData``).

The head lives in the training process: it declares the backbone parts it reads (``modalities``, ``fuses``), builds
its layers from the backbone's sizes (``build``), returns its loss and outputs for a batch (``forward``), keeps its
torchmetrics and writes predictions. It makes its data side from the recipe's arguments in ``__init__`` (``self.data``),
which DataLoader workers receive pickled as it is. Tasks are registered with ``@register_task("name")``; adding one
edits no core file, and tasks do not import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torchmetrics import MetricCollection

from mmlit.data.task_data import Shards, TaskData
from mmlit.registry import get_modality

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.models import Backbone

__all__ = ["Shards", "Task", "TaskData"]


class Task(nn.Module):
    """Base of every task's head. Subclasses set ``modalities`` (the encoders they read) and ``fuses`` (whether they
    read the fusion), pass their data side to ``__init__`` and implement ``build``, ``forward``, ``metrics``,
    ``update_metrics`` and ``predict``.

    Args:
        data: the task's data side (its shards, batch size, fields, prepare and collate).
    """

    task_name: ClassVar[str]  # set by @register_task
    modalities: ClassVar[tuple[str, ...]] = ()  # the backbone encoders the head reads, e.g. ("image", "text")
    fuses: ClassVar[bool] = False  # the head reads the backbone's fusion
    # The head reads the backbone only through ``backbone(...)``: the gradient statistics then take its gradient on
    # those features from the step's backward pass. False for a head that runs an encoder's layers itself (a text
    # decoder, a language model): its statistics take one pass of its loss back to the backbone's top instead.
    reads_backbone_outputs: ClassVar[bool] = True

    def __init__(self, data: TaskData):
        super().__init__()
        self.data = data
        self.name = getattr(self, "task_name", type(self).__name__.lower())
        self.max_length: int | None = None  # the backbone's text length, for generation (set by build)
        self.global_step = 0  # optimizer steps taken (set by the module before each training step): for schedules

    @property
    def name(self) -> str:
        return self.data.name

    @name.setter
    def name(self, value: str) -> None:
        self.data.name = value  # (the data side names the task in its errors)

    @property
    def shards(self) -> Shards:
        return self.data.shards

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

    def build(self, backbone: Backbone) -> None:
        """Check that the backbone has what the task reads (an error names the task and the missing encoder key),
        bind the data side's pipelines to the encoders, then (in subclasses, after ``super().build``) make the head."""
        for modality in self.modalities:
            backbone.require(modality, self.name)
        if self.fuses:
            backbone.require("fusion", self.name)
        key = f"model.tasks.{self.name}.init_args"
        self.data.bind({m: get_modality(m)().pipeline(backbone.spec(m), self.data.transforms.get(m), f"{key}.transform")
                        for m in self.data.reads})
        self.max_length = backbone.max_length

    def forward(self, backbone: Backbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss (key ``loss``) and whatever ``update_metrics`` needs."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh collection of this task's metrics (one is made per evaluation stage)."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def predict(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], tokenizer: Tokenizer) -> list[dict]:
        """One JSON-able row per example of an evaluation batch (``mmlit predict``): the sample ``key``, the
        ``prediction`` and its ``score``, plus whatever names the example (a question's id)."""
        raise NotImplementedError(f"task '{self.name}' ({type(self).__name__}) does not implement predict()")

    def setup(self, tokenizer: Tokenizer | None) -> None:
        """Called in the training process once the tokenizer is loaded, before any stage runs (a task that needs
        token ids of its own, such as zero-shot class prompts, makes them here)."""
