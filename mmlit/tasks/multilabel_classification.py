"""Multi-label image classification: which of the classes an image shows, each decided on its own.

One sigmoid per class on the backbone's pooled image feature, trained with binary cross-entropy (as for COCO's 80
object labels or a photo's tags). Reports mean average precision over the classes (``map``, torchmetrics' macro
``MultilabelAveragePrecision``, gathered over ranks) and the micro F1 at ``threshold`` (``f1``).

Data contract: an image entry and a list of labels (``json.labels`` by default): class names or indices.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from mmlit.data import Shards, TaskData
from mmlit.data.decode import SampleError, sample_location
from mmlit.data.fields import class_index, names_from
from mmlit.data.transforms import ImageTransform
from mmlit.registry import register_task
from mmlit.tasks.base import Task

__all__ = ["MultiLabelClassification", "MultiLabelData"]


class MultiLabelData(TaskData):
    """Images and a 0/1 target per class (the arguments are ``MultiLabelClassification``'s)."""

    reads = ("image",)

    def __init__(self, shards: Shards, batch_size: int, labels_field: str, classes: list[str], transform: ImageTransform):
        super().__init__(shards, batch_size, {"image": transform})
        self.labels_field, self.classes, self.fields = labels_field, classes, ("image", labels_field)
        self._index = {name: i for i, name in enumerate(classes)}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        labels = self.label(sample, self.labels_field, [])
        if not isinstance(labels, list):
            raise SampleError(f"{sample_location(sample)}: '{self.labels_field}' must be a list of labels, got "
                              f"{type(labels).__name__}")
        target = torch.zeros(len(self.classes))
        for label in labels:
            target[class_index(label, self.classes, self._index, sample, f"model.tasks.{self.name}.init_args.classes")] = 1
        yield {"image": self.image(sample), "target": target}


@register_task("multilabel_classification")
class MultiLabelClassification(Task):
    """Predict every class an image shows (one sigmoid per class; mAP).

    Args:
        classes: the class names, or the path of a JSON list of them.
        labels_field: the entry (or ``json.path``) holding the sample's labels, a list of names or indices.
        threshold: the probability above which a class is predicted (F1, ``mmlit predict``).
        transform: the image pipeline.
    """

    modalities = ("image",)

    def __init__(self, shards: Shards, classes: str | list[str], batch_size: int = 32, labels_field: str = "json.labels",
                 threshold: float = 0.5, transform: ImageTransform | None = None):
        key = f"model.tasks.{getattr(self, 'task_name', 'multilabel_classification')}.init_args"
        names = names_from(classes, f"{key}.classes")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"{key}.threshold must be in (0, 1), got {threshold}")
        super().__init__(MultiLabelData(shards, batch_size, labels_field, names, transform or ImageTransform()))
        self.classes, self.threshold = names, threshold

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, len(self.classes)))

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.head(backbone(image=batch["image"])["image"].pooled)  # (B, K)
        return {"loss": F.binary_cross_entropy_with_logits(logits, batch["target"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        n = len(self.classes)
        return MetricCollection({"map": MultilabelAveragePrecision(n, average="macro"),
                                 "f1": MultilabelF1Score(n, threshold=self.threshold, average="micro")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        probabilities, target = outputs["logits"].float().sigmoid(), batch["target"].long()
        for metric in metrics.values():
            metric.update(probabilities, target)

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        rows = []
        for key, probabilities in zip(batch["key"], outputs["logits"].float().sigmoid().tolist()):
            chosen = [i for i, p in enumerate(probabilities) if p > self.threshold]
            rows.append({"key": key, "prediction": [self.classes[i] for i in chosen],
                         "score": [round(probabilities[i], 6) for i in chosen]})
        return rows
