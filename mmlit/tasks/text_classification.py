"""Text-only classification from the backbone's pooled text feature.

Data contract: a JSON list of items (``json.questions`` by default), each with a text and a class
name; every item is one example, so a batch of ``batch_size`` samples holds all of their items (20
questions per Sort-of-CLEVR image). On Sort-of-CLEVR the class is the question type (shape,
horizontal, vertical, closest, furthest, count), read from the question text alone.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mmlit.data.decode import SampleError, sample_field, sample_location
from mmlit.data.sort_of_clevr import QUESTION_TYPES
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task

__all__ = ["TextClassification"]


@register_task("text_classification")
class TextClassification(Task):
    """Predict a class from a text alone."""

    fields = ("json.questions",)
    needs = ("text_encoder",)

    def __init__(self, shards: Shards, batch_size: int = 2, items_field: str = "json.questions",
                 text_key: str = "question", label_key: str = "type", classes: list[str] = list(QUESTION_TYPES)):
        super().__init__(shards, batch_size)
        self.items_field, self.text_key, self.label_key = items_field, text_key, label_key
        self.classes = list(classes)
        self.fields = (items_field,)
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, len(self.classes)))

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        for item in sample_field(sample, self.items_field, self.name):
            label = item.get(self.label_key)
            if label not in self._class_index:
                raise SampleError(f"{sample_location(sample)}: class {label!r} is not in "
                                  f"model.tasks.{self.name}.init_args.classes")
            yield {"text": self.token_ids(tokenizer, item[self.text_key]), "label": self._class_index[label]}

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.head(backbone(text=batch["text"]).text_pooled)  # (B, K)
        return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(len(self.classes), average="micro")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        metrics["acc"].update(outputs["logits"].argmax(-1), batch["label"])
