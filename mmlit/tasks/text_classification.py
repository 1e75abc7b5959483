"""Text-only classification from the backbone's pooled text feature.

Data contract: items at ``items_field`` (``json`` by default): one JSON object, or a list of them, each with a text
(``text_key``) and a class name (``label_key``); every item is one example, so a batch of ``batch_size`` samples holds
all of their items (a list: the 20 questions of a Sort-of-CLEVR image, whose class is the question type, read from
the question text alone).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mmlit.data import Shards, TaskData
from mmlit.data.decode import SampleError, sample_field, sample_location
from mmlit.data.fields import names_from
from mmlit.data.transforms import predicting
from mmlit.registry import register_task
from mmlit.tasks.base import Task

__all__ = ["TextClassification", "TextClassificationData"]


class TextClassificationData(TaskData):
    """Texts and their class indices (the arguments are ``TextClassification``'s)."""

    reads = ("text",)

    def __init__(self, shards: Shards, batch_size: int, classes: list[str], items_field: str, text_key: str,
                 label_key: str):
        super().__init__(shards, batch_size)
        self.items_field, self.text_key, self.label_key, self.fields = items_field, text_key, label_key, (items_field,)
        self._class_index = {c: i for i, c in enumerate(classes)}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        items = sample_field(sample, self.items_field, self.name)
        for number, item in enumerate([items] if isinstance(items, dict) else items):
            label = item.get(self.label_key) if isinstance(item, dict) else None
            unlabelled = label is None and predicting()  # (mmlit predict on new texts: label -100, no loss)
            if not isinstance(item, dict) or not isinstance(item.get(self.text_key), str) or \
                    (label not in self._class_index and not unlabelled):
                raise SampleError(f"{sample_location(sample)}: an item of '{self.items_field}' needs a text at "
                                  f"{self.text_key!r} and a class at {self.label_key!r} that is in "
                                  f"model.tasks.{self.name}.init_args.classes, got {str(item)[:200]}")
            yield {"text": self.token_ids(tokenizer, item[self.text_key]), "label": self._class_index.get(label, -100),
                   "item": number}


@register_task("text_classification")
class TextClassification(Task):
    """Predict a class from a text alone."""

    modalities = ("text",)

    def __init__(self, shards: Shards, classes: str | list[str], batch_size: int = 32, items_field: str = "json",
                 text_key: str = "text", label_key: str = "class"):
        names = names_from(classes, f"model.tasks.{getattr(self, 'task_name', 'text_classification')}.init_args.classes")
        super().__init__(TextClassificationData(shards, batch_size, names, items_field, text_key, label_key))
        self.classes = names

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, len(self.classes)))

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.head(backbone(text=batch["text"])["text"].pooled)  # (B, K)
        return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(len(self.classes), average="micro")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        metrics["acc"].update(outputs["logits"].argmax(-1), batch["label"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        score, label = outputs["logits"].float().softmax(-1).max(-1)
        return [{"key": k, "item": n, "prediction": self.classes[i], "score": round(p, 6)}
                for k, n, i, p in zip(batch["key"], batch["item"].tolist(), label.tolist(), score.tolist())]
